"""hhrlhf.read on bad input: every problem is one HHRLHFError naming the file (and line)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REAL_ROWS

from hhrlhf.errors import HHRLHFError
from hhrlhf.read import read_comparisons, read_redteam

REDTEAM_FIELDS = (
    "transcript", "min_harmlessness_score_transcript", "num_params", "model_type", "rating",
    "task_description", "task_description_harmlessness_score", "red_team_member_id",
    "is_upworker", "tags",
)


def row(i: int) -> dict[str, str]:
    return {"chosen": f"\n\nHuman: question {i}\n\nAssistant: good {i}",
            "rejected": f"\n\nHuman: question {i}\n\nAssistant: bad {i}"}


def jsonl(*objs: Any) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def error_of(source: str | Path, reader: Any = read_comparisons) -> HHRLHFError:
    with pytest.raises(HHRLHFError) as e:
        list(reader(source))
    return e.value


# ------------------------------------------------------------------------------------- gzip


def test_corrupt_gzip_data(tmp_path: Path, real_file: Path) -> None:
    data = bytearray(real_file.read_bytes())
    for k in range(1000, 1050):  # scramble deflate data near the start
        data[k] ^= 0xA5
    p = write(tmp_path, "corrupt.jsonl.gz", bytes(data))
    e = error_of(p)
    assert e.path == str(p) and e.line is None
    assert str(e).startswith(f"{p}: cannot read: the gzip data is corrupt (")


def test_gzip_checksum_mismatch(tmp_path: Path, real_file: Path) -> None:
    data = bytearray(real_file.read_bytes())
    data[-6] ^= 0x01  # the CRC-32 in the trailer: every row decodes, the check at the end fails
    p = write(tmp_path, "crc.jsonl.gz", bytes(data))
    e = error_of(p)
    assert e.path == str(p) and "CRC check failed" in str(e)


@pytest.mark.parametrize("keep", [100, 400_000])
def test_truncated_gzip(tmp_path: Path, real_file: Path, keep: int) -> None:
    p = write(tmp_path, "truncated.jsonl.gz", real_file.read_bytes()[:keep])
    e = error_of(p)
    assert e.path == str(p)
    assert str(e).startswith(f"{p}: cannot read: the file is truncated")


def test_gzipped_json_lines_and_array(tmp_path: Path) -> None:
    lines = write(tmp_path, "rows.jsonl.gz", gzip.compress(jsonl(row(0), row(1)).encode()))
    array = write(tmp_path, "rows.json.gz",
                  gzip.compress(json.dumps([row(0), row(1)], indent=2).encode()))
    assert [c.chosen for c in read_comparisons(lines)] == ["good 0", "good 1"]
    assert [c.line for c in read_comparisons(array)] == [2, 6]


# ------------------------------------------------------------------------------- JSON lines


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "bad.jsonl", jsonl(row(0)) + "\n" + jsonl(row(1)) + '{"chosen": "x",\n')
    e = error_of(p)
    assert (e.path, e.line) == (str(p), 4)  # the blank line 2 still counts
    assert str(e).startswith(f"{p}:4: not valid JSON: ")


def test_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    p = write(tmp_path, "gaps.jsonl", "\n" + jsonl(row(0)) + "\n  \n" + jsonl(row(1)))
    assert [(c.line, c.index) for c in read_comparisons(p)] == [(2, 0), (5, 1)]


@pytest.mark.parametrize(("bad_row", "message"), [
    ({"chosen": "\n\nHuman: hi\n\nAssistant: yo"}, "missing key 'rejected' (keys: chosen)"),
    ({"chosen": "x", "rejected": 3}, "key 'rejected' is a number, not a string or a list of messages"),
    ({"chosen": None, "rejected": "x"}, "key 'chosen' is null, not a string or a list of messages"),
    (["chosen", "rejected"], "expected an object with 'chosen' and 'rejected', got an array"),
    ("just text", "expected an object with 'chosen' and 'rejected', got a string"),
])
def test_row_of_the_wrong_shape(tmp_path: Path, bad_row: Any, message: str) -> None:
    p = write(tmp_path, "shape.jsonl", jsonl(row(0), row(1), bad_row))
    e = error_of(p)
    assert str(e) == f"{p}:3: {message}"


def test_redteam_row_read_as_comparison_says_so(tmp_path: Path) -> None:
    p = write(tmp_path, "rt.jsonl", jsonl(redteam_row(0)))
    assert "this looks like a red-team row; use `hhrlhf redteam`" in str(error_of(p))


# ------------------------------------------------------------------------- paths and names


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    e = error_of(missing)
    assert e.path == str(missing) and "no such file, and not a subset name" in str(e)
    e = error_of(tmp_path)
    assert str(e) == f"{tmp_path}: is a directory, not a data file"


def test_subset_from_the_seeded_cache(seeded_cache: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    rows = list(read_comparisons("harmless-base"))
    assert len(rows) == REAL_ROWS
    assert {(c.subset, c.split) for c in rows} == {("harmless-base", "test")}
    assert [c.index for c in rows[:3]] == [0, 1, 2] and rows[-1].line == REAL_ROWS
    assert "harmless-base/train not in the cache; reading the rest" in capsys.readouterr().err

    same = next(read_comparisons("harmless-base", split="test"))
    assert same.chosen_raw == rows[0].chosen_raw

    e = error_of("harmless-base/train")
    assert str(e) == ("harmless-base/train not in the cache; "
                      "run `hhrlhf fetch harmless-base --split train`")
    assert "unknown split 'dev'" in str(error_of("harmless-base", lambda s: read_comparisons(
        s, split="dev")))


# ---------------------------------------------------------------------------- JSON arrays


def pretty_array(rows: list[Any]) -> str:
    return json.dumps(rows, indent=2)


def test_pretty_printed_array_line_numbers(tmp_path: Path) -> None:
    text = pretty_array([row(0), row(1), row(2)])
    p = write(tmp_path, "array.json", text)
    lines = [c.line for c in read_comparisons(p)]
    starts = [n for n, ln in enumerate(text.splitlines(), 1) if ln == "  {"]
    assert lines == starts == [2, 6, 10]


def test_array_row_of_the_wrong_shape_and_bad_json(tmp_path: Path) -> None:
    p = write(tmp_path, "shape.json", pretty_array([row(0), {"chosen": "x"}, row(2)]))
    assert str(error_of(p)) == f"{p}:6: missing key 'rejected' (keys: chosen)"

    text = pretty_array([row(0), row(1), row(2)]).splitlines()
    assert text[7].startswith('    "rejected":')
    text[7] = text[7].replace('"rejected":', '"rejected"')  # line 8 loses its colon
    bad = write(tmp_path, "bad.json", "\n".join(text))
    e = error_of(bad)
    assert (e.line, str(e)) == (8, f"{bad}:8: not valid JSON: Expecting ':' delimiter")

    after = write(tmp_path, "after.json", pretty_array([row(0)]) + "\n\n{}")  # "]" on line 6
    assert str(error_of(after)) == f"{after}:8: unexpected text after the JSON array"


def test_truncated_array(tmp_path: Path) -> None:
    text = pretty_array([row(0), row(1), row(2)])
    unclosed = write(tmp_path, "unclosed.json", text[:-2])  # cut after the last object
    e = error_of(unclosed)
    assert str(e).startswith(f"{unclosed}:")
    assert "the JSON array is not closed (truncated file?)" in str(e)

    mid_string = write(tmp_path, "cut.json", text[:-30])
    e = error_of(mid_string)
    assert e.line == 12 and "not valid JSON: Unterminated string" in str(e)


# ------------------------------------------------------------------------------- red team


def redteam_row(i: int, **override: Any) -> dict[str, Any]:
    r = {
        "transcript": f"\n\nHuman: try {i}\n\nAssistant: no {i}\n\nHuman: again\n\nAssistant: no",
        "min_harmlessness_score_transcript": -0.25 * i,
        "num_params": ["2.7B", "13B", "52B"][i % 3],
        "model_type": ["plain lm", "context distillation", "rejection sampling", "rlhf"][i % 4],
        "rating": i % 5,
        "task_description": f"attack {i}",
        "task_description_harmlessness_score": 0.5,
        "red_team_member_id": 100 + i,
        "is_upworker": i % 2 == 0,
        "tags": ["violence", "theft"] if i == 1 else None,
    }
    assert tuple(r) == REDTEAM_FIELDS
    r.update(override)
    return r


def test_redteam_json_array(tmp_path: Path) -> None:
    rows = [redteam_row(i) for i in range(4)]
    p = write(tmp_path, "red_team_attempts.jsonl.gz", gzip.compress(pretty_array(rows).encode()))
    got = list(read_redteam(p))
    assert len(got) == 4
    starts = [n for n, ln in enumerate(pretty_array(rows).splitlines(), 1) if ln == "  {"]
    assert [a.line for a in got] == starts == [2, 14, 29, 41]  # row 1's tags span 4 lines
    a = got[1]
    assert a.num_params == "13B" and a.num_parameters == 13_000_000_000
    assert a.model_type == "context distillation" and a.rating == 1.0
    assert a.tags == ("violence", "theft") and got[0].tags is None
    assert a.red_team_member_id == 101 and a.is_upworker is False
    assert a.min_harmlessness_score_transcript == -0.25
    assert [t.role for t in a.transcript.turns] == ["human", "assistant"] * 2
    assert [r.to_json() for r in got] == [{**r, "rating": float(r["rating"])} for r in rows]


def test_redteam_bad_rows_name_the_line(tmp_path: Path) -> None:
    missing = {k: v for k, v in redteam_row(1).items() if k != "rating"}
    p = write(tmp_path, "rt.json", pretty_array([redteam_row(0), missing]))
    assert pretty_array([redteam_row(0), missing]).splitlines()[13] == "  {"  # line 14
    assert str(error_of(p, read_redteam)) == (
        f"{p}:14: not a red-team row: missing field(s): rating")

    wrong = write(tmp_path, "rt2.json", pretty_array([redteam_row(0, num_params=52)]))
    e = error_of(wrong, read_redteam)
    assert e.line == 2 and "field 'num_params' is not a string" in str(e)

    prefs = write(tmp_path, "prefs.jsonl", jsonl(row(0)))
    e = error_of(prefs, read_redteam)
    assert e.line == 1 and "not a red-team row: missing field(s): transcript" in str(e)
