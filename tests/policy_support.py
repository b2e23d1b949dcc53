"""Helpers shared by the policy tests: a tiny policy built from the real file (BPE + Llama)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hhrlhf.policy import Policy, TinyConfig, init_tiny
from hhrlhf.read import read_comparisons
from hhrlhf.records import Comparison

# One torch thread in subprocesses: two threads on a shared 2-core machine wait on each other.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

TINY = TinyConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)


def first_rows(path: Path, n: int) -> list[Comparison]:
    rows = []
    for c in read_comparisons([path]):
        rows.append(c)
        if len(rows) >= n:
            break
    return rows


def build_tiny(rows: list[Comparison], out: Path) -> Policy:
    return init_tiny((c.chosen_raw for c in rows), out, TINY)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread (imported by each policy test module, where it applies to every test):
    on a shared 2-core machine two threads waiting on each other make tiny models slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch, stdin: str | None = None) -> tuple[int, str, str]:
    """``hhrlhf ARGS`` in this process (the real entry point, without a new interpreter's
    start-up): (exit status, stdout, stderr)."""
    import io
    import sys

    from hhrlhf.cli import main

    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def varied_policy(real_file: Path, folder: Path, seed: int = 3) -> Policy:
    """The tiny policy with an untied random LM head (tied random weights make greedy decoding
    repeat one token) whose EOS logit varies: samples end by EOS and by length. ``seed``
    draws the head."""
    policy = build_tiny(first_rows(real_file, 300), folder)
    torch.manual_seed(seed)
    net = policy.net
    net.config.tie_word_embeddings = False
    net.lm_head.weight = torch.nn.Parameter(torch.randn_like(net.lm_head.weight) * 0.3)
    with torch.no_grad():
        net.lm_head.weight[policy.eos_id].normal_(std=0.6)
    policy.save(folder)
    return Policy.load(folder)
