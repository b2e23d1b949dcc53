"""`hhrlhf audit`: how many rows break each check, and which."""

from __future__ import annotations

import click
import orjson

from hhrlhf.audit import CHECKS, DESCRIPTIONS, Auditor, AuditResult, parse_check_names
from hhrlhf.commands.options import quiet_option, split_option
from hhrlhf.read import iter_labelled, preference_sources


def format_table(result: AuditResult, sources: list[str], examples: int = 3) -> str:
    """The readable report: one line per check with its count, share and first rows.

    Rows are named by index alone when one file was read, else as ``subset/split#index``.
    """
    one = len(sources) == 1
    lines = [f"audit: {result.rows:,} rows from {', '.join(sources)}", ""]
    lines.append(f"{'check':<25} {'rows':>7} {'share':>7}  first rows"
                 + (" (index)" if one else " (subset/split#index)"))
    for name in CHECKS:
        refs = result.checks[name]
        share = len(refs) / result.rows if result.rows else 0.0
        shown = ", ".join(str(r.index) if one else str(r) for r in refs[:examples])
        if len(refs) > examples:
            shown += ", ..."
        lines.append(f"{name:<25} {len(refs):>7,} {share:>7.2%}  {shown or '-'}")
    fired = result.fired()
    lines.append("")
    lines.append(f"{len(fired)} of {len(CHECKS)} checks found rows"
                 + (":" if fired else "."))
    lines.extend(f"  {name:<25}{DESCRIPTIONS[name]}" for name in fired)
    return "\n".join(lines)


@click.command()
@click.argument("sources", nargs=-1)
@split_option(help="Only this split of the named subsets (or of the cache).")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object: {"rows": N, "checks": {name: {"count", "rows"}}}.')
@click.option("--fail-on", "fail_on", multiple=True, metavar="CHECK[,CHECK...]",
              help="Exit 1 when one of these checks finds a row (repeatable; 'all' = every "
                   "check).")
@click.option("--examples", default=3, show_default=True, type=click.IntRange(min=0),
              help="Rows named per check in the table.")
@quiet_option()
def audit(sources: tuple[str, ...], split: str | None, as_json: bool,
          fail_on: tuple[str, ...], examples: int, quiet: bool) -> None:
    """Report rows that break the data's rules, per check, by (subset, split, index).

    SOURCES are subsets (harmless-base, helpful-base/test) or local files; none means every
    preference file in the cache. A plain file's rows are named by its path, with a null
    split; for train_test_overlap its split is read from its name (train*, test*).
    """
    from tqdm import tqdm

    gate = parse_check_names(fail_on)  # before reading: a typo fails at once
    srcs = preference_sources(sources, split)
    auditor = Auditor()
    with tqdm(desc="audit", unit=" rows", disable=True if quiet else None, leave=False) as bar:
        for c, subset, sp in iter_labelled(srcs):
            auditor.add(c, subset, sp)
            bar.update()
    result = auditor.result()
    names = [s.name for s in srcs]
    if as_json:
        click.echo(orjson.dumps(result.to_json()).decode())
    else:
        click.echo(format_table(result, names, examples))
    failed = [name for name in gate if result.checks[name]]
    if failed:
        click.echo("hhrlhf: audit failed: " + ", ".join(
            f"{name} ({result.count(name):,} rows)" for name in failed), err=True)
        raise click.exceptions.Exit(1)
