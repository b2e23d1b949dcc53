"""The audit: which rows break the data's rules, per check, named by (subset, split, index).

Per-row checks come with each record (:attr:`Comparison.flags`, :data:`records.ROW_CHECKS`).
The cross-row checks need the whole corpus and are computed here, streaming:

- ``duplicate_pair``: the same (chosen, rejected) pair, byte for byte, in more than one row;
- ``repeated_prompt``: the same prompt (every turn before the final Assistant turn) in more
  than one row;
- ``train_test_overlap``: a prompt found in a train file and in a test file (of the same
  subset or of different subsets).

Every row of a group is listed (the first occurrence too), so ``flags_of`` is symmetric.
Memory stays modest: one 64-bit hash per row for its prompt and for its pair (not the strings),
plus a count per distinct hash; rows are never kept.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hhrlhf.records import ASSISTANT_MARKER, ROW_CHECKS, Comparison, render_turns

CROSS_ROW_CHECKS: tuple[str, ...] = ("duplicate_pair", "repeated_prompt", "train_test_overlap")
CHECKS: tuple[str, ...] = ROW_CHECKS + CROSS_ROW_CHECKS

# Why each check matters, one line each (the table and the docs show them).
DESCRIPTIONS: dict[str, str] = {
    "identical_pair": "chosen and rejected are the same dialogue",
    "identical_responses": "the two final responses are the same text",
    "empty_response": "a final response is empty or blank",
    "final_turn_not_assistant": "a dialogue does not end with an Assistant turn",
    "context_mismatch": "chosen and rejected differ before the final turn",
    "role_marker_in_text": "'Human:'/'Assistant:' inside a turn's text",
    "non_alternating_roles": "turns do not alternate Human, Assistant, ...",
    "malformed_dialogue": "text before the first turn, or no turns at all",
    "duplicate_pair": "the same (chosen, rejected) pair in more than one row",
    "repeated_prompt": "the same prompt in more than one row",
    "train_test_overlap": "the same prompt in a train file and a test file",
}

_TRAIN, _TEST = 1, 2  # bits of a prompt's "seen in" mask
_SPLIT_BIT = {"train": _TRAIN, "test": _TEST}
# A plain file's split, for the overlap check, from its name: train.jsonl.gz, test.jsonl, ...
_SPLIT_IN_NAME = re.compile(r"^(train|test)\b")


@dataclass(frozen=True, slots=True, order=True)
class RowRef:
    """Where a row is: its subset (for a plain file, the path), split (None there) and index."""

    subset: str | None
    split: str | None
    index: int

    def to_json(self) -> dict[str, Any]:
        return {"subset": self.subset, "split": self.split, "index": self.index}

    def __str__(self) -> str:
        where = self.subset or "?"
        if self.split:
            where += f"/{self.split}"
        return f"{where}#{self.index}"


def prompt_text(c: Comparison) -> str:
    """The row's prompt as its original string (``render_turns(c.prompt)``), cheaply.

    For the common row (no preamble, both dialogues ending with an Assistant turn) the prompt
    is the raw chosen string up to its last Assistant marker, with no need to parse the turns;
    every other row goes through the parsed turns. The tests hold the two equal on real data.
    """
    if "final_turn_not_assistant" in c.flags or "malformed_dialogue" in c.flags:
        return render_turns(c.prompt)
    return c.chosen_raw[: c.chosen_raw.rfind(ASSISTANT_MARKER)]


def _hash64(*parts: str) -> int:
    h = hashlib.blake2b(digest_size=8)
    for i, p in enumerate(parts):
        if i:
            h.update(b"\x00")  # a separator no dialogue holds, so ("ab","c") != ("a","bc")
        h.update(p.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "little")


def prompt_key(c: Comparison) -> int:
    """A 64-bit hash of the row's prompt: equal prompts, equal keys (stable across runs)."""
    return _hash64(prompt_text(c))


def pair_key(c: Comparison) -> int:
    """A 64-bit hash of the whole (chosen, rejected) pair as published."""
    return _hash64(c.chosen_raw, c.rejected_raw)


def split_role(subset: str | None, split: str | None) -> str | None:
    """The split a file plays in the overlap check: its own, else one read from its name."""
    if split is not None:
        return split
    if subset is not None:
        m = _SPLIT_IN_NAME.match(Path(subset).name)
        if m:
            return m.group(1)
    return None


