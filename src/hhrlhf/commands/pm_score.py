"""`hhrlhf pm score MODEL [FILE|-]`: score dialogues with a saved preference model.

Input, one row per line (a ``.gz`` file is read decompressed; ``-`` or nothing is stdin):

- ``{"text": "\\n\\nHuman: ...\\n\\nAssistant: ..."}``: one dialogue in the HH format
  -> ``{"line": 1, "score": 0.73}``
- ``{"chosen": "...", "rejected": "..."}``: a preference row as in the published files
  -> ``{"line": 2, "chosen": 0.91, "rejected": -0.12, "p_chosen": 0.738}``
  (``p_chosen`` = sigmoid(chosen - rejected), the model's probability that chosen is preferred)
- a JSON string, or a plain line: one dialogue; in a plain line ``\\n`` (backslash, n) stands for
  a newline, so ``Human: hi\\n\\nAssistant: hello`` is a two-turn dialogue.

An ``"id"`` field in an object is copied to its output row. Output is JSON Lines on stdout, or
written to ``--output`` atomically. Rows are scored in chunks, so stdin can be a stream.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from hhrlhf.commands.options import threads_option
from hhrlhf.errors import HHRLHFError
from hhrlhf.logistic import sigmoid
from hhrlhf.outputs import check_output_file, command_output

_CHUNK = 512  # rows read before scoring; bounded memory on endless stdin


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines of ``path`` (``-``: stdin), numbered; none at all is the one "no
    rows" error every reader gives (an empty input is a mistake, not an empty result)."""
    if path == "-":
        fh: IO[str] = sys.stdin
    else:
        p = Path(path)
        if not p.is_file():
            raise HHRLHFError("no such file", p)
        fh = gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz" else open(  # noqa: SIM115
            p, encoding="utf-8")
    n = rows = 0
    try:
        for n, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                rows += 1
                yield n, line
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise HHRLHFError(f"unreadable input: {e}", path) from None
    finally:
        if fh is not sys.stdin:
            fh.close()
    if not rows:
        noun = "stdin" if path == "-" else "the file"
        raise HHRLHFError(f"no rows: {noun} " + ("is empty" if not n else
                                                 "holds only blank lines"),
                          "<stdin>" if path == "-" else path)


def parse_row(line: str, where: str, n: int) -> dict[str, Any]:
    """One input line -> {"kind": "text"|"pair", ...}; a bad row is an HHRLHFError."""
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
            if not (isinstance(obj.get("chosen"), str) and isinstance(obj.get("rejected"), str)):
                raise HHRLHFError("a pair row needs string fields chosen and rejected", where, n)
            return {"kind": "pair", "chosen": obj["chosen"], "rejected": obj["rejected"], **extra}
        if isinstance(obj.get("text"), str):
            return {"kind": "text", "text": obj["text"], **extra}
        raise HHRLHFError('expected {"text": ...} or {"chosen": ..., "rejected": ...}', where, n)
    return {"kind": "text", "text": line.replace("\\n", "\n")}


@click.command("score")
@click.argument("model", type=click.Path())
@click.argument("file", default="-")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write here (atomically) instead of stdout.")
@click.option("--batch-size", type=int, default=32, show_default=True,
              help="Dialogues per forward pass.")
@threads_option()
def score(model: str, file: str, output: str | None, batch_size: int, threads: int) -> None:
    """Score dialogues from FILE (or stdin) with the preference model in folder MODEL."""
    from hhrlhf.commands.pm import model_folder

    if batch_size < 1:
        raise HHRLHFError("--batch-size must be at least 1")
    folder = model_folder(model, "score")
    if file != "-" and not Path(file).is_file():
        raise HHRLHFError("no such file", file)
    if output is not None:  # neither the rows nor the model may be overwritten
        check_output_file(output, "pm score", inputs=[file, folder])

    from hhrlhf.pm.base import load
    from hhrlhf.records import Comparison, Dialogue

    pm = load(folder)
    if getattr(pm, "kind", "") == "neural" and threads > 0:
        import torch

        torch.set_num_threads(threads)
    where = "<stdin>" if file == "-" else file

    def chunks() -> Iterator[list[tuple[int, dict[str, Any]]]]:
        chunk: list[tuple[int, dict[str, Any]]] = []
        for n, line in _lines(file):
            chunk.append((n, parse_row(line, where, n)))
            if len(chunk) >= _CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def scored(chunk: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        texts = [(i, r) for i, (_, r) in enumerate(chunk) if r["kind"] == "text"]
        pairs = [(i, r) for i, (_, r) in enumerate(chunk) if r["kind"] == "pair"]
        out: list[dict[str, Any]] = [{"line": n} for n, _ in chunk]
        for i, (_, r) in enumerate(chunk):
            if "id" in r:
                out[i]["id"] = r["id"]
        if texts:
            s = pm.score([Dialogue.parse(r["text"]) for _, r in texts], batch_size)
            for (i, _), v in zip(texts, s):
                out[i]["score"] = round(float(v), 6)
        if pairs:
            comps = [Comparison.from_strings(r["chosen"], r["rejected"], line=chunk[i][0])
                     for i, r in pairs]
            c, rj = pm.score_pairs(comps, batch_size)
            for (i, _), a, b in zip(pairs, c, rj):
                out[i].update(chosen=round(float(a), 6), rejected=round(float(b), 6),
                              p_chosen=round(sigmoid(float(a) - float(b)), 6))
        return out

    if output is None:
        for chunk in chunks():
            for row in scored(chunk):
                sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()
        return
    with command_output(output, "pm score", inputs=[file]) as tmp, \
            open(tmp, "w", encoding="utf-8") as fh:
        for chunk in chunks():
            for row in scored(chunk):
                fh.write(json.dumps(row) + "\n")
