"""`hhrlhf export`: preference rows to TRL, OpenAI chat or Parquet, one file, written atomically."""

from __future__ import annotations

from pathlib import Path

import click

from hhrlhf.commands.options import split_option
from hhrlhf.export import CONTAINERS, FORMATS, UNREPRESENTABLE


def _format_help() -> str:
    lines = []
    for name, what in FORMATS.items():
        left_out = ", ".join(UNREPRESENTABLE[name]) or "none"
        lines.append(f"{name}: {what} (rows left out: {left_out})")
    return "; ".join(lines)


@click.command("export")
@click.argument("sources", nargs=-1, metavar="[SUBSET|PATH]...")
@click.option("--format", "fmt", required=True, metavar="FORMAT",
              help=f"{', '.join(FORMATS)}. {_format_help()}.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help=f"Output file; its extension picks the container ({', '.join(CONTAINERS)}).")
@split_option(help="Only this split of the named subsets (train, test).")
@click.option("--drop", "drop", multiple=True, metavar="CHECK[,CHECK...]",
              help="Leave out rows that these audit checks flag (repeatable; 'all' = every "
                   "check). Cross-row checks are computed over the named sources, both splits.")
def export(sources: tuple[str, ...], fmt: str, out: Path, split: str | None,
           drop: tuple[str, ...]) -> None:
    """Export preference rows (the named subsets/files, or every preference file in the cache).

    Rows a format cannot hold are left out and counted on stderr, never altered; every other
    row is written as published. A one-line summary goes to stderr. The output is written
    atomically and may not be one of the sources (through a link either).
    """
    from hhrlhf.export import export as run_export

    result = run_export(list(sources), fmt, out, split=split, drop=drop)
    click.echo(f"hhrlhf export: {result.summary()}", err=True)
