"""Export preference rows for trainers and query engines: TRL, OpenAI chat, or every field.

Formats (:data:`FORMATS`), each written as Parquet or JSON lines, picked by the output's
extension (:data:`CONTAINERS`):

- ``trl``: TRL's conversational preference format: ``prompt`` a list of ``{role, content}``
  messages (roles ``user``/``assistant``), ``chosen`` and ``rejected`` one assistant message each;
- ``trl-text``: TRL's standard preference format: plain strings in the original turn format,
  ``prompt`` ending with ``"\\n\\nAssistant:"`` and each response starting with its separator
  (normally a space), so ``prompt + chosen`` and ``prompt + rejected`` are the published strings;
- ``openai``: one chat per row, ``{"messages": [...]}``, the chosen dialogue;
- ``parquet``: every field and per-row flag (:data:`hhrlhf.table.SCHEMA`), for DuckDB, Spark,
  Polars or pandas (named for its main use; ``.jsonl`` also works).

Rows a format cannot hold (:data:`UNREPRESENTABLE`) are left out and counted, never mangled:
in ``trl`` and ``trl-text`` a row whose rejected dialogue has another prompt
(``context_mismatch``) or lacks a final Assistant response (``final_turn_not_assistant``);
in ``trl`` also text before the first turn (``malformed_dialogue``) and a dialogue with no turn
before the final response (``empty_prompt``: TRL needs one prompt message); in ``openai`` a chosen
dialogue that does not end with an Assistant turn or has text before its first turn. Every other
flagged row is kept as it is (its text unchanged); ``drop`` leaves out rows that checks flag.

The output is written with :func:`hhrlhf.atomic.atomic_path`: a failure leaves no half-written
file, and an output that is one of the sources (by inode: through a symlink or a hard link too)
is refused before anything is read.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa

from hhrlhf.atomic import atomic_path, refuse_overwriting_inputs
from hhrlhf.errors import HHRLHFError
from hhrlhf.outputs import check_output_file, mark_output
from hhrlhf.read import Source
from hhrlhf.records import ASSISTANT, Comparison, Turn, render_turns
from hhrlhf.rowformats import to_messages
from hhrlhf.table import BATCH_ROWS, SCHEMA, arrow_to_comparisons, source_table

FORMATS: dict[str, str] = {
    "trl": "TRL conversational preference: prompt/chosen/rejected as {role, content} messages",
    "trl-text": "TRL standard preference: prompt/chosen/rejected as plain strings",
    "openai": "OpenAI chat fine-tuning: {\"messages\": [...]} of the chosen dialogue",
    "parquet": "every field and per-row flag, for DuckDB, Spark, Polars or pandas",
}
CONTAINERS: dict[str, str] = {".parquet": "parquet", ".jsonl": "jsonl"}

# Per format: the reasons a row cannot be written in it, and why (shown in docs and --help).
UNREPRESENTABLE: dict[str, dict[str, str]] = {
    "trl": {
        "final_turn_not_assistant": "a dialogue has no final Assistant response",
        "context_mismatch": "the rejected dialogue has another prompt",
        "malformed_dialogue": "text before the first turn has no message to go in",
        "empty_prompt": "no turn before the final response (TRL needs a prompt message)",
    },
    "trl-text": {
        "final_turn_not_assistant": "a dialogue has no final Assistant response",
        "context_mismatch": "the rejected dialogue has another prompt",
    },
    "openai": {
        "final_turn_not_assistant": "the chosen dialogue does not end with an Assistant turn",
        "malformed_dialogue": "the chosen dialogue has text before its first turn, or no turns",
    },
    "parquet": {},
}

_ASSISTANT_MARKER = Turn(ASSISTANT, "", "").render()  # "\n\nAssistant:", from records
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
OUTPUT_SCHEMAS: dict[str, pa.Schema] = {
    "trl": pa.schema([("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES)]),
    "trl-text": pa.schema([("prompt", pa.string()), ("chosen", pa.string()),
                           ("rejected", pa.string())]),
    "openai": pa.schema([("messages", MESSAGES)]),
    "parquet": SCHEMA,
}


@dataclass
class ExportResult:
    """What an export wrote and left out (each left-out row counted once, under one reason)."""

    out: Path
    format: str
    container: str
    rows_read: int
    rows_written: int
    dropped: dict[str, int] = field(default_factory=dict)  # --drop check -> rows
    unrepresentable: dict[str, int] = field(default_factory=dict)  # reason -> rows

    def summary(self) -> str:
        """One line: rows written, and rows left out per check / reason."""
        line = (f"wrote {self.rows_written:,} of {self.rows_read:,} rows to {self.out} "
                f"({self.format}, {self.container})")
        if self.dropped:
            line += "; dropped " + ", ".join(f"{k} {v:,}" for k, v in self.dropped.items())
        if self.unrepresentable:
            line += f"; not representable in {self.format}, left out " + ", ".join(
                f"{k} {v:,}" for k, v in self.unrepresentable.items())
        return line


def container_of(out: str | Path) -> str:
    """``parquet`` or ``jsonl`` from the output's extension; anything else is an error."""
    suffix = Path(out).suffix.lower()
    if suffix not in CONTAINERS:
        raise HHRLHFError(f"cannot tell the container from the extension {suffix or '(none)'!r}; "
                          f"use one of {', '.join(CONTAINERS)}", out)
    return CONTAINERS[suffix]


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise HHRLHFError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return fmt


