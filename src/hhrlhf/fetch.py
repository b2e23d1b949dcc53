"""Fetching into the cache, verified. (Placeholder: being written.)"""

from __future__ import annotations

from pathlib import Path

from hhrlhf.registry import DataFile, cached_path


def local_path(f: DataFile) -> Path | None:
    """The cached, verified file, or None when it is not in the cache."""
    p = cached_path(f)
    return p if p.exists() else None
