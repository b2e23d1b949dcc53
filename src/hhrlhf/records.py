"""Typed records: the only place where raw HH-RLHF strings are split into turns.

Everything else in hhrlhf works on these records, never on ``"\\n\\nHuman:"`` again.

A dialogue string is ``preamble + "".join("\\n\\n" + Role + ":" + sep + text)``. Keeping the
(normally empty) preamble and the separator after each role marker (normally one space) makes
:meth:`Dialogue.render` give back the original string byte for byte, for any input string.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["human", "assistant"]

HUMAN: Role = "human"
ASSISTANT: Role = "assistant"

# A role marker starts a turn only after a blank line, as in the published files.
_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):( ?)")
# A role marker inside a turn's text (without the blank line before it).
_INLINE_MARKER = re.compile(r"(?:Human|Assistant):")
_ROLE_OF = {"Human": HUMAN, "Assistant": ASSISTANT}
ASSISTANT_MARKER = "\n\nAssistant:"  # the one spelling of the marker that opens a response
HUMAN_MARKER = "\n\nHuman:"  # ... and of the one that opens a human turn
_MARKER_OF = {HUMAN: HUMAN_MARKER, ASSISTANT: ASSISTANT_MARKER}

# Per-row checks, computed when a row is parsed. Cross-row checks (duplicate_pair,
# repeated_prompt, train_test_overlap) need the whole corpus and live in hhrlhf.audit.
ROW_CHECKS: tuple[str, ...] = (
    "identical_pair",
    "identical_responses",
    "empty_response",
    "final_turn_not_assistant",
    "context_mismatch",
    "role_marker_in_text",
    "non_alternating_roles",
    "malformed_dialogue",
)


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn of a dialogue. ``sep`` is what followed the role's colon (normally a space)."""

    role: Role
    text: str
    sep: str = " "

    def render(self) -> str:
        return _MARKER_OF[self.role] + self.sep + self.text


@dataclass(frozen=True, slots=True)
class Dialogue:
    """A whole dialogue string, parsed. ``preamble`` is any text before the first turn."""

    turns: tuple[Turn, ...]
    preamble: str = ""

    @classmethod
    def parse(cls, text: str) -> Dialogue:
        parts = _TURN_MARKER.split(text)
        # parts = [preamble, role, sep, text, role, sep, text, ...]
        turns = tuple(
            Turn(_ROLE_OF[parts[i]], parts[i + 2], parts[i + 1]) for i in range(1, len(parts), 3)
        )
        return cls(turns, parts[0])

    def render(self) -> str:
        return self.preamble + "".join([t.render() for t in self.turns])

    @property
    def final(self) -> Turn | None:
        return self.turns[-1] if self.turns else None


def response_turn(text: str) -> Turn:
    """A generated response (the text after ``"\\n\\nAssistant:"``) as the final Assistant turn:
    cut where the policy starts a new turn (``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"``), so
    the dialogue reads back as its prompt plus exactly one Assistant turn; the space after the
    marker (if the policy wrote one) is the turn's separator. Every scorer of samples (``bon``,
    ``rl`` and ``rl eval``, ``generate``) goes through this, so all score the same text."""
    m = _TURN_MARKER.search(text)
    if m:
        text = text[: m.start()]
    sep = " " if text.startswith(" ") else ""
    return Turn(ASSISTANT, text[len(sep):], sep)


def render_turns(turns: tuple[Turn, ...] | list[Turn]) -> str:
    """Turns back in the original string format (no preamble)."""
    return "".join([t.render() for t in turns])


def _split_final(d: Dialogue) -> tuple[tuple[Turn, ...], str]:
    """(prompt, response): prompt is every turn before the final Assistant turn.

    A dialogue whose last turn is not the Assistant's has no response: prompt is all of it.
    """
    if d.turns and d.turns[-1].role == ASSISTANT:
        return d.turns[:-1], d.turns[-1].text
    return d.turns, ""


def _alternates(turns: tuple[Turn, ...]) -> bool:
    expected = HUMAN
    for t in turns:
        if t.role != expected:
            return False
        expected = ASSISTANT if expected == HUMAN else HUMAN
    return True


_HUMAN_MARK = HUMAN_MARKER
_ROLE_SEQUENCE = re.compile(r"\n\n(Human|Assistant):")
_FLAG_SETS: dict[tuple[str, ...], frozenset[str]] = {}


def _flag_set(flags: list[str]) -> frozenset[str]:
    # A handful of distinct flag sets exist: share them rather than build one per row.
    key = tuple(flags)
    fs = _FLAG_SETS.get(key)
    if fs is None:
        fs = _FLAG_SETS[key] = frozenset(flags)
    return fs


