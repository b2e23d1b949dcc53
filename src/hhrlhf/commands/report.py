"""`hhrlhf report`: one self-contained HTML file about the named data, or all of the cache."""

from __future__ import annotations

from pathlib import Path

import click

from hhrlhf.commands.options import ShownDefault, given, output_option, quiet_option


@click.command("report")
@click.argument("sources", nargs=-1)
@output_option("The HTML file to write.", alias="--out", path_type=Path, cls=ShownDefault,
               shown="report.html")  # --out: its earlier name
@click.option("--threshold", type=float, default=3.0, show_default=True,
              help="Red-team success: rating at least this (ratings are 0-4).")
@click.option("--top", "top_k", type=click.IntRange(min=0), default=3, show_default=True,
              help="Most harmful red-team transcripts shown per model type.")
@quiet_option()
def report(sources: tuple[str, ...], output: Path | None, output_alias: Path | None,
           threshold: float, top_k: int, quiet: bool) -> None:
    """Statistics and audit of the preference subsets and every red-team analysis, in ONE
    HTML file (figures and CSS inline, no script, nothing fetched).

    SOURCES are subsets (harmless-base/test, red-team-attempts) or local files; none means
    everything in the cache.
    """
    from hhrlhf.errors import HHRLHFError
    from hhrlhf.report.build import ReportConfig, build_report

    if not 0 <= threshold <= 4:
        raise HHRLHFError(
            f"--threshold must be between 0 and 4 (ratings are 0-4), not {threshold:g}")
    out = given(output, output_alias, Path("report.html"))
    path = build_report(sources, out, ReportConfig(threshold=threshold, top_k=top_k,
                                                   progress=not quiet))
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")
