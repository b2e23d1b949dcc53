"""`hhrlhf fetch`: download the official files into the cache, verified."""

from __future__ import annotations

import click

from hhrlhf.commands.options import quiet_option, split_option
from hhrlhf.errors import HHRLHFError
from hhrlhf.registry import SUBSETS

_HELP = f"""Download SUBSETs (default: all nine files) into the cache, verified against their
pinned size and SHA-256 or git blob id (nothing is trusted on first use; $HHRLHF_PINS may name
a MANIFEST.tsv-style table of other pins, for a mirror that serves other bytes on purpose).

Subsets: {", ".join(SUBSETS)}. Name one split as SUBSET/SPLIT, or
all of one split with --split.

One file failing does not stop the others; the summary says which failed and why, and the
exit status is non-zero if any did.
"""


@click.command("fetch", help=_HELP)
@click.argument("subsets", nargs=-1, metavar="[SUBSET[/SPLIT]]...")
@split_option(help="Only this split (the red-team file has none and always comes).")
@click.option("--mirror", metavar="URL|FOLDER", default=None,
              help="Fetch from this base URL or local folder (same layout as the dataset) "
                   "instead of Hugging Face + GitHub. Default: $HHRLHF_MIRROR.")
@click.option("--offline/--online", default=None,
              help="Use the cache only and report what is missing. Default: $HHRLHF_OFFLINE.")
@quiet_option("No progress bars on stderr.", alias="--no-progress")  # its earlier name
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
              default=None, metavar="SECONDS",
              help="Give up on a source that takes longer than this to connect or goes quiet "
                   "this long mid-download (a transient failure).  [default: 15 to connect, "
                   "60 mid-download]")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True, metavar="N",
              help="Further attempts at a source after a transient failure (connection reset "
                   "or cut, timeout, HTTP 5xx or 429) before the next source is tried.")
@click.option("--backoff", "backoff_s", type=click.FloatRange(min=0), default=1.0,
              show_default=True, metavar="SECONDS",
              help="Wait before the first retry; doubled for each next one (at most 30 s).")
def fetch(subsets: tuple[str, ...], split: str | None, mirror: str | None,
          offline: bool | None, quiet: bool, quiet_alias: bool, timeout_s: float | None,
          retries: int, backoff_s: float) -> None:
    from hhrlhf.fetch import FetchSettings
    from hhrlhf.fetch import fetch as fetch_files
    from hhrlhf.registry import cache_dir

    settings = (FetchSettings(retries=retries, backoff_s=backoff_s) if timeout_s is None else
                FetchSettings.with_timeout(timeout_s, retries=retries, backoff_s=backoff_s))
    report = fetch_files(subsets or None, split=split, mirror=mirror, offline=offline,
                         progress=not (quiet or quiet_alias), settings=settings)
    for line in report.lines():
        click.echo(line)
    click.echo(f"cache: {cache_dir()}")
    if not report.ok:
        raise HHRLHFError(report.error_message())
