"""Fixtures for every test. Tests use the real harmless-base test file that the repository carries
in tests/data/hh-rlhf (Anthropic's, MIT; see the LICENSE beside it), laid out as a mirror of the
official files, so the suite runs from a fresh clone with nothing beside it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A mirror of the official layout holding one real file (harmless-base/test; every other is a 404).
MIRROR = ROOT / "tests" / "data" / "hh-rlhf"
REAL_TEST_FILE = MIRROR / "harmless-base" / "test.jsonl.gz"
REAL_ROWS = 2312

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_file() -> Path:
    assert REAL_TEST_FILE.exists(), f"the real data file is missing: {REAL_TEST_FILE}"
    return REAL_TEST_FILE


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hhrlhf cache directory for this test (HHRLHF_CACHE points at it)."""
    d = tmp_path / "cache"
    d.mkdir()
    monkeypatch.setenv("HHRLHF_CACHE", str(d))
    monkeypatch.delenv("HHRLHF_MIRROR", raising=False)
    monkeypatch.delenv("HHRLHF_OFFLINE", raising=False)
    return d


@pytest.fixture
def seeded_cache(cache: Path, real_file: Path) -> Path:
    """A cache holding the real harmless-base test file, placed as `hhrlhf fetch` would."""
    import shutil

    dest = cache / "data" / "harmless-base" / "test.jsonl.gz"
    dest.parent.mkdir(parents=True)
    shutil.copyfile(real_file, dest)
    return cache


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a test marked ``slow`` first: with one worker per core (scripts/test.sh), the
    longest file starts at once instead of being the last thing the suite waits for."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order kept otherwise