def parse_drop(values: Iterable[str]) -> list[str]:
    """Check names from ``--drop a --drop b,c`` (``all``: every check); unknown names error."""
    from hhrlhf.audit import parse_check_names

    return parse_check_names(values)


def unrepresentable_reason(fmt: str, c: Comparison) -> str | None:
    """Why ``c`` cannot be written in ``fmt`` (a key of :data:`UNREPRESENTABLE`), or None."""
    flags = c.flags
    if fmt == "trl" or fmt == "trl-text":
        # A missing final response first: without one, the two "prompts" are not prompts.
        if "final_turn_not_assistant" in flags:
            return "final_turn_not_assistant"
        if "context_mismatch" in flags:
            return "context_mismatch"
        if fmt == "trl":
            if "malformed_dialogue" in flags:
                return "malformed_dialogue"
            if not c.prompt:
                return "empty_prompt"
        return None
    if fmt == "openai":
        d = c.chosen_dialogue
        if not d.turns or d.preamble:
            return "malformed_dialogue"
        if d.turns[-1].role != ASSISTANT:
            return "final_turn_not_assistant"
        return None
    return None


def to_trl(c: Comparison) -> dict[str, Any]:
    return {
        "prompt": to_messages(c.prompt),
        "chosen": [{"role": "assistant", "content": c.chosen}],
        "rejected": [{"role": "assistant", "content": c.rejected}],
    }


def to_trl_text(c: Comparison) -> dict[str, Any]:
    """Strings such that ``prompt + chosen == chosen_raw`` and ``prompt + rejected ==
    rejected_raw`` (for the rows this format holds: one shared context, final Assistant turns)."""
    chosen_d, rejected_d = c.chosen_dialogue, c.rejected_dialogue
    assert chosen_d.final is not None and rejected_d.final is not None
    return {
        "prompt": chosen_d.preamble + render_turns(c.prompt) + _ASSISTANT_MARKER,
        "chosen": chosen_d.final.sep + c.chosen,
        "rejected": rejected_d.final.sep + c.rejected,
    }


def to_openai(c: Comparison) -> dict[str, Any]:
    return {"messages": to_messages(c.chosen_dialogue.turns)}


ROW_BUILDERS: dict[str, Callable[[Comparison], dict[str, Any]]] = {
    "trl": to_trl,
    "trl-text": to_trl_text,
    "openai": to_openai,
}


class _Sink:
    """Rows (dicts or record batches of the output schema) into a temporary file."""

    def __init__(self, path: Path, container: str, schema: pa.Schema):
        self.container, self.schema = container, schema
        if container == "parquet":
            import pyarrow.parquet as pq

            self._writer: Any = pq.ParquetWriter(str(path), schema, compression="zstd")
        else:
            self._writer = open(path, "wb")  # noqa: SIM115 (closed in close())

    def write(self, rows: list[dict[str, Any]] | pa.RecordBatch) -> None:
        if self.container == "parquet":
            batch = rows if isinstance(rows, pa.RecordBatch) else pa.RecordBatch.from_pylist(
                rows, schema=self.schema)
            if batch.num_rows:
                self._writer.write_batch(batch)
            return
        dumps, opt = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        pylist = rows.to_pylist() if isinstance(rows, pa.RecordBatch) else rows
        self._writer.write(b"".join([dumps(r, option=opt) for r in pylist]))

    def close(self) -> None:
        self._writer.close()


