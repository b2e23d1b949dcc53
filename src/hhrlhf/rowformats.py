"""The shapes of rows hhrlhf reads, turned into records at the edge.

Besides the official ``{"chosen": "\\n\\nHuman: ...", "rejected": ...}`` rows, researchers hold
the same data in the shapes TRL and OpenAI use, and hhrlhf writes some of them itself
(``hhrlhf export --format trl|trl-text|openai``). Every command that reads preference rows or
prompts takes them all; the mapping is here, once:

=====================================================  ==========================================
row                                                    record
=====================================================  ==========================================
``{"chosen": str, "rejected": str}``                    the official row (:class:`Comparison`)
``{"prompt": str, "chosen": str, "rejected": str}``     TRL text: ``prompt + chosen`` is the row
``{"prompt": [msgs], "chosen": [msgs], ...}``           TRL conversational (explicit prompt)
``{"chosen": [msgs], "rejected": [msgs]}``              TRL conversational (implicit prompt)
``{"prompt": str | [msgs]}``                            a prompt (TRL's prompt-only datasets)
``{"messages": [msgs]}``                                OpenAI chat: a dialogue
``{"text": str}``, a JSON string, a plain line          a dialogue in the HH text format
=====================================================  ==========================================

Messages are ``{"role": "user" | "assistant", "content": str}``; a ``system`` message has no
place in the HH format and is refused in one line rather than dropped or mangled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import ASSISTANT, HUMAN, Comparison, Dialogue, Role, Turn

MESSAGE_ROLE: dict[Role, str] = {HUMAN: "user", ASSISTANT: "assistant"}
_ROLE_OF_MESSAGE: dict[str, Role] = {"user": HUMAN, "human": HUMAN, "assistant": ASSISTANT}

Where = str | Path | None


def to_messages(turns: Sequence[Turn]) -> list[dict[str, str]]:
    """Turns as chat messages (``user`` / ``assistant``)."""
    return [{"role": MESSAGE_ROLE[t.role], "content": t.text} for t in turns]


def from_messages(messages: Any, where: Where = None, line: int | None = None,
                  key: str = "messages") -> tuple[Turn, ...]:
    """Chat messages as turns; anything else is a one-line error naming file and line."""
    if not isinstance(messages, list):
        raise HHRLHFError(f"{key!r} must be a list of messages", where, line)
    turns = []
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)
                and isinstance(m.get("role"), str)):
            raise HHRLHFError(f"{key!r}: a message needs string fields role and content",
                              where, line)
        role = _ROLE_OF_MESSAGE.get(m["role"])
        if role is None:
            raise HHRLHFError(f"{key!r}: a {m['role']!r} message has no place in the HH "
                              "format (only user and assistant turns)", where, line)
        turns.append(Turn(role, m["content"]))
    return tuple(turns)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def comparison_of_row(obj: Any, *, subset: str | None = None, split: str | None = None,
                      index: int = 0, line: int = 0, where: Where = None) -> Comparison:
    """A preference row of any shape above as a :class:`Comparison` (the official strings
    rebuilt, so flags, audit and export work on it as on a published row)."""
    if type(obj) is not dict:
        raise HHRLHFError(f"expected an object with 'chosen' and 'rejected', got {_kind(obj)}",
                          where, line)
    chosen, rejected, prompt = obj.get("chosen"), obj.get("rejected"), obj.get("prompt")
    if type(chosen) is str and type(rejected) is str:
        if type(prompt) is str:  # TRL text: the prompt ends with "\n\nAssistant:"
            if not chosen.startswith(prompt):  # hhrlhf's trl-text export: prompt + chosen
                chosen, rejected = prompt + chosen, prompt + rejected
        elif prompt is not None:
            raise HHRLHFError("'prompt' is messages but 'chosen'/'rejected' are strings; "
                              "expected both as text or both as messages", where, line)
    elif _is_messages(chosen) and _is_messages(rejected):
        context: tuple[Turn, ...] = ()
        if prompt is not None:
            if type(prompt) is str:
                raise HHRLHFError("'prompt' is text but 'chosen'/'rejected' are messages; "
                                  "expected both as text or both as messages", where, line)
            context = from_messages(prompt, where, line, "prompt")
        chosen = Dialogue(context + from_messages(chosen, where, line, "chosen")).render()
        rejected = Dialogue(context + from_messages(rejected, where, line, "rejected")).render()
    else:
        raise HHRLHFError(_shape_problem(obj), where, line)
    return Comparison.from_strings(chosen, rejected, subset=subset, split=split, index=index,
                                   line=line)


def is_comparison_row(obj: Any) -> bool:
    """Whether ``obj`` is a preference row of one of the shapes above (not a prompt)."""
    return type(obj) is dict and "chosen" in obj and "rejected" in obj


def dialogue_of_row(obj: Any, where: Where = None, line: int | None = None) -> Dialogue:
    """A dialogue (or prompt) from a row that is not a preference row: ``{"prompt": ...}``,
    ``{"messages": [...]}``, ``{"text": ...}`` or a JSON string, in the HH text format."""
    if isinstance(obj, str):
        return parse_text(obj)
    if type(obj) is not dict:
        raise HHRLHFError(f"expected a JSON object or string, got {_kind(obj)}", where, line)
    for key in ("messages", "prompt"):
        value = obj.get(key)
        if _is_messages(value):
            return Dialogue(from_messages(value, where, line, key))
        if key == "prompt" and isinstance(value, str):
            d = parse_text(value)
            # a prompt-only row in plain text ("How do I bake bread?") is the human's turn
            return d if d.turns or not value.strip() else Dialogue((Turn(HUMAN, value.strip()),))
    if isinstance(obj.get("text"), str):
        return parse_text(obj["text"])
    raise HHRLHFError("expected a preference row, {\"prompt\": ...}, {\"messages\": [...]} or "
                      f"{{\"text\": ...}} (keys: {', '.join(sorted(obj)) or 'none'})",
                      where, line)


def parse_row(line: str, where: str, n: int) -> dict[str, Any]:
    """One line of a dialogue file -> ``{"kind": "text", "text": ...}`` (a dialogue in the HH
    text format) or ``{"kind": "pair", "chosen": ..., "rejected": ...}`` (official strings),
    with the row's ``"id"`` if it has one; a JSON object of any shape above, a JSON string, or
    a plain line in which ``\\n`` stands for a newline. A bad row is an HHRLHFError."""
    if line.lstrip().startswith(("{", '"')):
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise HHRLHFError(f"not valid JSON: {e}", where, n) from None
        if isinstance(obj, str):
            return {"kind": "text", "text": obj}
        if not isinstance(obj, dict):
            raise HHRLHFError("expected a JSON object or string", where, n)
        extra = {"id": obj["id"]} if "id" in obj else {}
        if "chosen" in obj or "rejected" in obj:
            c = comparison_of_row(obj, line=n, where=where)
            return {"kind": "pair", "chosen": c.chosen_raw, "rejected": c.rejected_raw, **extra}
        if isinstance(obj.get("text"), str):
            return {"kind": "text", "text": obj["text"], **extra}
        return {"kind": "text", "text": dialogue_of_row(obj, where, n).render(), **extra}
    return {"kind": "text", "text": line.replace("\\n", "\n")}


def parse_text(text: str) -> Dialogue:
    """A dialogue in the HH text format; a line typed as ``Human: hi`` (no blank line before
    the marker) counts as one too."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    return Dialogue.parse(text)


def prompt_of(d: Dialogue) -> Dialogue:
    """The dialogue up to its final Assistant turn (what a policy is asked to continue)."""
    turns = d.turns[:-1] if d.turns and d.turns[-1].role == ASSISTANT else d.turns
    return Dialogue(turns, d.preamble)


def _kind(obj: Any) -> str:
    return {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(obj), "a number" if isinstance(obj, (int, float)) else type(obj).__name__)


def _shape_problem(obj: dict[str, Any]) -> str:
    for key in ("chosen", "rejected"):
        if key not in obj:
            if "transcript" in obj:
                return f"missing key {key!r} (this looks like a red-team row; use `hhrlhf redteam`)"
            return f"missing key {key!r} (keys: {', '.join(sorted(obj)) or 'none'})"
        if type(obj[key]) not in (str, list):
            return f"key {key!r} is {_kind(obj[key])}, not a string or a list of messages"
    return "'chosen' and 'rejected' must both be strings or both be lists of messages"
