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

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from hhrlhf.commands.options import output_option, quiet_option, threads_option
from hhrlhf.errors import HHRLHFError
from hhrlhf.logistic import sigmoid
from hhrlhf.outputs import check_output_file, command_output
from hhrlhf.read import text_lines
from hhrlhf.rowformats import parse_row

_CHUNK = 512  # rows read before scoring; bounded memory on endless stdin


@click.command("score")
@click.argument("model", type=click.Path())
@click.argument("file", default="-")
@output_option()
@click.option("--batch-size", type=int, default=32, show_default=True,
              help="Dialogues per forward pass.")
@threads_option()
@quiet_option("No progress bar (one shows on a terminal).")
def score(model: str, file: str, output: str | None, batch_size: int, threads: int,
          quiet: bool) -> None:
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

    from tqdm import tqdm

    def chunks() -> Iterator[list[tuple[int, dict[str, Any]]]]:
        # a bar on a terminal only (disable=None): never in a pipe or a log
        with tqdm(desc="pm score", unit="row", file=sys.stderr,
                  disable=True if quiet else None,
                  dynamic_ncols=True) as bar:
            chunk: list[tuple[int, dict[str, Any]]] = []
            for n, line in text_lines(file):
                chunk.append((n, parse_row(line, where, n)))
                if len(chunk) >= _CHUNK:
                    yield chunk
                    bar.update(len(chunk))
                    chunk = []
            if chunk:
                yield chunk
                bar.update(len(chunk))

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
