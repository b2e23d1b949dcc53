"""The Arrow layer: exact round trip on the real file, and the per-file on-disk cache."""

from __future__ import annotations

import gzip
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hhrlhf.errors import HHRLHFError
from hhrlhf.fetch import file_sha256
from hhrlhf.read import read_comparisons, resolve
from hhrlhf.records import ROW_CHECKS, Comparison
from hhrlhf.table import (
    CACHE_VERSION,
    SCHEMA,
    _write_ipc_atomic,
    arrow_to_comparisons,
    cache_path,
    check_path,
    comparisons_to_arrow,
    read_table,
    tables_dir,
    to_dataset,
    to_pandas,
)

FIELDS = ("subset", "split", "index", "line", "chosen", "rejected", "chosen_raw",
          "rejected_raw", "flags")
REAL_SHA256 = "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03"
FIRST_PROMPT = "what are some pranks with a pen i can do?"
CONTEXT_MISMATCH_ROWS = [1254, 1688, 1950, 1952, 2036]


def _same(a: Comparison, b: Comparison) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in FIELDS)


@pytest.fixture(scope="module")
def real_records(real_file: Path) -> list[Comparison]:
    return list(read_comparisons(real_file))


def test_round_trip_is_exact_on_the_real_file(real_records: list[Comparison]) -> None:
    table = comparisons_to_arrow(real_records)
    assert table.schema.equals(SCHEMA)
    assert table.num_rows == 2312
    back = list(arrow_to_comparisons(table))
    assert len(back) == len(real_records)
    assert all(_same(a, b) for a, b in zip(real_records, back))
    # Both dialogues rebuild byte for byte, the rows whose prompts differ included.
    for i in CONTEXT_MISMATCH_ROWS:
        assert "context_mismatch" in back[i].flags
        assert back[i].render_chosen() == real_records[i].chosen_raw
        assert back[i].render_rejected() == real_records[i].rejected_raw
        assert back[i].rejected_prompt != back[i].prompt
    # A table survives Arrow IPC (what the cache stores) unchanged.
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    again = pa.ipc.open_stream(sink.getvalue()).read_all()
    assert all(_same(a, b) for a, b in zip(real_records, arrow_to_comparisons(again)))


def test_columns_hold_every_field_and_flag(real_records: list[Comparison]) -> None:
    table = comparisons_to_arrow(real_records)
    rows = table.to_pylist()
    for c, row in zip(real_records, rows):
        assert row["prompt"] == [{"role": t.role, "text": t.text, "sep": t.sep} for t in c.prompt]
        assert row["num_turns"] == c.num_turns
        assert set(row["flags"]) == c.flags
        assert row["flags"] == sorted(row["flags"], key=ROW_CHECKS.index)
    first = rows[0]
    assert first["prompt"][0] == {"role": "human", "text": FIRST_PROMPT, "sep": " "}
    assert first["chosen"].startswith("No, sorry!  All of these involve a pen")
    assert first["index"] == 0 and first["line"] == 1 and first["subset"] is None
    assert sum("context_mismatch" in r["flags"] for r in rows) == 5
    assert comparisons_to_arrow([]).num_rows == 0


def test_arrow_to_comparisons_rejects_other_tables() -> None:
    with pytest.raises(HHRLHFError, match="missing column"):
        list(arrow_to_comparisons(pa.table({"chosen": ["a"]})))


def test_cache_is_written_and_served_instead_of_parsing(seeded_cache: Path) -> None:
    first = read_table("harmless-base/test")
    assert first.num_rows == 2312
    assert first.column("subset").unique().to_pylist() == ["harmless-base"]
    assert first.column("split").unique().to_pylist() == ["test"]
    files = sorted(tables_dir().iterdir())
    name = f"{REAL_SHA256}.harmless-base.test.{CACHE_VERSION}.arrow"
    assert [f.name for f in files] == [name, name + ".json"]  # no temp file left over
    assert read_table("harmless-base", split="test").equals(first)

    # Proof by behaviour that the second read maps the cache and does not parse: replace the
    # cached table with one whose first response differs, and read it back from there.
    path = files[0]
    chosen = first.column("chosen").to_pylist()
    chosen[0] = "served from the cache"
    edited = first.set_column(first.schema.get_field_index("chosen"), "chosen",
                              pa.array(chosen, pa.string()))
    # (Replaced by rename, as the cache itself does: `first` still maps the old file, and
    # rewriting a mapped file in place would pull the pages from under it.)
    # Written by the cache's own writer, with its record of length, rows and checksum.
    _write_ipc_atomic(edited, path)
    assert read_table("harmless-base/test").column("chosen")[0].as_py() == "served from the cache"
    # ...and use_cache=False parses the file again.
    assert read_table("harmless-base/test", use_cache=False).equals(first)

    # A damaged cache file is parsed again and replaced.
    tmp = path.with_suffix(".edit")
    tmp.write_bytes(path.read_bytes()[:1000])
    os.replace(tmp, path)
    assert read_table("harmless-base/test").equals(first)
    assert path.stat().st_size > 1000


