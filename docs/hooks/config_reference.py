"""MkDocs hook: the configuration reference is generated from the trainers' config dataclasses.

Every key of every trainer (``pm train``, ``sft``, ``dpo``, ``rl``, ``online``), with its type,
default and meaning, read from the code being documented: the meaning is the comment on the
field's line in the dataclass (or the comment lines just above it), so the page cannot drift
from the code.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import tokenize
import typing
from typing import Any

PAGE = "configuration.md"
MARKER = "<!-- config-reference -->"
# (command, "module:Class"); a module that is missing (an optional part) is left out
TRAINERS = (
    ("hhrlhf pm train", "hhrlhf.pm.config:TrainConfig"),
    ("hhrlhf sft", "hhrlhf.policy.sft:SFTConfig"),
    ("hhrlhf dpo", "hhrlhf.policy.dpo:DPOConfig"),
    ("hhrlhf rl", "hhrlhf.rl.train:RLConfig"),
    ("hhrlhf online", "hhrlhf.online.loop:OnlineConfig"),
)


def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the source of ``cls`` and its dataclass bases (a subclass's
    comment wins: it says what the key means there)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above: list[str] = []
        pending: str | None = None  # a field whose line ended without a comment
        line_of: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if tok.start[0] in line_of:
                    out[line_of[tok.start[0]]] = text
                    pending = None
                else:
                    above.append(text)
            elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_of:
                line_of[tok.start[0]] = tok.string
                if above:
                    out[tok.string] = " ".join(above)
                above = []
                pending = tok.string
            elif tok.type == tokenize.NL and pending is None:
                pass
    return out


def _type(t: Any) -> str:
    name = getattr(t, "__name__", None)
    if typing.get_origin(t) is list:
        return f"list of {_type(typing.get_args(t)[0])}"
    if name is not None and typing.get_origin(t) is None:
        return name
    return str(t).replace("typing.", "")


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value == "" or value == []:
        return "(none)"
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    out: list[str] = []
    for command, spec in TRAINERS:
        module_name, _, class_name = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except ImportError:
            continue
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        out += [f"## `{command}`", "",
                f"`{module_name}.{class_name}`: {len(dataclasses.fields(cls))} keys.", "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            out.append(f"| `{f.name}` | {_cell(_type(hints[f.name]))} | {_cell(_default(f))} "
                       f"| {_cell(comments.get(f.name, ''))} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri != PAGE or MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
