"""The explorer's database is never written over another file, never loses a file to a
concurrent build, and a damaged one is a clear message and a rebuild, never a 500."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from explorer_support import served, write_payload_pairs

from hhrlhf.cli import main
from hhrlhf.explorer.index import (
    APPLICATION_ID,
    IndexConfig,
    build_index,
    check_index,
    is_hhrlhf_index,
)
from hhrlhf.explorer.query import ExplorerDB, SearchParams

HHRLHF = Path(sys.executable).with_name("hhrlhf")


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _sources(db: Path) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sources")}
    finally:
        con.close()


def _quiet() -> IndexConfig:
    return IndexConfig(progress=False, stats_plot=False)


def test_index_refuses_to_replace_a_file_that_is_not_an_index(
        seeded_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_payload_pairs(tmp_path / "data.jsonl")
    other = tmp_path / "notes.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes(t TEXT)")
    con.execute("INSERT INTO notes VALUES ('mine')")
    con.commit()
    con.close()
    for target in (data, other):
        before = target.read_bytes()
        code, err = _run(capsys, "index", str(data), "--db", str(target))
        assert code == 2
        assert err == (f"hhrlhf: error: {target}: exists and is not an hhrlhf index; refusing "
                       "to replace it: give another --db (or delete the file if it is a "
                       "damaged index)\n")
        assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data.jsonl", "notes.sqlite"]


def test_an_index_is_marked_and_rebuilding_it_still_works(seeded_cache: Path,
                                                          tmp_path: Path) -> None:
    db = tmp_path / "x.sqlite"
    build_index(IndexConfig(db_path=db, progress=False, stats_plot=False))
    with open(db, "rb") as fh:
        assert int.from_bytes(fh.read(100)[68:72], "big") == APPLICATION_ID
    assert is_hhrlhf_index(db) and check_index(db) is None
    report = build_index(IndexConfig(db_path=db, rebuild=True, progress=False, stats_plot=False))
    assert report.wrote and [c.action for c in report.changes] == ["rebuilt"]
    # An index built before the mark existed (application id 0) is still recognised, and
    # marked at its next build.
    con = sqlite3.connect(db)
    con.execute("PRAGMA application_id = 0")
    con.commit()
    con.close()
    assert is_hhrlhf_index(db)
    local = write_payload_pairs(tmp_path / "local.jsonl")
    build_index(IndexConfig(db_path=db, paths=(local,), progress=False, stats_plot=False))
    with open(db, "rb") as fh:
        assert int.from_bytes(fh.read(100)[68:72], "big") == APPLICATION_ID
    assert _sources(db) == {"harmless-base/test", "local.jsonl"}


def test_two_builds_at_once_both_end_up_in_the_index(seeded_cache: Path,
                                                     tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite"
    a = write_payload_pairs(tmp_path / "a.jsonl")
    b = write_payload_pairs(tmp_path / "b.jsonl")
    env = {**os.environ, "HHRLHF_CACHE": str(seeded_cache)}
    procs = [subprocess.Popen([str(HHRLHF), "index", str(p), "--db", str(db)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in (a, b)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert _sources(db) == {"harmless-base/test", "a.jsonl", "b.jsonl"}
    assert ExplorerDB(db).search(SearchParams(q="zebra")).total == 2
    assert not list(tmp_path.glob(".shared.sqlite.*.tmp"))


def _damage(db: Path, start: int = 4096) -> None:
    """Garbage over the pages from ``start`` on (the first holds the schema), in place."""
    size = db.stat().st_size
    with open(db, "r+b") as fh:
        fh.seek(start)
        fh.write(bytes([0xA5]) * (size - start))


def test_a_damaged_database_is_a_message_not_a_500_and_index_rebuilds_it(
        seeded_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    local = write_payload_pairs(tmp_path / "local.jsonl")
    db = build_index(IndexConfig(paths=(local,), progress=False, stats_plot=False)).db_path
    _damage(db)
    assert is_hhrlhf_index(db)
    assert check_index(db) is not None
    with served(db) as base:
        for path in ("/api/search?q=zebra", "/api/overview", "/api/facets"):
            r = httpx.get(base + path, timeout=30)
            assert r.status_code == 503, (path, r.text)
            detail = r.json()["detail"]
            assert detail.startswith(f"{db}: the explorer database cannot be read (")
            assert detail.endswith("); build it again with `hhrlhf index --rebuild`")
        r = httpx.get(base + "/", timeout=30)
        assert r.status_code == 503 and "build it again with" in r.text

        code, err = _run(capsys, "index")
        assert code == 0
        assert err.startswith(f"hhrlhf: note: the index {db} is damaged (")
        assert err.endswith("); building it again\n") and err.count("\n") == 1
        assert check_index(db) is None
        # Every page was lost, the list of local files too: the cache's files are back, and
        # the running server answers again.
        assert _sources(db) == {"harmless-base/test"}
        r = httpx.get(base + "/api/search", params={"q": "pizza"}, timeout=30)
        assert r.status_code == 200 and r.json()["total"] > 0


def test_a_rebuild_keeps_the_local_files_a_damaged_index_still_names(
        seeded_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    local = write_payload_pairs(tmp_path / "local.jsonl")
    db = build_index(IndexConfig(paths=(local,), progress=False, stats_plot=False)).db_path
    _damage(db, start=db.stat().st_size // 2)  # the texts' pages; the small tables survive
    assert check_index(db) is not None and _sources(db) == {"harmless-base/test",
                                                            "local.jsonl"}
    code, err = _run(capsys, "index")
    assert code == 0 and err.count("\n") == 1 and "is damaged (" in err
    assert check_index(db) is None
    assert _sources(db) == {"harmless-base/test", "local.jsonl"}
    assert ExplorerDB(db).search(SearchParams(q="zebra")).total == 1
