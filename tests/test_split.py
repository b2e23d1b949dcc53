"""`hhrlhf split`: train and test files grouped by prompt, in the official format."""

from __future__ import annotations

from pathlib import Path

import pytest

from hhrlhf.audit import prompt_text
from hhrlhf.cli import main
from hhrlhf.read import read_comparisons


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_split_keeps_each_prompt_in_one_file(real_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["split", str(real_file), "--folds", "5", "--fold", "1", "--out",
                           str(tmp_path / "f")], capsys)
    assert code == 0, err
    train = list(read_comparisons(tmp_path / "f" / "train.jsonl"))
    test = list(read_comparisons(tmp_path / "f" / "test.jsonl"))
    everything = list(read_comparisons(real_file))
    assert len(train) + len(test) == len(everything) == 2312
    assert 300 < len(test) < 600
    assert not {prompt_text(c) for c in train} & {prompt_text(c) for c in test}
    # the rows as published, in file order
    pairs = [(c.chosen_raw, c.rejected_raw) for c in everything]
    kept = [(c.chosen_raw, c.rejected_raw) for c in train]
    assert kept == [p for p in pairs if p in set(kept)]
    assert f"{len(test):,} rows (fold 1)" in out
    # another fold holds other rows
    _run(["split", str(real_file), "--fold", "2", "--out", str(tmp_path / "g")], capsys)
    other = {c.chosen_raw for c in read_comparisons(tmp_path / "g" / "test.jsonl")}
    assert not other & {c.chosen_raw for c in test}


@pytest.mark.parametrize(("args", "needle"), [
    (["--folds", "1"], "--folds must be at least 2"),
    (["--fold", "5"], "--fold must be in 0..4"),
])
def test_bad_settings_are_one_line(real_file: Path, tmp_path: Path, args: list[str],
                                   needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["split", str(real_file), *args, "--out", str(tmp_path)], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1


def test_split_never_writes_over_its_input(real_file: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _run(["split", str(real_file), "--out", str(tmp_path)], capsys)
    before = (tmp_path / "train.jsonl").read_bytes()
    code, _, err = _run(["split", str(tmp_path / "train.jsonl"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "refusing to write over it" in err
    assert (tmp_path / "train.jsonl").read_bytes() == before


def test_split_replaces_only_its_own_files(real_file: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["split", str(real_file), "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert _run(["split", str(real_file), "--fold", "3", "--out", str(tmp_path / "a")],
                capsys)[0] == 0  # its own earlier output
    mine = tmp_path / "b" / "test.jsonl"
    mine.parent.mkdir()
    mine.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo", "rejected": "x"}\n')
    code, _, err = _run(["split", str(real_file), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "was not written by `hhrlhf split`" in err
    assert not (tmp_path / "b" / "train.jsonl").exists()  # checked before anything is written
