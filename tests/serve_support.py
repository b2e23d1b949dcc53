"""Helpers for the serving tests: a tiny policy with varied samples, and `policy serve`'s app
on 127.0.0.1 (a free port, uvicorn in a thread)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn
from policy_support import build_tiny, first_rows

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


def wait_until_up(base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(base + "/health", timeout=5)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextmanager
def served(policy: Policy, api_key: str | None = None) -> Iterator[str]:
    """`policy serve`'s app for ``policy`` as :data:`MODEL`; yields the base URL (``.../v1``)."""
    from hhrlhf.policy.server import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(policy, MODEL, api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    root = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(root)
        yield root + "/v1"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
