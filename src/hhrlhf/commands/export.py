"""`hhrlhf export`: preference rows to TRL, OpenAI chat or Parquet, one file, written atomically."""

from __future__ import annotations

from pathlib import Path

import click

from hhrlhf.commands.options import (
    given,
    output_option,
    quiet_option,
    require_models,
    split_option,
)
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
@output_option(f"The file to write (required); its extension picks the container "
               f"({', '.join(CONTAINERS)}).", alias="--out", path_type=Path)  # --out: earlier
@split_option(help="Only this split of the named subsets (train, test).")
@click.option("--drop", "drop", multiple=True, metavar="CHECK[,CHECK...]",
              help="Leave out rows that these audit checks flag (repeatable; 'all' = every "
                   "check). Cross-row checks are computed over the named sources, both splits.")
@quiet_option()
def export(sources: tuple[str, ...], fmt: str, output: Path | None, output_alias: Path | None,
           split: str | None, drop: tuple[str, ...], quiet: bool) -> None:
    """Export preference rows (the named subsets/files, or every preference file in the cache).

    Rows a format cannot hold are left out and counted on stderr, never altered; every other
    row is written as published. A one-line summary goes to stderr. The output is written
    atomically and may not be one of the sources (through a link either).
    """
    from hhrlhf.export import export as run_export

    out = given(output, output_alias)
    require_models(click.get_current_context(), output=out)
    result = run_export(list(sources), fmt, out, split=split, drop=drop, progress=not quiet)
    click.echo(f"hhrlhf export: {result.summary()}", err=True)