def _cross_row_flagger(sources: Sequence[Source], progress: bool = True
                       ) -> Callable[[Comparison], set[str]]:
    """``flags_of`` of an audit of ``sources``, labelled as ``hhrlhf audit`` labels them."""
    from hhrlhf.audit import Auditor

    auditor = Auditor()
    for src in sources:
        name = src.label
        for c in arrow_to_comparisons(source_table(src, progress=progress)[0]):
            auditor.add(c, name, src.split)
    return auditor.result().flags_of


def export(sources: str | Path | Sequence[str | Path], fmt: str, out: str | Path, *,
           split: str | None = None, drop: Iterable[str] = (), progress: bool = True
           ) -> ExportResult:
    """Write the rows of ``sources`` (subsets, ``subset/split``, paths; none: every preference
    file in the cache) in ``fmt`` to ``out``, leaving out rows flagged by a ``drop`` check.

    Cross-row checks (``duplicate_pair``, ``repeated_prompt``, ``train_test_overlap``) are
    computed as ``hhrlhf audit SOURCES`` computes them: over the named sources with both
    splits, whatever ``split`` says, so ``--split train --drop train_test_overlap`` leaves out
    the train rows whose prompt is also in a test file. ``progress``: a progress bar on a
    terminal's stderr.
    """
    from tqdm import tqdm

    from hhrlhf.audit import CROSS_ROW_CHECKS
    from hhrlhf.read import preference_sources

    fmt = check_format(fmt)
    out = Path(out)
    container = container_of(out)
    if out.is_dir():
        raise HHRLHFError("is a directory; give a file name", out)
    checks = parse_drop(drop)
    names = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    srcs = preference_sources(names, split)
    # Every file read (both splits when cross-row checks are computed): never the output.
    inputs = [s.path for s in srcs]
    check_output_file(out, "export", inputs=inputs)
    flags_of = None
    if any(c in CROSS_ROW_CHECKS for c in checks):
        audited = preference_sources(names, None)
        inputs += [s.path for s in audited]
        refuse_overwriting_inputs(out, inputs)
        flags_of = _cross_row_flagger(audited, progress)

    result = ExportResult(out, fmt, container, 0, 0)
    dropped: Counter[str] = Counter()
    unrepresentable: Counter[str] = Counter()
    build = ROW_BUILDERS.get(fmt)

    def write_rows(sink: _Sink, bar: Any) -> None:
        # Sources are read (or mapped from the table cache) one at a time, while writing.
        for src in srcs:
            table = source_table(src, progress=progress)[0]
            bar.total = (bar.total or 0) + table.num_rows
            bar.refresh()
            for batch in table.to_batches(max_chunksize=BATCH_ROWS):
                keep: list[bool] = []
                rows: list[dict[str, Any]] = []
                if build is None and flags_of is None:  # every field: the flags column suffices
                    for flag_list in batch.column("flags").to_pylist():
                        hit = next((name for name in checks if name in flag_list), None)
                        if hit:
                            dropped[hit] += 1
                        keep.append(not hit)
                    result.rows_read += len(keep)
                    result.rows_written += sum(keep)
                    sink.write(batch.filter(pa.array(keep, pa.bool_())))
                    bar.update(len(keep))
                    continue
                for c in arrow_to_comparisons(batch):
                    flags = flags_of(c) if flags_of is not None else c.flags
                    hit = next((name for name in checks if name in flags), None)
                    why = None if hit else unrepresentable_reason(fmt, c)
                    if hit:
                        dropped[hit] += 1
                    elif why:
                        unrepresentable[why] += 1
                    elif build is not None:
                        rows.append(build(c))
                    keep.append(not hit and not why)
                result.rows_read += len(keep)
                result.rows_written += sum(keep)
                sink.write(rows if build is not None else batch.filter(pa.array(keep, pa.bool_())))
                bar.update(len(keep))

    try:
        with atomic_path(out, inputs=inputs) as tmp:
            sink = _Sink(tmp, container, OUTPUT_SCHEMAS[fmt])
            try:
                with tqdm(total=None, desc=f"exporting {fmt}", unit=" rows",
                          disable=None if progress else True,
                          file=sys.stderr, leave=False) as bar:
                    write_rows(sink, bar)
            finally:
                sink.close()
    except OSError as e:
        raise HHRLHFError(f"cannot write: {e.strerror or e}", out) from None
    mark_output(out, "export")
    result.dropped = {k: dropped[k] for k in checks if dropped[k]}
    result.unrepresentable = {k: unrepresentable[k] for k in UNREPRESENTABLE[fmt]
                              if unrepresentable[k]}
    return result
