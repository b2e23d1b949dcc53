"""hhrlhf.atomic, the one way files and folders are written: all or nothing, the old file kept
on failure, temporaries of killed writes removed, and no command writing over its own input."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import pytest

from hhrlhf.atomic import (
    atomic_folder,
    atomic_path,
    refuse_overwriting_inputs,
    remove_stale_temps,
    write_text,
)
from hhrlhf.cli import main
from hhrlhf.errors import HHRLHFError


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The command line in-process: (exit status, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _old(path: Path, seconds: float = 2 * 3600) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    out = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("a bad row")
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with atomic_path(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and oct(out.stat().st_mode & 0o777) == "0o644"


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    with atomic_folder(folder) as tmp:
        (tmp / "weights").write_bytes(b"v1")
    with pytest.raises(RuntimeError), atomic_folder(folder) as tmp:
        (tmp / "weights").write_bytes(b"v2 half")
        raise RuntimeError("killed")
    assert (folder / "weights").read_bytes() == b"v1"
    with atomic_folder(folder) as tmp:
        (tmp / "weights").write_bytes(b"v2")
    assert (folder / "weights").read_bytes() == b"v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_stale_temporaries_are_removed_and_fresh_ones_kept(tmp_path: Path) -> None:
    stale_file = tmp_path / ".out.jsonl.abcd1234.tmp"
    stale_dir = tmp_path / ".model.x1y2z3w4.tmp"
    fresh = tmp_path / ".out.jsonl.efgh5678.tmp"
    users = tmp_path / "notes.tmp"  # not hidden: not a name hhrlhf gives
    stale_file.write_text("x")
    stale_dir.mkdir()
    (stale_dir / "weights").write_text("x")
    fresh.write_text("x")
    users.write_text("x")
    for p in (stale_file, stale_dir, users):
        _old(p)
    # Named: only that output's temporaries; unnamed (hhrlhf's own folders): all of them.
    assert remove_stale_temps(tmp_path, "out.jsonl") == [stale_file]
    assert remove_stale_temps(tmp_path) == [stale_dir]
    assert fresh.exists() and users.exists()


def test_refuse_overwriting_inputs_by_inode(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    link, hard = tmp_path / "link.jsonl", tmp_path / "hard.jsonl"
    link.symlink_to(data)
    os.link(data, hard)
    for out in (data, link, hard):
        with pytest.raises(HHRLHFError, match="is one of the inputs"):
            refuse_overwriting_inputs(out, [data])
    with pytest.raises(HHRLHFError, match="is one of the inputs"):  # the input named by a link
        refuse_overwriting_inputs(data, [link])
    refuse_overwriting_inputs(tmp_path / "new.jsonl", [data])  # does not exist: fine
    other = tmp_path / "other.jsonl"
    other.write_text("{}\n")
    refuse_overwriting_inputs(other, [data])


# --- every command that writes a file the user names -----------------------------------------


@pytest.fixture
def data(tmp_path: Path, cache: Path, real_file: Path) -> Path:
    """The real rows as a plain JSON-lines file (first 300 rows: quick)."""
    with gzip.open(real_file, "rb") as fh:
        lines = fh.read().splitlines(keepends=True)[:300]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def _assert_refused(code: int, err: str, out: Path, data: Path, before: bytes) -> None:
    assert code == 2
    assert err.startswith(f"hhrlhf: error: {out}: is one of the inputs") and err.count("\n") == 1
    assert data.read_bytes() == before


def test_report_refuses_to_write_over_its_input(data: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    before = data.read_bytes()
    _assert_refused(*_run(capsys, "report", str(data), "-o", str(data)), data, data, before)


def test_stats_plot_refuses_to_write_over_its_input(data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = data.read_bytes()
    link = tmp_path / "plot.png"
    link.symlink_to(data)
    _assert_refused(*_run(capsys, "stats", str(data), "--plot", str(link)), link, data, before)


def test_pm_score_refuses_to_write_over_its_rows_or_its_model(
        data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hhrlhf.pm.lexical import LexicalConfig, LexicalPreferenceModel
    from hhrlhf.read import read_comparisons

    model = tmp_path / "pm"
    LexicalPreferenceModel.fit(list(read_comparisons(data)),
                               LexicalConfig(n_features=2**12)).save(model)
    before = data.read_bytes()
    _assert_refused(*_run(capsys, "pm", "score", str(model), str(data), "-o", str(data)),
                    data, data, before)
    marker = model / "hhrlhf_pm.json"
    marker_before = marker.read_bytes()
    _assert_refused(*_run(capsys, "pm", "score", str(model), str(data), "-o", str(marker)),
                    marker, marker, marker_before)
    # Anywhere else it writes, atomically.
    out = tmp_path / "scores.jsonl"
    assert _run(capsys, "pm", "score", str(model), str(data), "-o", str(out))[0] == 0
    assert len(out.read_text().splitlines()) == 300
    assert not list(tmp_path.glob(".*.tmp"))
