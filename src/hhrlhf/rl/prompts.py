"""Prompts for sampling: the dialogue up to its final Assistant turn, from preference rows
(``hhrlhf rl``, ``hhrlhf generate``, ``hhrlhf rl eval``) or dialogue files, and the red-team
transcripts' opening human turns (``--prompts redteam``, ``rl eval --redteam``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import HUMAN, Dialogue
from hhrlhf.registry import PREFERENCE_TRAIN, REDTEAM_SUBSET
from hhrlhf.rowformats import (
    comparison_of_row,
    dialogue_of_row,
    is_comparison_row,
    parse_row,
    parse_text,
    prompt_of,
)

if TYPE_CHECKING:
    from hhrlhf.read import Source

PROMPT_KINDS = ("records", "redteam")


def default_sources(kind: str) -> list[str]:
    """The sources when none are named: the preference train splits, or the red-team file."""
    return [REDTEAM_SUBSET] if kind == "redteam" else list(PREFERENCE_TRAIN)


def _is_redteam(path: object) -> bool:
    from hhrlhf.read import is_redteam_file

    p = Path(str(path))
    return p.is_file() and is_redteam_file(p)


def redteam_openings(sources: Sequence[str], limit: int = 0) -> list[Dialogue]:
    """The opening Human turn of each red-team transcript of ``sources``, each distinct one
    once, in file order (the first ``limit`` when given)."""
    from hhrlhf.read import read_source_redteam, resolve

    out: list[Dialogue] = []
    seen: set[str] = set()
    for source in resolve(list(sources)):
        if not (source.is_redteam or _is_redteam(source.path)):
            raise HHRLHFError("holds preference rows, no red-team transcripts (red-team "
                              "prompts come from red-team-attempts or a file of its rows)",
                              source.path)
        for attempt in read_source_redteam(source):
            turns = attempt.transcript.turns
            if not turns or turns[0].role != HUMAN or not turns[0].text.strip():
                continue
            if turns[0].text in seen:
                continue
            seen.add(turns[0].text)
            out.append(Dialogue(turns[:1]))
            if limit and len(out) >= limit:
                return out
    if not out:
        raise HHRLHFError("no transcript opens with a Human turn", ", ".join(sources))
    return out


def row_prompts(source: Source) -> Iterator[tuple[int, Dialogue]]:
    """(row index, the row's prompt: its turns before the final Assistant turn) for each row of
    ``source``: preference rows of any shape hhrlhf reads (official, TRL text or
    conversational), prompt-only rows (``{"prompt": ...}``) and chat rows
    (``{"messages": [...]}``, a final Assistant turn dropped); see :mod:`hhrlhf.rowformats`."""
    from hhrlhf.read import iter_json_rows, read_source_comparisons

    if source.subset is not None:  # an official file: preference rows
        for c in read_source_comparisons(source):
            yield c.index, Dialogue(c.prompt, c.chosen_dialogue.preamble)
        return
    for index, (line, obj) in enumerate(iter_json_rows(source.path)):
        if is_comparison_row(obj):
            c = comparison_of_row(obj, index=index, line=line, where=source.path)
            yield index, Dialogue(c.prompt, c.chosen_dialogue.preamble)
        else:
            if isinstance(obj, dict) and "transcript" in obj:
                raise HHRLHFError("holds red-team transcripts, not preference rows or prompts",
                                  source.path)
            yield index, prompt_of(dialogue_of_row(obj, source.path, line))


def dialogue_prompts(sources: Sequence[str], unique: bool) -> Iterator[tuple[str, Dialogue]]:
    """(prompt id, the dialogue up to its final Assistant turn) for every input prompt, in order.

    Subsets and files of JSON rows (preference rows of any shape, prompt-only and chat rows)
    give each row's prompt (id ``SOURCE:ROW``, or the row's ``"id"``; with ``unique``, a
    prompt repeated across rows once); a file of plain lines or ``-`` (stdin, the default)
    gives its rows as ``hhrlhf pm score`` reads them, a final Assistant turn dropped (id: the
    row's ``"id"``, else its line number)."""
    from hhrlhf.read import resolve, text_lines
    from hhrlhf.records import Comparison

    seen: set[str] = set()
    for src in sources or ("-",):
        path = Path(src)
        # a subset name, or a file of JSON rows (any suffix)
        if src != "-" and (not path.exists() or _json_rows(path)):
            for source in resolve([src]):
                if source.is_redteam:
                    raise HHRLHFError("holds red-team transcripts, not preference rows",
                                      source.path)
                for index, prompt in row_prompts(source):
                    key = prompt.render()
                    if unique and key in seen:
                        continue
                    seen.add(key)
                    yield f"{source.name}:{index}", prompt
            continue
        where = "<stdin>" if src == "-" else src
        for n, line in text_lines(src):
            row = parse_row(line, where, n)
            if row["kind"] == "pair":
                d = Comparison.from_strings(row["chosen"], row["rejected"]).chosen_dialogue
            else:
                d = parse_text(row["text"])
            yield str(row.get("id", n if len(sources) < 2 else f"{where}:{n}")), prompt_of(d)


def _json_rows(path: Path) -> bool:
    """Whether a file holds JSON rows that are objects (a file of plain lines or of JSON
    strings is read line by line, as ``hhrlhf pm score`` reads it)."""
    from hhrlhf.read import iter_json_rows

    try:
        for _, obj in iter_json_rows(path):
            return isinstance(obj, dict) and "text" not in obj
    except HHRLHFError:  # not JSON: plain lines, one dialogue each
        return False
    return False


def load_prompts(sources: Sequence[str], kind: str = "records", limit: int = 0
                 ) -> list[Dialogue]:
    """The prompts of ``kind`` (see :data:`PROMPT_KINDS`) in ``sources`` (default:
    :func:`default_sources`): distinct, in the order first met, the first ``limit`` when
    given; a prompt with no Human turn is left out."""
    if kind not in PROMPT_KINDS:
        raise HHRLHFError(f"unknown prompt kind {kind!r}; known: {', '.join(PROMPT_KINDS)}")
    sources = list(sources) or default_sources(kind)
    if kind == "redteam":
        return redteam_openings(sources, limit)
    from hhrlhf.read import resolve

    seen: set[str] = set()
    out: list[Dialogue] = []
    for source in resolve(sources):
        if source.is_redteam or _is_redteam(source.path):
            raise HHRLHFError("holds red-team transcripts, not preference rows (use "
                              "--prompts redteam for their opening turns)", source.path)
        for _, d in row_prompts(source):
            key = d.render()
            if key in seen or not any(t.role == HUMAN for t in d.turns):
                continue
            seen.add(key)
            out.append(d)
            if limit and len(out) >= limit:
                return out
    if not out:
        raise HHRLHFError("no prompts in " + ", ".join(sources))
    return out
