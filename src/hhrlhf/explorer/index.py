"""Build the explorer's SQLite database: rows, turns, audit flags and red-team metadata, with an
FTS5 full-text index over every text.

Incremental per file: a file whose SHA-256 is the one recorded at the last build is skipped;
a changed file's rows are deleted and indexed again; a file gone from the cache is dropped.
Atomic: the build works on a copy (:func:`hhrlhf.atomic.atomic_path`) that replaces the database
only once complete and on disk, so an interrupted or failed build leaves the previous database
in place and usable (and a server reading it keeps answering).

Safe: builds of one database take turns (a file lock in the cache's ``locks/`` folder), so two
``hhrlhf index`` runs at once both end up in it. A file at the database's path is replaced only
when it is an hhrlhf index (:data:`APPLICATION_ID` in its SQLite header); anything else (a data
file, another program's database) is an error. A damaged index (``PRAGMA quick_check``) is built
again from the sources, with a note.

Layout (one row per pair or red-team attempt, the same ``id`` in every table):

- ``sources``: one row per indexed file (name, path, subset, split, kind, sha256, rows);
- ``rows``: the texts: ``context`` (the turns before the final response, or the whole red-team
  transcript, their texts joined by U+001E) with ``roles`` (one letter per turn, H or A),
  ``chosen``/``rejected`` (the final responses), ``task`` (a red-team task description),
  the rejected side's own context when it differs, and red-team extras as JSON;
- ``facets``: the narrow table the filters read (kind, source, turns, flag bits, red-team model
  type, size, rating, harmlessness score, Upwork/MTurk); ``row_tags``: red-team tags;
- ``fts``: FTS5 over (context, chosen, rejected, task) with ``rows`` as external content, so
  the texts are stored once; ``flag_bits``: the bit of each audit check in ``facets.flags``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hhrlhf.atomic import atomic_path, remove_stale_temps
from hhrlhf.audit import CHECKS, CROSS_ROW_CHECKS, DESCRIPTIONS, Auditor
from hhrlhf.errors import HHRLHFError
from hhrlhf.fetch import file_sha256
from hhrlhf.read import Source, is_redteam_file, read_source_comparisons, read_source_redteam
from hhrlhf.records import TASK_SCORE, Comparison, RedTeamAttempt, Turn
from hhrlhf.registry import FILES, REDTEAM_SUBSET, cache_dir

SCHEMA_VERSION = 1
DB_NAME = "explorer.sqlite"
# The SQLite header's application id (offset 68) of every database hhrlhf builds: "HHIX".
APPLICATION_ID = 0x48484958
_SQLITE_MAGIC = b"SQLite format 3\x00"
TURN_SEP = "\x1e"  # between turn texts in rows.context: a separator to the FTS5 tokenizer
# Characters the database reserves (turn separator, snippet markers); shown as spaces.
_RESERVED = str.maketrans({"\x1e": " ", "\x02": " ", "\x03": " "})
KIND_PAIR, KIND_REDTEAM = 0, 1
PAIRS, REDTEAM = "pairs", "redteam"
TOKENIZER = "porter unicode61 remove_diacritics 2"

_SCHEMA = f"""
CREATE TABLE meta(key TEXT PRIMARY KEY, value);
CREATE TABLE sources(
  id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, path TEXT NOT NULL UNIQUE,
  subset TEXT, split TEXT, kind TEXT NOT NULL, explicit INTEGER NOT NULL,
  sha256 TEXT NOT NULL, size INTEGER NOT NULL, rows INTEGER NOT NULL, indexed_at TEXT NOT NULL);
CREATE TABLE rows(
  id INTEGER PRIMARY KEY, source_id INTEGER NOT NULL, idx INTEGER NOT NULL,
  line INTEGER NOT NULL, roles TEXT NOT NULL, context TEXT NOT NULL,
  chosen TEXT, rejected TEXT, task TEXT,
  rejected_roles TEXT, rejected_context TEXT, meta TEXT);
