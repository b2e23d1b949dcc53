"""`hhrlhf pm agree`: how well a preference model ranks the red-team transcripts as Anthropic's
PM did (Spearman's rho with ``min_harmlessness_score_transcript``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hhrlhf.commands.options import alias_option, given, quiet_option, seed_option
from hhrlhf.errors import HHRLHFError
from hhrlhf.registry import REDTEAM_SUBSET


def _check_target(path: Path, option: str, inputs: list[Path]) -> None:
    """Refuse, before any scoring, a path in a missing folder or one the rule of
    :func:`hhrlhf.outputs.check_output_file` refuses (the model and the data are inputs)."""
    from hhrlhf.outputs import check_output_file

    if not path.absolute().parent.exists():  # a file there: the rule names it
        raise HHRLHFError(f"the folder for {option} does not exist", path.absolute().parent)
    check_output_file(path, "pm agree", inputs=inputs)


@click.command("agree")
@click.argument("model", metavar="MODEL")
@click.argument("source", required=False, default=REDTEAM_SUBSET,
                metavar="[red-team-attempts|PATH]")
@click.option("--sample", type=click.IntRange(0), default=None,
              help="Score a seeded random sample of N transcripts (0 = all).  [default: 0]")
@alias_option("--max-rows", "sample_alias", type=click.IntRange(0))  # its earlier name
@seed_option("Seed of the sample.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a figure (PNG): hhrlhf score against the published score, and rho "
                   "per model type and size.")
@click.option("--scores", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one JSON line per scored transcript (index, line, model type, size, "
                   "rating, published and hhrlhf score).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@click.option("--min-rows", type=click.IntRange(4), default=10, show_default=True,
              help="A group with fewer rows gets its n and no rho.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@quiet_option("No progress bars.")
def agree(model: str, source: str, sample: int | None, sample_alias: int | None, seed: int,
          plot: Path | None, scores: Path | None, as_json: bool, min_rows: int, batch_size: int,
          quiet: bool) -> None:
    """Agreement of MODEL with Anthropic's preference model on the red-team transcripts.

    Each transcript is scored as Anthropic scored it: every prefix ending after an Assistant
    turn is a dialogue MODEL scores, and the transcript's score is the minimum (lower = more
    harmful). Reported: Spearman's rho between that score and the file's
    min_harmlessness_score_transcript, overall, per model type and per size, with a 95%
    interval. MODEL is a saved preference model folder (neural or lexical); the data is the
    cached red-team file (`hhrlhf fetch red-team-attempts`) or a path.
    """
    from hhrlhf.atomic import write_text
    from hhrlhf.outputs import mark_output
    from hhrlhf.pm.agreement import agreement, plot_agreement
    from hhrlhf.pm.base import load
    from hhrlhf.redteam.analysis import read_attempts

    inputs = [Path(source), Path(model)]
    if plot is not None:
        _check_target(plot, "--plot", inputs)
    if scores is not None:
        if plot is not None and scores.resolve() == plot.resolve():
            raise HHRLHFError("--plot and --scores name the same file", scores)
        _check_target(scores, "--scores", inputs)
    pm = load(model)
    attempts = read_attempts(source, progress=not quiet)
    if not attempts:
        raise HHRLHFError("no red-team attempts in the file", source)
    result = agreement(pm, attempts, model_path=model, source=source,
                       max_rows=given(sample, sample_alias, 0),
                       seed=seed, batch_size=batch_size, min_rows=min_rows,
                       progress=not quiet)
    if plot is not None:
        plot_agreement(result, plot)
        mark_output(plot, "pm agree")
    if scores is not None:
        write_text(scores, "".join(json.dumps(r, allow_nan=False) + "\n"
                                   for r in result.score_rows()))
        mark_output(scores, "pm agree")
    if as_json:
        out = result.to_json()
        out["plot"] = None if plot is None else str(plot)
        out["scores"] = None if scores is None else str(scores)
        click.echo(json.dumps(out, indent=2, allow_nan=False))
        return
    click.echo(result.format_table())
    if plot is not None:
        click.echo(f"figure: {plot}")
    if scores is not None:
        click.echo(f"scores: {scores}")
