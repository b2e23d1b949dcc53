"""Helpers for the serving tests: a tiny policy with varied samples, and `policy serve`'s app
on 127.0.0.1 (a free port, uvicorn in a thread)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from policy_support import build_tiny, first_rows
from web_support import served_app

from hhrlhf.policy import Policy

MODEL = "tiny-hh"


def varied_policy(real_file: Path, folder: Path) -> Policy:
    """The tiny policy with an untied random LM head (tied random weights make greedy decoding
    repeat one token) whose EOS logit varies: samples end by EOS and by length."""
    policy = build_tiny(first_rows(real_file, 300), folder)
    torch.manual_seed(3)
    net = policy.net
    net.config.tie_word_embeddings = False
    net.lm_head.weight = torch.nn.Parameter(torch.randn_like(net.lm_head.weight) * 0.3)
    with torch.no_grad():
        net.lm_head.weight[policy.eos_id].normal_(std=0.6)
    policy.save(folder)
    return Policy.load(folder)


@contextmanager
def served(policy: Policy, api_key: str | None = None) -> Iterator[str]:
    """`policy serve`'s app for ``policy`` as :data:`MODEL`; yields the base URL (``.../v1``)."""
    from hhrlhf.policy.server import create_app

    with served_app(create_app(policy, MODEL, api_key=api_key), "/health") as root:
        yield root + "/v1"