def _has_inline_marker(s: str, markers: int) -> bool:
    """Whether ``s``, which holds ``markers`` turn markers, has a role marker inside a text."""
    if s.count(":") == markers:  # every colon is a turn marker's: the common, cheap case
        return False
    # Every turn marker also counts as a bare "Role:"; any extra bare one is inside a text.
    return s.count("Human:") + s.count("Assistant:") != markers


def row_flags(chosen_d: Dialogue, rejected_d: Dialogue) -> frozenset[str]:
    """The per-row checks computed from parsed dialogues: the definition of each flag.

    :meth:`Comparison.from_strings` computes the same flags with string operations for the
    common row shape and falls back to this for every other row; the tests hold the two equal.
    """
    prompt, c_text = _split_final(chosen_d)
    r_prompt, r_text = _split_final(rejected_d)
    flags: list[str] = []
    if chosen_d == rejected_d:
        flags.append("identical_pair")
    if c_text == r_text:
        flags.append("identical_responses")
    if not c_text.strip() or not r_text.strip():
        flags.append("empty_response")
    if any(not d.turns or d.turns[-1].role != ASSISTANT for d in (chosen_d, rejected_d)):
        flags.append("final_turn_not_assistant")
    if prompt != r_prompt or chosen_d.preamble != rejected_d.preamble:
        flags.append("context_mismatch")
    if any(
        _INLINE_MARKER.search(d.preamble) or any(_INLINE_MARKER.search(t.text) for t in d.turns)
        for d in (chosen_d, rejected_d)
    ):
        flags.append("role_marker_in_text")
    if not (_alternates(chosen_d.turns) and _alternates(rejected_d.turns)):
        flags.append("non_alternating_roles")
    if chosen_d.preamble or rejected_d.preamble or not chosen_d.turns or not rejected_d.turns:
        flags.append("malformed_dialogue")
    return _flag_set(flags)


@dataclass(slots=True, eq=False)
class Comparison:
    """One preference row: a shared prompt and the two final responses a crowdworker compared.

    ``chosen`` and ``rejected`` are the final responses; ``prompt`` the turns before the final
    Assistant turn (all the turns when the dialogue does not end with one). The whole rows as
    published are kept (``chosen_raw``, ``rejected_raw``; parsed in ``chosen_dialogue`` and
    ``rejected_dialogue``), so a row that breaks the rules, flagged in ``flags``, loses
    nothing. ``index`` is the 0-based row number in its file, ``line`` the file's 1-based line.

    Reading a row does string work only (find the final turn, compute the flags); the turn
    lists are parsed on first access and kept.
    """

    subset: str | None
    split: str | None
    index: int
    line: int
    chosen: str
    rejected: str
    chosen_raw: str
    rejected_raw: str
    flags: frozenset[str]
    _chosen_dialogue: Dialogue | None = field(default=None, repr=False)
    _rejected_dialogue: Dialogue | None = field(default=None, repr=False)

    @property
    def chosen_dialogue(self) -> Dialogue:
        if self._chosen_dialogue is None:
            self._chosen_dialogue = Dialogue.parse(self.chosen_raw)
        return self._chosen_dialogue

    @property
    def rejected_dialogue(self) -> Dialogue:
        if self._rejected_dialogue is None:
            if "context_mismatch" in self.flags or "final_turn_not_assistant" in self.flags:
                self._rejected_dialogue = Dialogue.parse(self.rejected_raw)
            else:  # same context: share the chosen side's turns
                cd = self.chosen_dialogue
                cut = self.rejected_raw.rfind(ASSISTANT_MARKER)
                final = Dialogue.parse(self.rejected_raw[cut:]).turns
                self._rejected_dialogue = Dialogue(cd.turns[:-1] + final, cd.preamble)
        return self._rejected_dialogue

    @property
    def prompt(self) -> tuple[Turn, ...]:
        return _split_final(self.chosen_dialogue)[0]

    @property
    def rejected_prompt(self) -> tuple[Turn, ...]:
        """The rejected dialogue's own prompt (differs from ``prompt`` under context_mismatch)."""
        return _split_final(self.rejected_dialogue)[0]

    @property
    def num_turns(self) -> int:
        """Turns in the chosen dialogue, final response included."""
        return self.chosen_raw.count(_HUMAN_MARK) + self.chosen_raw.count(ASSISTANT_MARKER)

    def render_chosen(self) -> str:
        """The chosen row rebuilt from its parsed turns (equal to ``chosen_raw``)."""
        return self.chosen_dialogue.render()

    def render_rejected(self) -> str:
        return self.rejected_dialogue.render()

    @classmethod
    def from_strings(
        cls,
        chosen: str,
        rejected: str,
        *,
        subset: str | None = None,
        split: str | None = None,
        index: int = 0,
        line: int = 0,
    ) -> Comparison:
        c_cut = chosen.rfind(ASSISTANT_MARKER)
        c_end = c_cut + len(ASSISTANT_MARKER)  # where the final response's text starts
        if c_cut >= 0 and rejected.startswith(chosen[:c_end]) and chosen.find(
            _HUMAN_MARK, c_cut) < 0 and rejected.find(_HUMAN_MARK, c_cut) < 0 and rejected.find(
                ASSISTANT_MARKER, c_end) < 0:
            # The common shape: one shared context, then one final Assistant turn on each
            # side. Everything is decided with string operations on the context, once.
            context = chosen[:c_cut]
            roles = _ROLE_SEQUENCE.findall(context)
            c_text = chosen[c_end:]
            r_text = rejected[c_end:]
            c_text = c_text[1:] if c_text[:1] == " " else c_text
            r_text = r_text[1:] if r_text[:1] == " " else r_text
            flags: list[str] = []
            if chosen == rejected:
                flags.append("identical_pair")
            if c_text == r_text:
                flags.append("identical_responses")
            if not c_text.strip() or not r_text.strip():
                flags.append("empty_response")
            if (
                _has_inline_marker(context, len(roles))
                or _has_inline_marker(chosen[c_cut:], 1)
                or _has_inline_marker(rejected[c_cut:], 1)
            ):
                flags.append("role_marker_in_text")
            # The final Assistant turn sits at index len(roles): alternation needs it odd.
            if len(roles) % 2 == 0 or not (
                all(r == "Human" for r in roles[0::2])
                and all(r == "Assistant" for r in roles[1::2])
            ):
                flags.append("non_alternating_roles")
            if not chosen.startswith((_HUMAN_MARK, ASSISTANT_MARKER)):
                flags.append("malformed_dialogue")
            return cls(subset, split, index, line, c_text, r_text, chosen, rejected,
                       _flag_set(flags))
        chosen_d, rejected_d = Dialogue.parse(chosen), Dialogue.parse(rejected)
        return cls(subset, split, index, line, _split_final(chosen_d)[1],
                   _split_final(rejected_d)[1], chosen, rejected,
                   row_flags(chosen_d, rejected_d), chosen_d, rejected_d)


