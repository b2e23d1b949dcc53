"""Preference rows as Arrow tables, with a per-file on-disk cache.

:func:`comparisons_to_arrow` turns records into a table holding every field and flag (schema
:data:`SCHEMA`); :func:`arrow_to_comparisons` gives the records back, equal field for field.
:func:`read_table` reads subsets or files through :mod:`hhrlhf.read` and keeps one cache file
per source file in ``registry.cache_dir()/tables/``:

- format: an uncompressed Arrow IPC *stream*, read back memory-mapped, so a second read maps
  the file instead of parsing it (zero copies) and ``datasets`` opens the same file with
  ``Dataset.from_file`` (its own cache files are IPC streams);
- key: the SHA-256 of the source file's bytes (for a subset file and a plain path alike: a
  content hash is exact where size+mtime is not, and costs ~30 ms per 50 MB with OpenSSL), the
  subset and split the rows are labelled with, and :data:`CACHE_VERSION` (:data:`PARSER_VERSION`
  plus a fingerprint of ``records.py`` and this module's source, so a change to the parser
  never serves stale rows);
- written with :func:`hhrlhf.atomic.atomic_path` (temporary file, fsync, rename), beside a
  record ``<name>.json`` of its length, row count and CRC-32, written first;
- verified on every read: the length (a stat), the CRC-32 of the whole file (ISA-L's CRC:
  ~45 ms for a 372 MB table, next to ~20 s to parse it again; the pages it reads
  are the ones any full read maps anyway) and the row count of the stream. A file truncated
  at a record-batch boundary, zero-filled or with one byte flipped fails one of them and is
  parsed again, with a one-line note on stderr: an Arrow stream reader alone takes a clean
  end or a zero tail for the end of the stream and would serve fewer rows without a word.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from hhrlhf import records
from hhrlhf.atomic import atomic_path, remove_stale_temps
from hhrlhf.errors import HHRLHFError
from hhrlhf.fetch import file_sha256
from hhrlhf.read import Source, preference_sources, read_source_comparisons
from hhrlhf.records import ROW_CHECKS, Comparison
from hhrlhf.registry import cache_dir

if TYPE_CHECKING:
    import datasets
    import pandas as pd

# Bump when the table's schema or meaning changes; the source fingerprint below catches
# edits to the parsing code itself.
PARSER_VERSION = 1

TURN_TYPE = pa.struct([("role", pa.string()), ("text", pa.string()), ("sep", pa.string())])
SCHEMA = pa.schema([
    ("subset", pa.string()),
    ("split", pa.string()),
    ("index", pa.int64()),
    ("line", pa.int64()),
    ("prompt", pa.list_(TURN_TYPE)),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("chosen_raw", pa.string()),
    ("rejected_raw", pa.string()),
    ("flags", pa.list_(pa.string())),
    ("num_turns", pa.int32()),
])
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)

# Rows per record batch: keeps every string column's 32-bit offsets far from overflow and
# lets readers stream the table batch by batch.
BATCH_ROWS = 8192


def _source_fingerprint() -> str:
    h = hashlib.sha256(str(PARSER_VERSION).encode())
    for path in (Path(records.__file__), Path(__file__)):
        try:
            h.update(path.read_bytes())
        except OSError:  # frozen or zipped install: the version constant alone
            pass
    return h.hexdigest()[:12]


CACHE_VERSION = f"v{PARSER_VERSION}-{_source_fingerprint()}"

_FLAG_ORDER = {name: i for i, name in enumerate(ROW_CHECKS)}
_flag_lists: dict[frozenset[str], list[str]] = {}
_flag_sets: dict[tuple[str, ...], frozenset[str]] = {}


def _sorted_flags(flags: frozenset[str]) -> list[str]:
    """Flags in ROW_CHECKS order (any other name after, alphabetically): stable output."""
    out = _flag_lists.get(flags)
    if out is None:
        out = _flag_lists[flags] = sorted(flags, key=lambda f: (_FLAG_ORDER.get(f, 99), f))
    return out


def _batch(rows: list[Comparison]) -> pa.RecordBatch:
    offsets = [0]
    roles: list[str] = []
    texts: list[str] = []
    seps: list[str] = []
    n = 0
    for c in rows:
        prompt_turns = c.prompt
        for t in prompt_turns:
            roles.append(t.role)
            texts.append(t.text)
            seps.append(t.sep)
        n += len(prompt_turns)
        offsets.append(n)
    turns = pa.StructArray.from_arrays(
        [pa.array(roles, pa.string()), pa.array(texts, pa.string()), pa.array(seps, pa.string())],
        fields=list(TURN_TYPE),
    )
    prompt = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), turns,
                                      type=SCHEMA.field("prompt").type)
    columns = [
        pa.array([c.subset for c in rows], pa.string()),
        pa.array([c.split for c in rows], pa.string()),
        pa.array([c.index for c in rows], pa.int64()),
        pa.array([c.line for c in rows], pa.int64()),
        prompt,
        pa.array([c.chosen for c in rows], pa.string()),
        pa.array([c.rejected for c in rows], pa.string()),
        pa.array([c.chosen_raw for c in rows], pa.string()),
        pa.array([c.rejected_raw for c in rows], pa.string()),
        pa.array([_sorted_flags(c.flags) for c in rows], SCHEMA.field("flags").type),
        pa.array([c.num_turns for c in rows], pa.int32()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def iter_batches(records_: Iterable[Comparison],
                 batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Records as record batches of :data:`SCHEMA`, ``batch_rows`` rows each (the last fewer)."""
    buf: list[Comparison] = []
    for c in records_:
        buf.append(c)
        if len(buf) >= batch_rows:
            yield _batch(buf)
            buf = []
    if buf:
        yield _batch(buf)


