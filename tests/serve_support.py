"""Helpers for the serving tests: `policy serve`'s app on 127.0.0.1 (a free port, uvicorn in a
thread)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from web_support import served_app

from hhrlhf.policy import Policy

MODEL = "tiny-hh"


@contextmanager
def served(policy: Policy, api_key: str | None = None) -> Iterator[str]:
    """`policy serve`'s app for ``policy`` as :data:`MODEL`; yields the base URL (``.../v1``)."""
    from hhrlhf.policy.server import create_app

    with served_app(create_app(policy, MODEL, api_key=api_key), "/health") as root:
        yield root + "/v1"


