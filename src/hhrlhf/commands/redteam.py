"""`hhrlhf redteam`: analyse the red-team attempts (the cached file, or a path)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hhrlhf.commands.options import quiet_option
from hhrlhf.registry import REDTEAM_SUBSET


@click.command("redteam")
@click.argument("source", required=False, default=REDTEAM_SUBSET,
                metavar="[PATH|red-team-attempts]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write the figures (PNG) into this directory.")
@click.option("--threshold", type=float, default=3.0, show_default=True,
              help="An attack succeeded when its rating is at least this (ratings are 0-4).")
@click.option("--top", "top_k", type=click.IntRange(min=0), default=5, show_default=True,
              help="Most harmful transcripts listed per model type.")
@quiet_option()
def redteam(source: str, as_json: bool, out_dir: Path | None, threshold: float,
            top_k: int, quiet: bool) -> None:
    """Attacks by model type and size (success rates with Wilson intervals, harmlessness
    scores), rating against score, tags, red-team members and the most harmful transcripts.
    """
    from hhrlhf.errors import HHRLHFError
    from hhrlhf.redteam.analysis import RedTeamConfig, load_and_analyse
    from hhrlhf.redteam.text import format_text

    if not 0 <= threshold <= 4:
        raise HHRLHFError(
            f"--threshold must be between 0 and 4 (ratings are 0-4), not {threshold:g}")
    cfg = RedTeamConfig(threshold=threshold, top_k=top_k)
    if out_dir is not None:  # each figure by the rule for outputs, before the analysis
        from hhrlhf.outputs import check_output_file
        from hhrlhf.redteam.plots import FIGURE_BUILDERS

        for name in FIGURE_BUILDERS:
            check_output_file(out_dir / name, "redteam", inputs=[source])
    analysis = load_and_analyse(source, cfg, progress=not quiet)
    figures: list[Path] = []
    if out_dir is not None:
        from hhrlhf.outputs import mark_output
        from hhrlhf.redteam.plots import write_figures

        figures = write_figures(analysis, out_dir)
        for figure in figures:
            mark_output(figure, "redteam")
    if as_json:
        d = analysis.to_json()
        d["figures"] = [str(p) for p in figures]
        click.echo(json.dumps(d, indent=1, ensure_ascii=False))
        return
    click.echo(format_text(analysis))
    for p in figures:
        click.echo(f"wrote {p}", err=True)