# Sizes in the red-team file's own strings ("52B", "13B", "2.7B"), as numbers of parameters.
_PARAM_SUFFIX = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_PARAM_COUNT = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)([KMBT])", re.IGNORECASE)


class MalformedRow(ValueError):
    """A row whose fields break the file's schema (a field missing or of the wrong type).

    A ValueError, not a TypeError: it is bad data in a file, not a programming mistake, and
    the readers turn it into a one-line error naming the file and line."""


def parse_num_params(text: str) -> int:
    """``"2.7B"`` -> 2_700_000_000: a positive decimal number and one of K, M, B, T.

    Raises :class:`MalformedRow` on anything else (``"infB"``, ``"-2.7B"``, ``""``, ``"abc"``).
    """
    m = _PARAM_COUNT.fullmatch(text.strip())
    count = round(float(m.group(1)) * _PARAM_SUFFIX[m.group(2).upper()]) if m else 0
    if count <= 0:
        raise MalformedRow(f"field 'num_params' is not a parameter count such as '52B' or "
                           f"'2.7B': {text!r}")
    return count


# The published file spells one field "descripton" (sic), in every row; the dataset card and
# the seed README spell it "description". Both are read; records expose the card's spelling.
TASK_SCORE = "task_description_harmlessness_score"  # the canonical name
TASK_SCORE_AS_PUBLISHED = "task_descripton_harmlessness_score"  # (sic) the real file's spelling
TASK_SCORE_SPELLINGS: tuple[str, ...] = (TASK_SCORE_AS_PUBLISHED, TASK_SCORE)

REDTEAM_FIELDS: tuple[str, ...] = (
    "transcript",
    "min_harmlessness_score_transcript",
    "num_params",
    "model_type",
    "rating",
    "task_description",
    TASK_SCORE,
    "red_team_member_id",
    "is_upworker",
    "tags",
)
RATING_RANGE = (0.0, 4.0)  # the red-teamer's own rating of success