def comparisons_to_arrow(records_: Iterable[Comparison]) -> pa.Table:
    """Every field and flag of the records as a table of :data:`SCHEMA`.

    ``prompt`` holds the turns before the final Assistant turn (``Comparison.prompt``), ``flags``
    the per-row checks in :data:`records.ROW_CHECKS` order. ``chosen_raw``/``rejected_raw`` keep
    both dialogues as published, so rows whose two prompts differ (``context_mismatch``) lose
    nothing.
    """
    return pa.Table.from_batches(list(iter_batches(records_)), schema=SCHEMA)


def arrow_to_comparisons(table: pa.Table | pa.RecordBatch) -> Iterator[Comparison]:
    """The records of a :data:`SCHEMA` table, equal to the ones it was built from.

    Only the scalar columns are read: ``prompt`` and ``num_turns`` follow from ``chosen_raw``.
    """
    missing = [c for c in COLUMNS if c not in table.schema.names]
    if missing:
        raise HHRLHFError(f"not a comparisons table: missing column(s) {', '.join(missing)}")
    batches = table.to_batches() if isinstance(table, pa.Table) else [table]
    names = ("subset", "split", "index", "line", "chosen", "rejected", "chosen_raw",
             "rejected_raw", "flags")
    for batch in batches:
        cols = [batch.column(batch.schema.get_field_index(n)).to_pylist() for n in names]
        for subset, split, index, line, chosen, rejected, c_raw, r_raw, flags in zip(*cols):
            key = tuple(flags)
            fs = _flag_sets.get(key)
            if fs is None:
                fs = _flag_sets[key] = frozenset(key)
            yield Comparison(subset, split, index, line, chosen, rejected, c_raw, r_raw, fs)


# ---------------------------------------------------------------------------------------------
# The on-disk cache


def tables_dir() -> Path:
    return cache_dir() / "tables"


def cache_path(source: Source, sha256: str | None = None) -> Path:
    """Where the table of one source file is cached (content hash, labels, parser version)."""
    sha = sha256 or file_sha256(source.path)
    label = f"{source.subset or '_'}.{source.split or '_'}"
    return tables_dir() / f"{sha}.{label}.{CACHE_VERSION}.arrow"


class CacheDamaged(Exception):
    """A cache file that does not match its record; the message says how."""


def check_path(path: Path) -> Path:
    """The record of a cache file's length, rows and CRC-32: ``<name>.json`` beside it."""
    return path.with_name(path.name + ".json")


def _crc32(data: Any) -> int:
    from isal import isal_zlib

    return int(isal_zlib.crc32(data))


