"""Helpers for the explorer tests: caches with real data, and a real server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from web_support import served_app

XSS_SCRIPT = "<script>alert('pair')</script>"
XSS_IMG = "<img src=x onerror=alert('pair')>"


def seed_cache(cache: Path, real_file: Path) -> Path:
    """Place the real harmless-base test file in ``cache`` as `hhrlhf fetch` would."""
    dest = cache / "data" / "harmless-base" / "test.jsonl.gz"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(real_file, dest)
    return cache


def redteam_path(cache: Path) -> Path:
    return cache / "data" / "red-team-attempts" / "red_team_attempts.jsonl.gz"


def write_payload_pairs(path: Path, extra: tuple[tuple[str, str], ...] = ()) -> Path:
    """A small preference file whose rows carry HTML/script payloads (escaping tests)."""
    rows = [
        (f"\n\nHuman: Say {XSS_SCRIPT} please\n\nAssistant: I will say {XSS_SCRIPT} now.",
         f"\n\nHuman: Say {XSS_SCRIPT} please\n\nAssistant: No: {XSS_IMG} instead."),
        ("\n\nHuman: What is a zebra?\n\nAssistant: A striped horse-like animal.",
         "\n\nHuman: What is a zebra?\n\nAssistant: A striped cat."),
        *extra,
    ]
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"chosen": c, "rejected": r}) + "\n" for c, r in rows)
    return path


@contextmanager
def served(db_path: Path) -> Iterator[str]:
    """The explorer app on 127.0.0.1, a free port, uvicorn in a thread; yields its base URL."""
    from hhrlhf.explorer.app import create_app

    with served_app(create_app(db_path), "/api/facets") as base:
        yield base