@dataclass
class AuditResult:
    """What the audit found. ``checks`` maps every name in :data:`CHECKS` to its rows."""

    rows: int
    checks: dict[str, list[RowRef]]
    # Per distinct hash: how many rows (pairs, prompts) and in which splits (prompts).
    _pair_count: dict[int, int] = field(default_factory=dict, repr=False)
    _prompt_count: dict[int, int] = field(default_factory=dict, repr=False)
    _prompt_splits: dict[int, int] = field(default_factory=dict, repr=False)

    def count(self, check: str) -> int:
        return len(self.checks[check])

    def fired(self) -> list[str]:
        """The checks that found at least one row, in :data:`CHECKS` order."""
        return [name for name in CHECKS if self.checks[name]]

    def flags_of(self, c: Comparison) -> set[str]:
        """Every check (per-row and cross-row) that a record of the audited corpus breaks."""
        out = {f for f in c.flags if f in DESCRIPTIONS}
        if self._pair_count.get(pair_key(c), 0) > 1:
            out.add("duplicate_pair")
        pk = prompt_key(c)
        if self._prompt_count.get(pk, 0) > 1:
            out.add("repeated_prompt")
        if self._prompt_splits.get(pk, 0) == _TRAIN | _TEST:
            out.add("train_test_overlap")
        return out

    def to_json(self) -> dict[str, Any]:
        """``{"rows": N, "checks": {name: {"count": n, "rows": [{subset, split, index}]}}}``."""
        return {
            "rows": self.rows,
            "checks": {
                name: {"count": len(refs), "rows": [r.to_json() for r in refs]}
                for name, refs in self.checks.items()
            },
        }


class Auditor:
    """Feed records one at a time (:meth:`add`), then :meth:`result`. Keeps no records."""

    def __init__(self) -> None:
        self.rows = 0
        self._row_checks: dict[str, list[RowRef]] = {name: [] for name in ROW_CHECKS}
        # Per row, in order: where it is (an id into _places, and its index) and its hashes.
        self._places: list[tuple[str | None, str | None]] = []
        self._place_id: dict[tuple[str | None, str | None], int] = {}
        self._row_place = array("I")
        self._row_index = array("Q")
        self._row_prompt = array("Q")
        self._row_pair = array("Q")
        self._pair_count: dict[int, int] = {}
        self._prompt_count: dict[int, int] = {}
        self._prompt_splits: dict[int, int] = {}

    def add(self, c: Comparison, subset: str | None = None, split: str | None = None) -> None:
        """One record; ``subset``/``split`` label it (default: the record's own)."""
        subset = c.subset if subset is None else subset
        split = c.split if split is None else split
        place = (subset, split)
        pid = self._place_id.get(place)
        if pid is None:
            pid = self._place_id[place] = len(self._places)
            self._places.append(place)
        self.rows += 1
        if c.flags:
            ref = RowRef(subset, split, c.index)
            for name in c.flags:
                refs = self._row_checks.get(name)
                if refs is not None:
                    refs.append(ref)
        pk, ck = prompt_key(c), pair_key(c)
        self._row_place.append(pid)
        self._row_index.append(c.index)
        self._row_prompt.append(pk)
        self._row_pair.append(ck)
        self._pair_count[ck] = self._pair_count.get(ck, 0) + 1
        self._prompt_count[pk] = self._prompt_count.get(pk, 0) + 1
        bit = _SPLIT_BIT.get(split_role(subset, split) or "", 0)
        if bit:
            self._prompt_splits[pk] = self._prompt_splits.get(pk, 0) | bit

    def result(self) -> AuditResult:
        cross: dict[str, list[RowRef]] = {name: [] for name in CROSS_ROW_CHECKS}
        both = _TRAIN | _TEST
        pair_count, prompt_count = self._pair_count, self._prompt_count
        prompt_splits, places = self._prompt_splits, self._places
        for pid, index, pk, ck in zip(self._row_place, self._row_index, self._row_prompt,
                                      self._row_pair):
            dup = pair_count[ck] > 1
            rep = prompt_count[pk] > 1
            over = prompt_splits.get(pk, 0) == both
            if dup or rep or over:
                ref = RowRef(*places[pid], index)
                if dup:
                    cross["duplicate_pair"].append(ref)
                if rep:
                    cross["repeated_prompt"].append(ref)
                if over:
                    cross["train_test_overlap"].append(ref)
        checks = {name: self._row_checks[name] for name in ROW_CHECKS}
        checks.update(cross)
        return AuditResult(self.rows, checks, pair_count, prompt_count, prompt_splits)


def run_audit(records: Iterable[Comparison]) -> AuditResult:
    """Audit records (streamed once; each labelled by its own subset and split)."""
    auditor = Auditor()
    for c in records:
        auditor.add(c)
    return auditor.result()


def parse_check_names(values: Iterable[str]) -> list[str]:
    """Check names from options such as ``--fail-on a --fail-on b,c``; ``all`` means every one.

    Raises :class:`HHRLHFError` on an unknown name.
    """
    from hhrlhf.errors import HHRLHFError

    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                names.extend(CHECKS)
            elif name in DESCRIPTIONS:
                names.append(name)
            else:
                raise HHRLHFError(f"unknown check {name!r}; known: {', '.join(CHECKS)}, all")
    return list(dict.fromkeys(names))