def _read_ipc(path: Path) -> pa.Table:
    """The cached table at ``path``, verified against its record; :class:`CacheDamaged` when
    it is missing, unreadable or does not match."""
    try:
        record = json.loads(check_path(path).read_bytes())
        size, rows, crc = int(record["bytes"]), int(record["rows"]), int(record["crc32"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CacheDamaged(f"its record of length and checksum is missing or unreadable ({e})"
                           ) from None
    try:
        with pa.memory_map(str(path), "r") as source:
            if source.size() != size:
                raise CacheDamaged(f"it is {source.size():,} bytes, {size:,} were written")
            data = source.read_buffer()
            if _crc32(memoryview(data)) != crc:
                raise CacheDamaged("its checksum does not match")
            table = pa.ipc.open_stream(data).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise CacheDamaged(f"it cannot be read ({e})") from None
    if table.num_rows != rows:
        raise CacheDamaged(f"it holds {table.num_rows:,} rows, {rows:,} were written")
    if not table.schema.equals(SCHEMA):
        raise CacheDamaged("its columns are not this version's")
    return table


def _write_ipc_atomic(table: pa.Table, path: Path) -> None:
    """Write the table and its record (length, rows, CRC-32); the record goes first, so a
    table without a matching record is never taken for a whole one."""
    remove_stale_temps(path.parent)  # temporaries of killed writes (the cache is all ours)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh, pa.ipc.new_stream(fh, SCHEMA) as writer:
            writer.write_table(table, max_chunksize=BATCH_ROWS)
        with pa.memory_map(str(tmp), "r") as written:
            record = {"bytes": written.size(), "rows": table.num_rows,
                      "crc32": _crc32(memoryview(written.read_buffer()))}
        with atomic_path(check_path(path)) as tmp_check:
            tmp_check.write_text(json.dumps(record) + "\n")


def _parse_source(source: Source, progress: bool = True) -> pa.Table:
    from tqdm import tqdm

    rows = read_source_comparisons(source)
    label = source.subset if source.subset else source.path.name
    if source.split:
        label += f"/{source.split}"
    bar = tqdm(rows, desc=f"parsing {label}", unit=" rows", disable=None if progress else True,
               file=sys.stderr, leave=False)
    return pa.Table.from_batches(list(iter_batches(bar)), schema=SCHEMA)


def source_table(source: Source, *, use_cache: bool = True, progress: bool = True
                 ) -> tuple[pa.Table, Path | None]:
    """One source file's table and its cache file (None when not cached).

    A cache hit maps the file; a miss parses the source and writes the cache. A cache that
    cannot be written (read-only disk) is a note on stderr, not an error. ``progress``: a bar
    on a terminal while a file is parsed.
    """
    if not use_cache:
        return _parse_source(source, progress), None
    path = cache_path(source)
    if path.exists():
        try:
            return _read_ipc(path), path
        except CacheDamaged as e:  # a full disk, a crash, a bad sector: parse again
            print(f"hhrlhf: note: the table cache {path} is damaged ({e}); rebuilding it",
                  file=sys.stderr)
    table = _parse_source(source, progress)
    try:
        _write_ipc_atomic(table, path)
    except OSError as e:
        print(f"hhrlhf: note: cannot write the table cache {path}: {e}", file=sys.stderr)
        return table, None
    _remove_stale(path)
    # Serve the mapped copy: the parsed one is dropped, so memory holds no second copy.
    return _read_ipc(path), path


def _remove_stale(current: Path) -> None:
    """Other parser versions' cache files for the same content and labels."""
    stem = current.name.rsplit(".", 2)[0]  # <sha>.<subset>.<split>
    for p in current.parent.glob(f"{stem}.v*.arrow"):
        if p != current:
            p.unlink(missing_ok=True)
            check_path(p).unlink(missing_ok=True)


def read_table(sources: str | Path | Iterable[str | Path], split: str | None = None, *,
               use_cache: bool = True) -> pa.Table:
    """Every preference row of these subsets/files as one table of :data:`SCHEMA`.

    ``sources`` as for :func:`hhrlhf.read.read_comparisons` (subset, ``subset/split``, or a
    path); ``split`` filters the subsets' files. Each file is parsed once and then read from
    the cache (memory-mapped); ``use_cache=False`` parses and writes nothing.
    """
    tables = [source_table(s, use_cache=use_cache)[0]
              for s in preference_sources(sources, split)]
    if not tables:
        return SCHEMA.empty_table()
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def to_pandas(sources: str | Path | Iterable[str | Path], split: str | None = None, *,
              arrow_dtypes: bool = False, use_cache: bool = True) -> pd.DataFrame:
    """:func:`read_table` as a pandas DataFrame.

    ``arrow_dtypes=True`` keeps the columns Arrow-backed (``pd.ArrowDtype``): far faster and
    smaller for the nested ``prompt``/``flags`` columns than Python objects.
    """
    from hhrlhf.extras import require

    require("pandas", "hhrlhf.table.to_pandas")
    import pandas as pd

    table = read_table(sources, split, use_cache=use_cache)
    if arrow_dtypes:
        return table.to_pandas(types_mapper=pd.ArrowDtype)
    return table.to_pandas()


def to_dataset(sources: str | Path | Iterable[str | Path], split: str | None = None, *,
               use_cache: bool = True) -> datasets.Dataset:
    """:func:`read_table` as a ``datasets.Dataset``, memory-mapped from the cache files."""
    from hhrlhf.extras import require

    require("datasets", "hhrlhf.table.to_dataset")
    import datasets

    parts: list[Any] = []
    for s in preference_sources(sources, split):
        table, path = source_table(s, use_cache=use_cache)
        parts.append(datasets.Dataset.from_file(str(path)) if path is not None
                     else datasets.Dataset(table))
    if not parts:
        return datasets.Dataset(SCHEMA.empty_table())
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
