"""`hhrlhf pm lexical SOURCES --out DIR`: fit the lexical preference model (hashed n-grams +
logistic regression, :mod:`hhrlhf.pm.lexical`) and save it as a model folder.

The folder is a preference model like any other: ``hhrlhf pm eval DIR``, ``pm score DIR``,
``bon``/``rl`` with DIR as the PM. Its settings are :class:`hhrlhf.pm.lexical.LexicalConfig`'s
keys, set with ``--set key=value`` as ``pm train`` sets its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from hhrlhf.commands.options import config_options, given, max_rows_option
from hhrlhf.errors import HHRLHFError

# The same default data and row filter as `hhrlhf pm train` (its TrainConfig defaults).
DEFAULT_SOURCES = ("harmless-base/train",)
SKIP_FLAGS = ("identical_responses",)  # no preference to learn from


@click.command("lexical")
@click.argument("sources", nargs=-1)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The model folder to write (must not exist, or be empty).")
@max_rows_option(alias="--max-pairs")  # --max-pairs: its earlier name
@config_options("LexicalConfig key (n_features, ngram_max, lowercase, context, "
                "length_features, C, max_iter)", example="C=0.5", file=False)
def lexical(sources: tuple[str, ...], out_dir: str, max_rows: int | None,
            max_rows_alias: int | None, assignments: tuple[str, ...]) -> None:
    """Fit a lexical preference model on SOURCES (subsets such as harmless-base/train, or
    files; default harmless-base/train) and save it in the folder --out.

    \b
    Examples:
      hhrlhf pm lexical harmless-base/train --out runs/lexical
      hhrlhf pm lexical half-a.jsonl.gz --out lexical-a --set ngram_max=3 --set C=0.5
      hhrlhf pm eval runs/lexical harmless-base/test
    """
    from hhrlhf.pm.lexical import LexicalConfig
    from hhrlhf.read import resolve
    from hhrlhf.runs import apply_overrides, parse_assignments

    out = Path(out_dir)
    # A model folder is never overwritten (as `pm train` never overwrites a run).
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HHRLHFError("exists; choose another --out (a model folder is never overwritten)",
                          out)
    if not out.parent.is_dir():
        raise HHRLHFError("the folder to save the model in does not exist", out.parent)
    config = apply_overrides(LexicalConfig(), parse_assignments(assignments), "--set")
    data = list(sources) or list(DEFAULT_SOURCES)
    resolve(data)  # a bad source fails now, before reading anything

    from hhrlhf.pm.lexical import LexicalPreferenceModel
    from hhrlhf.pm.train import load_rows

    t0 = time.perf_counter()
    rows, skipped = load_rows(data, SKIP_FLAGS, given(max_rows, max_rows_alias, 0))
    if not rows:
        raise HHRLHFError("no training pairs left (all skipped or none given)")
    pm = LexicalPreferenceModel.fit(rows, config)
    pm.save(out)
    used = pm.info["pairs_used"]
    left_out = skipped + len(rows) - used
    seconds = time.perf_counter() - t0
    summary = (f"fitted a lexical PM on {used:,} pairs ({left_out:,} with identical responses "
               f"left out) in {seconds:.1f} s")
    lines = [summary]
    if not pm.info["converged"]:
        lines.append(f"note: the logistic regression did not converge in max_iter="
                     f"{config.max_iter} iterations (raise it with --set max_iter=...)")
    lines.append(f"model: {out}")
    click.echo("\n".join(lines))
