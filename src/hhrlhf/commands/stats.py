"""`hhrlhf stats`: rows, turns, lengths and length bias, streamed."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from hhrlhf.commands.options import quiet_option, split_option
from hhrlhf.read import iter_labelled, preference_sources


@click.command()
@click.argument("sources", nargs=-1)
@split_option(help="Only this split of the named subsets (or of the cache).")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object (its key "rows" is the number of rows read).')
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Also write a PNG figure: a row of panels per subset (turns, response "
                   "and prompt lengths), then the length bias of each file.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="A local Hugging Face tokenizer directory: lengths in tokens too.")
@quiet_option()
def stats(sources: tuple[str, ...], split: str | None, as_json: bool, plot_path: Path | None,
          tokenizer_path: Path | None, quiet: bool) -> None:
    """Describe rows per subset and split, turns per dialogue, lengths and length bias.

    SOURCES are subsets (harmless-base, helpful-base/test) or local files; none means every
    preference file in the cache. A plain file's rows are named by its path.
    """
    from tqdm import tqdm

    from hhrlhf.stats import StatsBuilder, format_text, load_tokenizer, plot_stats

    if plot_path is not None and plot_path.suffix.lower() != ".png":
        from hhrlhf.errors import HHRLHFError

        raise HHRLHFError("the plot is a PNG: name a .png file", plot_path)
    srcs = preference_sources(sources, split)
    if plot_path is not None:
        from hhrlhf.outputs import check_output_file

        check_output_file(plot_path, "stats", inputs=[s.path for s in srcs])
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    builder = StatsBuilder(tokenizer, str(tokenizer_path) if tokenizer_path else None)
    with tqdm(desc="stats", unit=" rows", disable=True if quiet else None, leave=False) as bar:
        for c, subset, sp in iter_labelled(srcs):
            builder.add(c, subset, sp)
            bar.update()
    result = builder.result()
    if plot_path is not None:
        from hhrlhf.outputs import mark_output

        plot_stats(result, plot_path)
        mark_output(plot_path, "stats")
    if as_json:
        click.echo(orjson.dumps(result.to_json()).decode())
    else:
        names = [s.name for s in srcs]
        click.echo(format_text(result, names))
        if plot_path is not None:
            click.echo(f"\nplot: {plot_path}")