CREATE UNIQUE INDEX rows_by_source ON rows(source_id, idx);
CREATE TABLE facets(
  id INTEGER PRIMARY KEY, source_id INTEGER NOT NULL, kind INTEGER NOT NULL,
  num_turns INTEGER NOT NULL, flags INTEGER NOT NULL,
  model_type TEXT, num_params TEXT, num_parameters INTEGER, rating REAL, score REAL,
  upworker INTEGER);
CREATE INDEX facets_by_source ON facets(source_id);
CREATE TABLE row_tags(tag TEXT NOT NULL, id INTEGER NOT NULL, PRIMARY KEY(tag, id))
  WITHOUT ROWID;
CREATE TABLE flag_bits(name TEXT PRIMARY KEY, bit INTEGER NOT NULL UNIQUE,
  cross_row INTEGER NOT NULL, description TEXT NOT NULL);
CREATE VIRTUAL TABLE fts USING fts5(context, chosen, rejected, task,
  content='rows', content_rowid='id', tokenize='{TOKENIZER}');
"""


def default_db_path() -> Path:
    """``<cache>/explorer.sqlite`` (the cache: ``$HHRLHF_CACHE`` or the platform's)."""
    return cache_dir() / DB_NAME


@dataclass
class IndexConfig:
    """What to index and how. Every fetched file in the cache is always included."""

    db_path: Path | None = None  # None: default_db_path()
    paths: tuple[Path, ...] = ()  # local files to index besides the cache's
    rebuild: bool = False  # index every file again, whatever its hash
    batch_rows: int = 2000  # rows per executemany
    progress: bool = True  # tqdm bars on stderr
    optimize: bool = True  # merge the FTS5 segments after a build (faster queries)
    stats_plot: bool = True  # describe the pairs (hhrlhf.stats) and keep counts for its plot


@dataclass
class SourceChange:
    """What a build did with one file."""

    name: str
    kind: str
    action: str  # "new", "changed", "unchanged", "removed", "rebuilt"
    rows: int


@dataclass
class BuildReport:
    """The outcome of :func:`build_index`."""

    db_path: Path
    changes: list[SourceChange] = field(default_factory=list)
    rows: int = 0  # rows in the database after the build
    seconds: float = 0.0
    wrote: bool = False  # False: nothing changed, the database was left as it was
    audited: bool = False  # cross-row audit flags recomputed

    def lines(self) -> list[str]:
        out = [f"{c.action:>9}  {c.name}  ({c.kind}, {c.rows:,} row{'s' * (c.rows != 1)})"
               for c in self.changes]
        size = self.db_path.stat().st_size if self.db_path.exists() else 0
        verb = "built" if self.wrote else "up to date"
        out.append(f"{verb}: {self.db_path} ({self.rows:,} rows, {size / 1e6:.1f} MB) "
                   f"in {self.seconds:.1f} s")
        return out


@dataclass(frozen=True)
class _Planned:
    name: str
    path: Path
    subset: str | None
    split: str | None
    kind: str | None  # None: not known yet (a new local file)
    explicit: bool
    sha256: str
    size: int


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clean(text: str) -> str:
    if "\x1e" in text or "\x02" in text or "\x03" in text:
        return text.translate(_RESERVED)
    return text


def join_turns(turns: Iterable[Turn]) -> tuple[str, str]:
    """(roles, context) as stored: one letter per turn, the texts joined by U+001E."""
    turns = list(turns)
    roles = "".join("H" if t.role == "human" else "A" for t in turns)
    return roles, TURN_SEP.join(_clean(t.text) for t in turns)


def _open_ro(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True)


def is_hhrlhf_index(db: Path) -> bool:
    """Whether the file at ``db`` is a database hhrlhf built: its header carries
    :data:`APPLICATION_ID` (or, from before the id was set, its ``meta`` table names this
    schema and tokenizer). An empty file holds nothing to lose and counts as one."""
    with open(db, "rb") as fh:
        header = fh.read(100)
    if not header:
        return True
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return False
    if int.from_bytes(header[68:72], "big") == APPLICATION_ID:
        return True
    try:
        con = _open_ro(db)
        try:
            keys = dict(con.execute("SELECT key, value FROM meta WHERE key IN "
                                    "('schema_version', 'tokenizer')").fetchall())
            con.execute("SELECT id, path, sha256 FROM sources LIMIT 1").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return False
    return keys.get("tokenizer") == TOKENIZER and "schema_version" in keys


def check_index(db: Path) -> str | None:
    """None when the database at ``db`` is whole, else what SQLite found wrong (one line).
    ``PRAGMA quick_check`` reads every page: about 3 s per GB (0.1 s for 33 MB, 18,500 pairs)."""
    try:
        con = _open_ro(db)
        try:
            found = [str(r[0]) for r in con.execute("PRAGMA quick_check(3)")]
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return str(e)
    if found == ["ok"]:
        return None
    # One line (SQLite's rows hold several, headed by "*** in database main ***").
    lines = [s.strip() for row in found for s in row.splitlines()]
    return "; ".join(s for s in lines if s and not s.startswith("***"))[:300]


def _refuse_foreign(db: Path) -> None:
    """An error unless ``db`` is missing or an hhrlhf index: nothing else is ever replaced."""
    if not db.exists():
        return
    if not db.is_file():
        raise HHRLHFError("is not a file; give the database file to write with --db", db)
    if not is_hhrlhf_index(db):
        raise HHRLHFError("exists and is not an hhrlhf index; refusing to replace it: give "
                          "another --db (or delete the file if it is a damaged index)", db)


def _read_old_sources(db: Path) -> dict[str, dict[str, Any]] | None:
    """The sources recorded in an existing index, or None when there is none we can use.

    A file that is not an hhrlhf index is refused (it is never replaced); a damaged index is
    built again, with a note."""
    if not db.exists():
        return None
    _refuse_foreign(db)
    if db.stat().st_size == 0:
        return None
    problem = check_index(db)
    if problem is not None:
        print(f"hhrlhf: note: the index {db} is damaged ({problem}); building it again",
              file=sys.stderr)
        return None
    try:
        con = _open_ro(db)
        try:
            version = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if not version or int(version[0]) != SCHEMA_VERSION:
                return None  # another version's layout: build afresh
            con.row_factory = sqlite3.Row
            return {r["path"]: dict(r) for r in con.execute("SELECT * FROM sources")}
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        print(f"hhrlhf: note: the index {db} cannot be read ({e}); building it again",
              file=sys.stderr)
        return None


def _remembered_paths(db: Path) -> list[Path]:
    """The local files a damaged index still names (as many as can be read), to index again."""
    try:
        con = _open_ro(db)
        try:
            rows = con.execute("SELECT path FROM sources WHERE explicit").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return []
    return [Path(r[0]) for r in rows if isinstance(r[0], str) and Path(r[0]).is_file()]


def _cached_files() -> list[tuple[str, Path, str, str | None]]:
    """(name, path, subset, split) of each registry file present in the cache and verified (a
    bad one is named on stderr and left out: the others are still indexed and served)."""
    from hhrlhf.fetch import cached_files

    return [(f.name, p, f.subset, f.split) for f, p in cached_files(FILES)]


def _plan_sources(paths: Iterable[Path], old: dict[str, dict[str, Any]]) -> list[_Planned]:
    planned: list[_Planned] = []
    seen: set[str] = set()
    for name, p, subset, split in _cached_files():
        key = str(p.resolve())
        seen.add(key)
        st = p.stat()
        kind = REDTEAM if subset == REDTEAM_SUBSET else PAIRS
        planned.append(_Planned(name, p.resolve(), subset, split, kind, False,
                                file_sha256(p), st.st_size))
    names = {p.name for p in planned}
    # Local files: the ones asked for now, and the ones indexed before that still exist.
    explicit: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise HHRLHFError("no such file", p)
        if p.is_dir():
            raise HHRLHFError("is a directory, not a data file", p)
        explicit.append(p.resolve())
    for rec in old.values():
        if rec["explicit"] and Path(rec["path"]).exists():
            explicit.append(Path(rec["path"]))
    for p in explicit:
        key = str(p)
        if key in seen:
            continue
        seen.add(key)
        prev = old.get(key)
        name = str(prev["name"]) if prev else _unique_name(p.name, names | _old_names(old, key))
        names.add(name)
        sha = file_sha256(p)
        known: str | None = prev["kind"] if prev and prev["sha256"] == sha else None
        planned.append(_Planned(name, p, None, None, known, True, sha, p.stat().st_size))
    return planned


def _old_names(old: dict[str, dict[str, Any]], except_path: str) -> set[str]:
    return {r["name"] for k, r in old.items() if k != except_path}


def _unique_name(base: str, taken: set[str]) -> str:
    name, n = base, 2
    while name in taken:
        name, n = f"{base}~{n}", n + 1
    return name


def _remove_stale_builds(db: Path) -> None:
    """Delete copies left by killed builds of earlier versions (named ``<db>.build-<pid>``)."""
    for p in db.parent.glob(db.name + ".build-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            continue  # a build still running
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            p.unlink()


class _Writer:
    """Inserts rows into the three tables in batches; ids continue after the largest one."""

    def __init__(self, con: sqlite3.Connection, batch: int, flag_bits: dict[str, int]):
        self.con = con
        self.batch = batch
        self.flag_bits = flag_bits
        self.next_id = (con.execute("SELECT max(id) FROM rows").fetchone()[0] or 0) + 1
        self.rows: list[tuple[Any, ...]] = []
        self.facets: list[tuple[Any, ...]] = []
        self.tags: list[tuple[str, int]] = []

    def flags_value(self, flags: Iterable[str]) -> int:
        value = 0
        for name in flags:
            bit = self.flag_bits.get(name)
            if bit is None:  # a check this build did not know: give it the next bit
                bit = self.flag_bits[name] = max(self.flag_bits.values(), default=-1) + 1
            value |= 1 << bit
        return value

    def add_pair(self, source_id: int, c: Comparison) -> None:
        rid = self.next_id
        self.next_id += 1
        roles, context = join_turns(c.prompt)
        r_roles = r_context = None
        if "context_mismatch" in c.flags:
            r_roles, r_context = join_turns(c.rejected_prompt)
        self.rows.append((rid, source_id, c.index, c.line, roles, context, _clean(c.chosen),
                          _clean(c.rejected), None, r_roles, r_context, None))
        self.facets.append((rid, source_id, KIND_PAIR, c.num_turns, self.flags_value(c.flags),
                            None, None, None, None, None, None))
        if len(self.rows) >= self.batch:
            self.flush()

    def add_redteam(self, source_id: int, a: RedTeamAttempt) -> None:
        rid = self.next_id
        self.next_id += 1
        roles, context = join_turns(a.transcript.turns)
        meta = {
            TASK_SCORE: a.task_description_harmlessness_score,  # one name, either spelling
            "red_team_member_id": a.red_team_member_id,
            "tags": None if a.tags is None else list(a.tags),
            "preamble": a.transcript.preamble or None,
        }
        self.rows.append((rid, source_id, a.index, a.line, roles, context, None, None,
                          _clean(a.task_description), None, None, json.dumps(meta)))
        self.facets.append((rid, source_id, KIND_REDTEAM, len(a.transcript.turns), 0,
                            a.model_type, a.num_params, a.num_parameters, a.rating,
                            a.min_harmlessness_score_transcript, int(a.is_upworker)))
        for tag in dict.fromkeys(a.tags or ()):
            self.tags.append((tag, rid))
        if len(self.rows) >= self.batch:
            self.flush()

    def discard(self) -> None:
        """Forget the rows not yet written (those of a file that turned out bad)."""
        self.rows, self.facets, self.tags = [], [], []

    def flush(self) -> None:
        if not self.rows:
            return
        cur = self.con
        cur.executemany("INSERT INTO rows VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", self.rows)
        cur.executemany("INSERT INTO fts(rowid, context, chosen, rejected, task) "
                        "VALUES (?,?,?,?,?)", [(r[0], r[5], r[6], r[7], r[8]) for r in self.rows])
        cur.executemany("INSERT INTO facets VALUES (?,?,?,?,?,?,?,?,?,?,?)", self.facets)
        cur.executemany("INSERT OR IGNORE INTO row_tags VALUES (?,?)", self.tags)
        self.rows, self.facets, self.tags = [], [], []


def _delete_source(con: sqlite3.Connection, source_id: int) -> None:
    # External-content FTS5: an entry is removed by giving back the values it indexed.
    con.execute("INSERT INTO fts(fts, rowid, context, chosen, rejected, task) "
                "SELECT 'delete', id, context, chosen, rejected, task FROM rows "
                "WHERE source_id = ?", (source_id,))
    con.execute("DELETE FROM row_tags WHERE id IN (SELECT id FROM rows WHERE source_id = ?)",
                (source_id,))
    con.execute("DELETE FROM facets WHERE source_id = ?", (source_id,))
    con.execute("DELETE FROM rows WHERE source_id = ?", (source_id,))
    con.execute("DELETE FROM sources WHERE id = ?", (source_id,))


def _progress(items: Iterable[Any], desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit=" rows", leave=False, mininterval=0.5,
                    dynamic_ncols=True)


def build_index(config: IndexConfig | None = None) -> BuildReport:
    """Bring the database up to date with the cache (and ``config.paths``); see the module doc.

    Raises :class:`HHRLHFError` when there is nothing to index or a file is bad; the previous
    database is then left as it was.
    """
    config = config or IndexConfig()
    start = time.perf_counter()
    db = Path(config.db_path) if config.db_path else default_db_path()
    db.parent.mkdir(parents=True, exist_ok=True)
    _refuse_foreign(db)
    with _build_lock(db):
        report = _build_locked(db, config)
    report.seconds = time.perf_counter() - start
    return report


def lock_path(db: Path) -> Path:
    """The lock that builds of ``db`` take turns on, named by the database's real path (a link
    shares it). It lives in the cache's ``locks/`` folder, not beside the database: a build that
    fails (an empty input, say) must leave nothing in the user's folder."""
    import hashlib

    from hhrlhf.registry import cache_dir

    real = str(db.resolve())
    name = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"index-{name}.lock"


@contextlib.contextmanager
def _build_lock(db: Path) -> Iterator[None]:
    """Hold the build lock of ``db``; a second build waits for the first, with a note."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path(db)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"hhrlhf: note: another `hhrlhf index` is building {db}; waiting for it",
              file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _build_locked(db: Path, config: IndexConfig) -> BuildReport:
    # Holding the lock, no other build of this database is running: any copy is stale.
    _remove_stale_builds(db)
    remove_stale_temps(db.parent, db.name, max_age=0)
    old = _read_old_sources(db)
    fresh = old is None or config.rebuild
    paths = config.paths
    if old is None and db.exists():  # damaged or another layout: keep the local files it had
        paths = (*paths, *_remembered_paths(db))
    old = old or {}
    planned = _plan_sources(paths, old)
    if not planned:
        raise HHRLHFError(f"nothing to index: no fetched files in the cache ({cache_dir()}) "
                          "and no files given; run `hhrlhf fetch` or pass files")

    report = BuildReport(db)
    by_path = {str(p.path): p for p in planned}
    removed = [r for k, r in old.items() if k not in by_path]
    to_index: list[_Planned] = []
    for p in planned:
        prev = old.get(str(p.path))
        if fresh or prev is None or prev["sha256"] != p.sha256:
            to_index.append(p)
        else:
            report.changes.append(SourceChange(p.name, prev["kind"], "unchanged", prev["rows"]))
    if not to_index and not removed and not fresh:
        report.rows = sum(r["rows"] for r in old.values())
        return report

    with atomic_path(db) as tmp:
        if fresh:
            con = _connect_for_build(tmp)
            con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            con.executescript(_SCHEMA)
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            con.execute("INSERT INTO meta VALUES ('tokenizer', ?)", (TOKENIZER,))
        else:
            shutil.copyfile(db, tmp)  # the database is never written in place: a plain copy
            con = _connect_for_build(tmp)
            con.execute(f"PRAGMA application_id = {APPLICATION_ID}")  # one from before the id
        try:
            _build_into(con, config, planned, to_index, removed, old, fresh, report)
            con.commit()
        finally:
            con.close()
    report.wrote = True
    return report


def _connect_for_build(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=OFF")  # a private copy: a crash discards it anyway
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA cache_size=-262144")
    return con


def _build_into(con: sqlite3.Connection, config: IndexConfig, planned: list[_Planned],
                to_index: list[_Planned], removed: list[dict[str, Any]],
                old: dict[str, dict[str, Any]], fresh: bool, report: BuildReport) -> None:
    flag_bits = {name: bit for name, bit in con.execute("SELECT name, bit FROM flag_bits")}
    for name in CHECKS:
        if name not in flag_bits:
            flag_bits[name] = max(flag_bits.values(), default=-1) + 1
    writer = _Writer(con, config.batch_rows, flag_bits)

    for rec in removed:
        _delete_source(con, rec["id"])
        report.changes.append(SourceChange(rec["name"], rec["kind"], "removed", rec["rows"]))
    pairs_touched = any(r["kind"] == PAIRS for r in removed)

    # Kinds of new local files: a red-team file is one whose first row has a transcript.
    kinds: dict[str, str] = {}
    for p in planned:
        kinds[p.name] = p.kind or (REDTEAM if is_redteam_file(p.path) else PAIRS)
    reindex = {p.name for p in to_index}
    pairs_touched = pairs_touched or any(kinds[n] == PAIRS for n in reindex)

    source_ids: dict[str, int] = {}
    for p in planned:
        prev = old.get(str(p.path))
        if p.name in reindex:
            if prev is not None and not fresh:
                _delete_source(con, prev["id"])
            cur = con.execute(
                "INSERT INTO sources(id, name, path, subset, split, kind, explicit, sha256, size,"
                " rows, indexed_at) VALUES (?,?,?,?,?,?,?,?,?,0,?)",
                (prev["id"] if prev and not fresh else None, p.name, str(p.path), p.subset,
                 p.split, kinds[p.name], int(p.explicit), p.sha256, p.size, _now()))
            source_ids[p.name] = int(cur.lastrowid or 0)
        else:
            source_ids[p.name] = prev["id"] if prev else 0

    # Pairs: one pass over every preference file when any of them changed, indexing the
    # changed ones and feeding all to the audit (cross-row flags depend on the whole corpus).
    auditor = Auditor() if pairs_touched else None
    describer = _stats_builder() if pairs_touched and config.stats_plot else None
    labels: dict[tuple[str | None, str | None], int] = {}
    for p in planned:
        if kinds[p.name] != PAIRS or (auditor is None and p.name not in reindex):
            continue
        index_it = p.name in reindex
        label = (p.subset, p.split) if not p.explicit else (p.name, None)
        labels[label] = source_ids[p.name]
        n = 0
        sid = source_ids[p.name]
        for c in _progress(read_source_comparisons(Source(p.path, p.subset, p.split)),
                           p.name, config.progress):
            if index_it:
                writer.add_pair(sid, c)
            if auditor is not None:
                auditor.add(c, subset=label[0], split=label[1])
            if describer is not None:
                describer.add(c, subset=label[0], split=label[1])
            n += 1
        writer.flush()
        if index_it:
            _finish_source(con, sid, n, p, old, fresh, report)

    for p in planned:
        if kinds[p.name] != REDTEAM or p.name not in reindex:
            continue
        sid = source_ids[p.name]
        n = 0
        try:
            for a in _progress(read_source_redteam(Source(p.path, p.subset, p.split)), p.name,
                               config.progress):
                writer.add_redteam(sid, a)
                n += 1
            writer.flush()
        except HHRLHFError as e:
            if p.explicit:  # named by the user: their file, their error
                raise
            # found in the cache: one unreadable file does not stop the index of the rest
            writer.discard()
            _delete_source(con, sid)
            print(f"hhrlhf: warning: {e}; {p.name} skipped, the rest is indexed",
                  file=sys.stderr)
            continue
        _finish_source(con, sid, n, p, old, fresh, report)

    con.executemany("INSERT OR REPLACE INTO flag_bits VALUES (?,?,?,?)", [
        (name, bit, int(name in CROSS_ROW_CHECKS), DESCRIPTIONS.get(name, name))
        for name, bit in flag_bits.items()])
    if auditor is not None:
        _apply_cross_row_flags(con, auditor, flag_bits, labels)
        report.audited = True
    if describer is not None:
        _store_stats(con, describer)
    elif pairs_touched:
        con.execute("DELETE FROM meta WHERE key IN ('stats', 'stats_state', 'stats_png')")
    if config.optimize:
        con.execute("INSERT INTO fts(fts) VALUES ('optimize')")
    con.execute("INSERT OR REPLACE INTO meta VALUES ('built_at', ?)", (_now(),))
    con.commit()
    pages, free = (con.execute(f"PRAGMA {p}").fetchone()[0]
                   for p in ("page_count", "freelist_count"))
    if free > pages // 4:  # much was deleted: give the space back
        con.execute("VACUUM")
    con.execute("ANALYZE")
    report.rows = con.execute("SELECT count(*) FROM facets").fetchone()[0]


def _finish_source(con: sqlite3.Connection, sid: int, n: int, p: _Planned,
                   old: dict[str, dict[str, Any]], fresh: bool, report: BuildReport) -> None:
    con.execute("UPDATE sources SET rows = ? WHERE id = ?", (n, sid))
    prev = old.get(str(p.path))
    action = "rebuilt" if fresh and prev else ("changed" if prev else "new")
    kind = con.execute("SELECT kind FROM sources WHERE id = ?", (sid,)).fetchone()[0]
    report.changes.append(SourceChange(p.name, kind, action, n))


def _stats_builder() -> Any:
    from hhrlhf.stats import StatsBuilder

    return StatsBuilder()


def _store_stats(con: sqlite3.Connection, describer: Any) -> None:
    """Keep hhrlhf.stats' description of the pairs, and its counts, in ``meta``.

    The figure is not drawn here: the app draws it from the counts (hhrlhf.stats).
    """
    stats = describer.result()
    con.execute("INSERT OR REPLACE INTO meta VALUES ('stats', ?)",
                (json.dumps(stats.to_json()),))
    con.execute("INSERT OR REPLACE INTO meta VALUES ('stats_state', ?)",
                (json.dumps(stats.to_state()),))
    con.execute("DELETE FROM meta WHERE key = 'stats_png'")  # drawn by older versions


def _apply_cross_row_flags(con: sqlite3.Connection, auditor: Auditor,
                           flag_bits: dict[str, int],
                           labels: dict[tuple[str | None, str | None], int]) -> None:
    """Set the cross-row audit flags (duplicate pair, repeated prompt, train/test overlap)."""
    result = auditor.result()
    mask = sum(1 << flag_bits[name] for name in CROSS_ROW_CHECKS)
    con.execute("UPDATE facets SET flags = flags & ? WHERE kind = ? AND flags & ?",
                (~mask, KIND_PAIR, mask))
    updates = []
    for name in CROSS_ROW_CHECKS:
        value = 1 << flag_bits[name]
        for ref in result.checks[name]:
            sid = labels.get((ref.subset, ref.split))
            if sid is not None:
                updates.append((value, sid, ref.index))
    con.executemany("UPDATE facets SET flags = flags | ? WHERE id = "
                    "(SELECT id FROM rows WHERE source_id = ? AND idx = ?)", updates)
    con.execute("INSERT OR REPLACE INTO meta VALUES ('audit', ?)", (json.dumps(
        {name: result.count(name) for name in CHECKS}),))