@dataclass(frozen=True, slots=True)
class RedTeamAttempt:
    """One red-team attempt with its ten fields typed and its transcript parsed.

    ``task_description_harmlessness_score`` is read from either spelling of that field (the
    file's ``task_descripton_...`` or the card's); ``task_score_key`` is the one the row used,
    so :meth:`to_json` gives the row back as it was.
    """

    index: int
    transcript: Dialogue
    min_harmlessness_score_transcript: float
    num_params: str  # the file's own string: "2.7B", "13B", "52B"
    num_parameters: int  # the same as a number: 2_700_000_000
    model_type: str  # "plain lm", "context distillation", "rejection sampling", "rlhf"
    rating: float  # the red-teamer's rating of success, 0 to 4
    task_description: str
    task_description_harmlessness_score: float
    red_team_member_id: int | str
    is_upworker: bool
    tags: tuple[str, ...] | None
    line: int = 0
    task_score_key: str = TASK_SCORE_AS_PUBLISHED

    @classmethod
    def from_json(cls, obj: Any, *, index: int = 0, line: int = 0) -> RedTeamAttempt:
        """Build from one decoded JSON object; raises MalformedRow naming what is wrong."""
        if not isinstance(obj, dict):
            raise MalformedRow(f"expected a JSON object, got {type(obj).__name__}")
        score_keys = [k for k in TASK_SCORE_SPELLINGS if k in obj]
        if len(score_keys) > 1:
            raise MalformedRow(f"both {TASK_SCORE_AS_PUBLISHED!r} (the published file's "
                               f"spelling) and {TASK_SCORE!r} (the dataset card's) are present; "
                               "a row has one of them")
        missing = [k for k in REDTEAM_FIELDS if k != TASK_SCORE and k not in obj]
        if not score_keys:
            missing.insert(REDTEAM_FIELDS.index(TASK_SCORE),
                           f"{TASK_SCORE_AS_PUBLISHED} (or {TASK_SCORE})")
        if missing:
            raise MalformedRow(f"missing field(s): {', '.join(missing)}")
        transcript = obj["transcript"]
        if not isinstance(transcript, str):
            raise MalformedRow("field 'transcript' is not a string")
        tags = obj["tags"]
        if tags is not None:
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise MalformedRow("field 'tags' is neither null nor a list of strings")
            tags = tuple(tags)
        num_params = obj["num_params"]
        if not isinstance(num_params, str):
            raise MalformedRow("field 'num_params' is not a string")
        rating = _number(obj, "rating")
        if not RATING_RANGE[0] <= rating <= RATING_RANGE[1]:
            raise MalformedRow(f"field 'rating' is {rating:g}, outside "
                               f"{RATING_RANGE[0]:g} to {RATING_RANGE[1]:g}")
        return cls(
            index=index,
            transcript=Dialogue.parse(transcript),
            min_harmlessness_score_transcript=_number(obj, "min_harmlessness_score_transcript"),
            num_params=num_params,
            num_parameters=parse_num_params(num_params),
            model_type=_string(obj, "model_type"),
            rating=rating,
            task_description=_string(obj, "task_description"),
            task_description_harmlessness_score=_number(obj, score_keys[0]),
            red_team_member_id=_member_id(obj["red_team_member_id"]),
            is_upworker=_bool(obj, "is_upworker"),
            tags=tags,
            line=line,
            task_score_key=score_keys[0],
        )

    def to_json(self) -> dict[str, Any]:
        """The row as in the file: the transcript rendered back to its original string, the
        fields in the published file's order, the task score under the spelling it was read
        from (``task_descripton_harmlessness_score``, sic, for the published file)."""
        return {
            "transcript": self.transcript.render(),
            "min_harmlessness_score_transcript": self.min_harmlessness_score_transcript,
            "num_params": self.num_params,
            "model_type": self.model_type,
            "rating": self.rating,
            "task_description": self.task_description,
            self.task_score_key: self.task_description_harmlessness_score,
            "red_team_member_id": self.red_team_member_id,
            "is_upworker": self.is_upworker,
            "tags": None if self.tags is None else list(self.tags),
        }


def _number(obj: dict[str, Any], key: str) -> float:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MalformedRow(f"field {key!r} is not a number: {v!r}")
    try:
        x = float(v)
    except OverflowError:  # an integer beyond any float
        raise MalformedRow(f"field {key!r} is not a finite number: {v!r}") from None
    if not math.isfinite(x):  # NaN and Infinity, which Python's JSON decoder lets through
        raise MalformedRow(f"field {key!r} is not a finite number: {v!r}")
    return x


def _string(obj: dict[str, Any], key: str) -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise MalformedRow(f"field {key!r} is not a string: {v!r}")
    return v


def _bool(obj: dict[str, Any], key: str) -> bool:
    v = obj[key]
    if not isinstance(v, bool):
        raise MalformedRow(f"field {key!r} is not true/false: {v!r}")
    return v


def _member_id(v: Any) -> int | str:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise MalformedRow(f"field 'red_team_member_id' is neither a number nor a string: {v!r}")
    return v
