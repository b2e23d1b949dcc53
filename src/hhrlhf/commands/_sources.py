"""Sources for the commands that read preference rows (audit, stats): names, paths, or the cache."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from hhrlhf.errors import HHRLHFError
from hhrlhf.fetch import local_path
from hhrlhf.read import Source, read_source_comparisons, resolve
from hhrlhf.records import Comparison
from hhrlhf.registry import PREFERENCE_SUBSETS, REDTEAM_SUBSET, files_for


def preference_sources(names: Sequence[str], split: str | None) -> list[Source]:
    """The files to read: the named subsets/paths, or every preference file in the cache."""
    if not names:
        found = [Source(p, f.subset, f.split) for f in files_for(PREFERENCE_SUBSETS, split)
                 if (p := local_path(f)) is not None]
        if not found:
            raise HHRLHFError("no preference file in the cache; run `hhrlhf fetch` or name "
                              "a subset or a file")
        return found
    if any(n.partition("/")[0] == REDTEAM_SUBSET for n in names):
        raise HHRLHFError(f"{REDTEAM_SUBSET} holds no preference rows; use `hhrlhf redteam`")
    return resolve(names, split)


def label(source: Source) -> str:
    """How a source's rows are named in reports: its subset, or for a plain file its path."""
    return source.subset if source.subset is not None else str(source.path)


def iter_labelled(sources: Sequence[Source]) -> Iterator[tuple[Comparison, str, str | None]]:
    """(record, subset label, split) for every row of every source, streamed."""
    for src in sources:
        name = label(src)
        for c in read_source_comparisons(src):
            yield c, name, src.split
