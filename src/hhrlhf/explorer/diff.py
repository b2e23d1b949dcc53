"""Word-level differences between two responses, for the pair view (difflib on word tokens)."""

from __future__ import annotations

import difflib
import re

# Words, single punctuation marks and runs of white space: joined back they give the text.
_TOKEN = re.compile(r"\w+|[^\w\s]|\s+")
# Past this many tokens a side, the diff is not worth its quadratic worst case: no highlights.
MAX_TOKENS = 20_000

Segment = tuple[str, bool]  # (text, differs from the other side)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _merge(segments: list[Segment]) -> list[Segment]:
    segments = [s for s in segments if s[0]]
    # White space is highlighted only between two highlighted words (one highlight then).
    marked = []
    for i, (text, changed) in enumerate(segments):
        if not text.strip():
            changed = (0 < i < len(segments) - 1 and segments[i - 1][1]
                       and segments[i + 1][1])
        marked.append((text, changed))
    out: list[Segment] = []
    for text, changed in marked:
        if out and out[-1][1] == changed:
            out[-1] = (out[-1][0] + text, changed)
        else:
            out.append((text, changed))
    return out


def word_diff(a: str, b: str) -> tuple[list[Segment], list[Segment]]:
    """Each side as segments, marking the words not shared with the other side.

    ``"".join(t for t, _ in side)`` gives the side's text back exactly.
    """
    ta, tb = tokens(a), tokens(b)
    if a == b:
        return _merge([(a, False)]), _merge([(b, False)])
    if len(ta) > MAX_TOKENS or len(tb) > MAX_TOKENS:
        return _merge([(a, True)]), _merge([(b, True)])
    sm = difflib.SequenceMatcher(None, ta, tb, autojunk=False)
    left: list[Segment] = []
    right: list[Segment] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        same = op == "equal"
        left.append(("".join(ta[i1:i2]), not same))
        right.append(("".join(tb[j1:j2]), not same))
    return _merge(left), _merge(right)