def test_cache_is_keyed_by_content_and_labels(cache: Path, real_file: Path,
                                             tmp_path: Path) -> None:
    copy = tmp_path / "rows.jsonl.gz"
    shutil.copyfile(real_file, copy)
    [src] = resolve([copy])
    assert file_sha256(copy) == REAL_SHA256
    assert cache_path(src).name == f"{REAL_SHA256}._._.{CACHE_VERSION}.arrow"
    table = read_table(copy)
    assert table.column("subset").null_count == 2312  # a plain path: no subset label
    assert cache_path(src).exists()

    # Other content at the same path: another key, parsed afresh (never the stale table).
    with gzip.open(real_file, "rb") as fh:
        lines = fh.read().splitlines(keepends=True)
    with gzip.open(copy, "wb") as fh:
        fh.writelines(lines[:10])
    assert read_table(copy).num_rows == 10
    assert len(list(tables_dir().glob("*.arrow"))) == 2
    assert read_table([copy, real_file]).num_rows == 10 + 2312


def test_to_pandas_and_to_dataset(cache: Path, real_file: Path) -> None:
    df = to_pandas(real_file)
    assert list(df.columns) == SCHEMA.names
    assert df.shape == (2312, len(SCHEMA))
    assert df.loc[0, "prompt"][0]["text"] == FIRST_PROMPT
    arrow_df = to_pandas(real_file, arrow_dtypes=True)
    assert arrow_df["num_turns"].sum() == df["num_turns"].sum()

    ds = to_dataset(real_file)
    assert ds.num_rows == 2312 and ds.column_names == SCHEMA.names
    assert ds[0]["prompt"][0] == {"role": "human", "text": FIRST_PROMPT, "sep": " "}
    assert ds.cache_files and Path(ds.cache_files[0]["filename"]).parent == tables_dir()
    assert ds[1254]["flags"] == ["context_mismatch", "role_marker_in_text",
                                 "non_alternating_roles"]


# ---------------------------------------------------------------------------------------------
# A damaged cache file is found on read, rebuilt with a note, and never serves wrong rows.


def _batch_ends(path: Path) -> list[int]:
    """Byte offsets where each record batch message of an IPC stream file ends."""
    ends = []
    with pa.OSFile(str(path)) as fh:
        reader = pa.ipc.MessageReader.open_stream(fh)
        while True:
            try:
                msg = reader.read_next_message()
            except StopIteration:
                break
            if msg is None:
                break
            if msg.type == "record batch":
                ends.append(fh.tell())
    return ends


def _truncate_at_batch_boundary(path: Path) -> None:
    data = path.read_bytes()
    cut = _batch_ends(path)[1]  # two whole batches, then a clean end of file
    # What a plain Arrow stream reader makes of it: fewer rows and no error.
    assert pa.ipc.open_stream(data[:cut]).read_all().num_rows == 2 * 512
    path.write_bytes(data[:cut])


def _zero_fill_tail(path: Path) -> None:
    data = path.read_bytes()
    keep = _batch_ends(path)[0] + 100
    path.write_bytes(data[:keep] + bytes(len(data) - keep))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate_at_batch_boundary, _zero_fill_tail,
                                    _flip_a_byte])
def test_a_damaged_cache_is_rebuilt_with_a_note_and_exports_stay_right(
        cache: Path, real_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], damage: Any) -> None:
    from hhrlhf import table
    from hhrlhf.cli import main

    monkeypatch.setattr(table, "BATCH_ROWS", 512)  # several record batches in a small file
    reference = tmp_path / "reference.parquet"
    main(["export", str(real_file), "--format", "parquet", "-o", str(reference)])
    [src] = resolve([real_file])
    path = cache_path(src)
    assert len(_batch_ends(path)) == 5
    capsys.readouterr()

    damage(path)  # in place, as a bad disk or a crash would leave it
    out = tmp_path / "after.parquet"
    main(["export", str(real_file), "--format", "parquet", "-o", str(out)])
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("hhrlhf: note:")]
    assert len(notes) == 1
    assert notes[0].startswith(f"hhrlhf: note: the table cache {path} is damaged (")
    assert notes[0].endswith("); rebuilding it")
    assert "wrote 2,312 of 2,312 rows" in err
    assert pq.read_table(out).equals(pq.read_table(reference))
    # The rebuilt cache is whole again: read without a note.
    assert read_table(real_file).num_rows == 2312
    assert "note" not in capsys.readouterr().err


def test_a_cache_without_its_record_is_rebuilt(cache: Path, real_file: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    first = read_table(real_file)
    [src] = resolve([real_file])
    check_path(cache_path(src)).unlink()
    assert read_table(real_file).equals(first)
    assert "its record of length and checksum is missing" in capsys.readouterr().err
    assert check_path(cache_path(src)).exists()


def test_stale_temporaries_of_killed_cache_writes_are_removed(cache: Path, real_file: Path,
                                                              tmp_path: Path) -> None:
    from hhrlhf.cli import main

    tables_dir().mkdir(parents=True)
    stale = tables_dir() / f".{REAL_SHA256}._._.{CACHE_VERSION}.arrow.k9x2ab_q.tmp"
    fresh = tables_dir() / ".another.arrow.zz81ka0c.tmp"  # a write still going on
    for p in (stale, fresh):
        p.write_bytes(b"\0" * 4096)
    hour_ago = time.time() - 3700
    os.utime(stale, (hour_ago, hour_ago))
    main(["export", str(real_file), "--format", "trl", "-o", str(tmp_path / "x.jsonl")])
    assert not stale.exists()
    assert fresh.exists()
