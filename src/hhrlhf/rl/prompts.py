"""Prompts for RL: the dialogue up to its final Assistant turn, from preference rows, or the
red-team transcripts' opening human turns (``--prompts redteam``). A prompt repeated across
rows is kept once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import HUMAN, Dialogue

PROMPT_KINDS = ("records", "redteam")
REDTEAM = "red-team-attempts"
PREFERENCE_TRAIN = ["harmless-base/train", "helpful-base/train",
                    "helpful-rejection-sampled/train", "helpful-online/train"]


def default_sources(kind: str) -> list[str]:
    """The sources when none are named: the preference train splits, or the red-team file."""
    return [REDTEAM] if kind == "redteam" else list(PREFERENCE_TRAIN)


def iter_prompts(sources: Sequence[str], kind: str) -> Iterator[Dialogue]:
    from hhrlhf.read import read_source_comparisons, read_source_redteam, resolve

    for source in resolve(list(sources) or default_sources(kind)):
        if kind == "redteam":
            if not source.is_redteam and not _is_redteam(source.path):
                raise HHRLHFError("holds preference rows, not red-team transcripts (--prompts "
                                  "redteam reads red-team-attempts)", source.path)
            for attempt in read_source_redteam(source):
                turns = attempt.transcript.turns
                if turns and turns[0].role == HUMAN:
                    yield Dialogue(turns[:1])
        else:
            if source.is_redteam or _is_redteam(source.path):
                raise HHRLHFError("holds red-team transcripts, not preference rows (use "
                                  "--prompts redteam for their opening turns)", source.path)
            for c in read_source_comparisons(source):
                yield Dialogue(c.prompt, c.chosen_dialogue.preamble)


def _is_redteam(path: object) -> bool:
    from pathlib import Path

    from hhrlhf.read import is_redteam_file

    p = Path(str(path))
    return p.is_file() and is_redteam_file(p)


def load_prompts(sources: Sequence[str], kind: str = "records", limit: int = 0
                 ) -> list[Dialogue]:
    """Distinct prompts in the order first met (the first ``limit`` when given); a prompt
    with no Human turn is left out."""
    if kind not in PROMPT_KINDS:
        raise HHRLHFError(f"unknown prompt kind {kind!r}; known: {', '.join(PROMPT_KINDS)}")
    seen: set[str] = set()
    out: list[Dialogue] = []
    for d in iter_prompts(sources, kind):
        key = d.render()
        if key in seen or not any(t.role == HUMAN for t in d.turns):
            continue
        seen.add(key)
        out.append(d)
        if limit and len(out) >= limit:
            break
    if not out:
        raise HHRLHFError("no prompts in " + (", ".join(sources) or kind))
    return out
