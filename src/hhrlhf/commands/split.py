"""`hhrlhf split SOURCES --folds K --out DIR`: preference rows split into train and test folds
grouped by prompt, written as official files that every command reads."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hhrlhf.errors import HHRLHFError


@click.command("split")
@click.argument("sources", nargs=-1, required=True)
@click.option("--folds", type=int, default=5, show_default=True,
              help="Folds to cut the rows into (grouped by prompt).")
@click.option("--fold", type=int, default=0, show_default=True,
              help="The fold held out as test.jsonl; the others are train.jsonl.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the assignment of prompts to folds.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write train.jsonl and test.jsonl into.")
def split(sources: tuple[str, ...], folds: int, fold: int, seed: int, out_dir: str) -> None:
    """Split the preference rows of SOURCES (subsets or files, any shape hhrlhf reads) into
    OUT/train.jsonl and OUT/test.jsonl: the rows of one of FOLDS folds as the test file, the
    rest as the train file. A prompt and every row repeating it fall in one fold, so no test
    prompt is trained on. Rows are written as published (official format), in file order.

    \b
    Example:
      hhrlhf split harmless-base/test --folds 5 --fold 0 --out folds
      hhrlhf sft folds/train.jsonl --init tiny --out runs/sft
    """
    from hhrlhf.extras import require

    require("pm", "hhrlhf split")  # the grouping is scikit-learn's GroupKFold
    if folds < 2:
        raise HHRLHFError(f"--folds must be at least 2, got {folds}")
    if not 0 <= fold < folds:
        raise HHRLHFError(f"--fold must be in 0..{folds - 1}, got {fold}")
    if seed < 0:
        raise HHRLHFError(f"--seed must be 0 or more, got {seed}")
    from hhrlhf.atomic import named_files, write_text
    from hhrlhf.folds import prompt_folds
    from hhrlhf.read import preference_sources, read_source_comparisons

    srcs = preference_sources(list(sources))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HHRLHFError("is a file, not a folder", out)
    inputs = named_files([str(s.path) for s in srcs])
    rows = [c for s in srcs for c in read_source_comparisons(s)]
    fold_of = prompt_folds(rows, folds, seed)
    parts: dict[str, list[str]] = {"train": [], "test": []}
    for c, f in zip(rows, fold_of):
        parts["test" if f == fold else "train"].append(
            json.dumps({"chosen": c.chosen_raw, "rejected": c.rejected_raw}) + "\n")
    for name, lines in parts.items():
        write_text(out / f"{name}.jsonl", "".join(lines), inputs=inputs)
    click.echo(f"split {len(rows):,} rows into {folds} folds by prompt: "
               f"{out / 'train.jsonl'} {len(parts['train']):,} rows, "
               f"{out / 'test.jsonl'} {len(parts['test']):,} rows (fold {fold})")
