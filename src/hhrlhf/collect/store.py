"""Storage of everything `hhrlhf collect` gathers: SQLite (the default) or Postgres.

Every write is one transaction that is durable before the HTTP answer goes out: SQLite runs in
WAL mode with ``synchronous=FULL`` (a commit fsyncs the log), Postgres commits as it always
does. A write carries an idempotency key chosen by the client; the answer to a key is stored
in the same transaction as the write, so a retried or double-clicked submit is stored once
and answered the same way again.

Ids are small integers in insertion order; exports list rows by id, so a second export after
more collection gives the first one's rows first and the new ones after them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hhrlhf.errors import HHRLHFError

SCHEMA_VERSION = 2  # 2: annotators.revoked
ROLES = ("annotator", "reviewer", "admin")
TASKS = ("helpful", "harmless", "redteam")
MAX_TAGS = 6
MAX_TAG_CHARS = 64
MAX_TEXT_CHARS = 20_000
MAX_KEY_CHARS = 100
SESSION_SECONDS = 30 * 86400  # a session lasts 30 days; the invite link opens a new one
# The paper's scale: response A is slightly / much better than B.
STRENGTHS = {1: "slightly better", 2: "much better"}

# Written once in portable SQL; {pk} and {real} are filled per backend.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
  id {pk}, name TEXT NOT NULL, role TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
  is_upworker INTEGER NOT NULL DEFAULT 0, created {real} NOT NULL, consented {real},
  revoked {real});
CREATE TABLE IF NOT EXISTS sessions (
  token_hash TEXT PRIMARY KEY, annotator_id INTEGER NOT NULL REFERENCES annotators(id),
  csrf TEXT NOT NULL, created {real} NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
  id {pk}, annotator_id INTEGER NOT NULL REFERENCES annotators(id), task TEXT NOT NULL,
  status TEXT NOT NULL, created {real} NOT NULL, finished {real});
CREATE INDEX IF NOT EXISTS conversations_by_annotator ON conversations (annotator_id, status);
CREATE TABLE IF NOT EXISTS turns (
  conversation_id INTEGER NOT NULL REFERENCES conversations(id), position INTEGER NOT NULL,
  role TEXT NOT NULL, text TEXT NOT NULL, policy TEXT, settings TEXT, created {real} NOT NULL,
  PRIMARY KEY (conversation_id, position));
CREATE TABLE IF NOT EXISTS items (
  id {pk}, conversation_id INTEGER NOT NULL REFERENCES conversations(id),
  position INTEGER NOT NULL, response_a TEXT NOT NULL, response_b TEXT NOT NULL,
  policy_a TEXT NOT NULL, policy_b TEXT NOT NULL, settings TEXT NOT NULL,
  left_side TEXT NOT NULL, overlap INTEGER NOT NULL, created {real} NOT NULL,
  UNIQUE (conversation_id, position));
CREATE INDEX IF NOT EXISTS items_overlap ON items (overlap, id);
CREATE TABLE IF NOT EXISTS judgements (
  id {pk}, item_id INTEGER NOT NULL REFERENCES items(id),
  annotator_id INTEGER NOT NULL REFERENCES annotators(id), picked TEXT NOT NULL,
  strength INTEGER NOT NULL, left_side TEXT NOT NULL, shown {real}, submitted {real} NOT NULL,
  UNIQUE (item_id, annotator_id));
CREATE TABLE IF NOT EXISTS attempts (
  id {pk}, conversation_id INTEGER NOT NULL UNIQUE REFERENCES conversations(id),
  annotator_id INTEGER NOT NULL REFERENCES annotators(id), rating INTEGER NOT NULL,
  task_description TEXT NOT NULL, policy TEXT NOT NULL, num_params TEXT NOT NULL,
  model_type TEXT NOT NULL, transcript_score {real}, task_score {real},
  submitted {real} NOT NULL);
CREATE TABLE IF NOT EXISTS reviews (
  id {pk}, attempt_id INTEGER NOT NULL REFERENCES attempts(id),
  reviewer_id INTEGER NOT NULL REFERENCES annotators(id), tags TEXT NOT NULL,
  submitted {real} NOT NULL, UNIQUE (attempt_id, reviewer_id));
CREATE TABLE IF NOT EXISTS requests (
  annotator_id INTEGER NOT NULL, key TEXT NOT NULL, response TEXT NOT NULL,
  created {real} NOT NULL, PRIMARY KEY (annotator_id, key));
"""


class Conflict(Exception):
    """A write that the state does not allow (an item judged twice, a finished conversation):
    the client's view is stale. ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    role: str
    is_upworker: bool
    consented: bool
    revoked: bool = False


def hash_token(token: str) -> str:
    """Tokens are stored as their SHA-256 only: a copy of the database lets no one in."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def is_postgres_url(target: str | Path) -> bool:
    return str(target).startswith(("postgres://", "postgresql://"))


class Tx:
    """One transaction's cursor with the backend's placeholder style hidden: SQL is written
    with ``?`` and, for Postgres, turned into ``%s``."""

    def __init__(self, conn: Any, postgres: bool):
        self.conn = conn
        self.postgres = postgres

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cur = self.conn.cursor()
        cur.execute(self._sql(sql), tuple(params))
        return cur

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.execute(sql, params).fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.execute(sql, params).fetchall()]

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run an INSERT ... RETURNING id; the new row's id."""
        row = self.execute(sql + " RETURNING id", params).fetchone()
        return int(row[0])


class Store:
    """The database behind one `hhrlhf collect` server (or export). Thread-safe: each thread
    has its own connection; writes of this process take turns (a lock), so that SQLite never
    makes a writer wait in its busy loop and Postgres never sees two of our writes race."""

    def __init__(self, target: str | Path):
        self.target = str(target)
        self.postgres = is_postgres_url(target)
        self._local = threading.local()
        self._all: list[Any] = []  # every thread's connection, to close them all
        self._write_lock = threading.Lock()
        if not self.postgres:
            path = Path(target)
            if path.is_dir():
                raise HHRLHFError("is a directory; --db names a database file", path)
            if path.exists() and path.stat().st_size and not _is_sqlite(path):
                raise HHRLHFError("not an SQLite database (refusing to touch it)", path)
            path.parent.mkdir(parents=True, exist_ok=True)
        self._create()

    # -- connections ------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self.postgres:
            try:
                import psycopg
            except ImportError:
                raise HHRLHFError("a Postgres URL needs the 'collect' extra: pip install "
                                  "'hhrlhf[collect]'") from None
            try:
                return psycopg.connect(self.target, autocommit=False)
            except psycopg.OperationalError as e:
                msg = " ".join(str(e).split())[:300]
                raise HHRLHFError(f"cannot connect to Postgres: {msg}") from None
        try:
            conn = sqlite3.connect(self.target, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk (the log fsynced) before the answer is sent.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.DatabaseError as e:
            raise HHRLHFError(f"cannot open the database: {e}", self.target) from None
        return conn

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            self._all.append(conn)
        return conn

    def close(self) -> None:
        for conn in self._all:
            with contextlib.suppress(Exception):  # closing: nothing left to do about it
                conn.close()
        self._all = []
        self._local = threading.local()

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[Tx]:
        """A transaction: committed on success, rolled back on any exception. Writes take
        the process's write lock first (SQLite: BEGIN IMMEDIATE, the database's own)."""
        conn = self._conn()
        lock = self._write_lock if write else None
        if lock is not None:
            lock.acquire()
        try:
            if not self.postgres:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            tx = Tx(conn, self.postgres)
            try:
                yield tx
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        finally:
            if lock is not None:
                lock.release()

    def _create(self) -> None:
        pk = ("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY" if self.postgres
              else "INTEGER PRIMARY KEY")
        real = "DOUBLE PRECISION" if self.postgres else "REAL"
        ddl = _SCHEMA.format(pk=pk, real=real)
        with self.transaction(write=True) as tx:
            for statement in ddl.split(";"):
                if statement.strip():
                    tx.execute(statement)
            row = tx.one("SELECT value FROM meta WHERE key = 'schema'")
            if row is None:
                tx.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)",
                           (str(SCHEMA_VERSION),))
            elif row[0] == "1":  # before revocation: the column added, nothing else changes
                tx.execute(f"ALTER TABLE annotators ADD COLUMN revoked {real}")
                tx.execute("UPDATE meta SET value = ? WHERE key = 'schema'",
                           (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise HHRLHFError(f"database schema {row[0]}, this hhrlhf knows "
                                  f"{SCHEMA_VERSION}", self.target)

    # -- idempotent writes ------------------------------------------------------------------
    def write(self, annotator_id: int, key: str,
              fn: Callable[[Tx], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn`` in a write transaction once per (annotator, key): the answer is stored
        with the write; the same key again returns that answer without writing anything."""
        if not key or len(key) > MAX_KEY_CHARS or not re.fullmatch(r"[A-Za-z0-9_.:-]+", key):
            raise Conflict("a request key of 1-100 letters, digits, '-', '_', '.', ':' is "
                           "needed", 400)
        with self.transaction(write=True) as tx:
            row = tx.one("SELECT response FROM requests WHERE annotator_id = ? AND key = ?",
                         (annotator_id, key))
            if row is not None:
                return dict(json.loads(row[0]), replayed=True)
            answer = fn(tx)
            tx.execute("INSERT INTO requests (annotator_id, key, response, created) "
                       "VALUES (?, ?, ?, ?)", (annotator_id, key, json.dumps(answer),
                                               time.time()))
        return answer

    # -- annotators and sessions -------------------------------------------------------------
    def add_annotator(self, name: str, role: str = "annotator",
                      is_upworker: bool = False) -> tuple[int, str]:
        """A new annotator; (id, invite token). Only the token's hash is kept."""
        name = name.strip()
        if not name or len(name) > 200:
            raise HHRLHFError("--name must be 1-200 characters")
        if role not in ROLES:
            raise HHRLHFError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
        token = secrets.token_urlsafe(24)
        with self.transaction(write=True) as tx:
            aid = tx.insert("INSERT INTO annotators (name, role, token_hash, is_upworker, "
                            "created) VALUES (?, ?, ?, ?, ?)",
                            (name, role, hash_token(token), int(is_upworker), time.time()))
        return aid, token

    def _annotator(self, tx: Tx, where: str, value: Any) -> Annotator | None:
        row = tx.one("SELECT id, name, role, is_upworker, consented, revoked FROM annotators "
                     f"WHERE {where} = ?", (value,))
        if row is None:
            return None
        return Annotator(int(row[0]), row[1], row[2], bool(row[3]), row[4] is not None,
                         row[5] is not None)

    def annotator_by_token(self, token: str) -> Annotator | None:
        with self.transaction() as tx:
            return self._annotator(tx, "token_hash", hash_token(token))

    def new_session(self, annotator_id: int) -> tuple[str, str]:
        """(session token for the cookie, CSRF token for the pages); a revoked annotator
        gets :class:`Conflict` (401)."""
        session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        with self.transaction(write=True) as tx:
            who = self._annotator(tx, "id", annotator_id)
            if who is None or who.revoked:
                raise Conflict("this invite link was revoked (ask for a new one)", 401)
            tx.execute("INSERT INTO sessions (token_hash, annotator_id, csrf, created) "
                       "VALUES (?, ?, ?, ?)", (hash_token(session), annotator_id, csrf,
                                               time.time()))
        return session, csrf

    def session(self, token: str) -> tuple[Annotator, str] | None:
        """The annotator and CSRF token of a session cookie, or None."""
        with self.transaction() as tx:
            row = tx.one("SELECT annotator_id, csrf FROM sessions WHERE token_hash = ? "
                         "AND created > ?", (hash_token(token), time.time() - SESSION_SECONDS))
            if row is None:
                return None
            who = self._annotator(tx, "id", row[0])
        return None if who is None or who.revoked else (who, row[1])

    def revoke(self, who: str) -> tuple[Annotator, int]:
        """End an annotator's sessions and stop their invite from signing in again, at once
        (every server of the database asks it on every call). ``who``: an annotator id, an
        invite token or an invite link. (The annotator, the number of sessions ended);
        revoking again ends nothing more."""
        who = who.strip()
        token = who.rsplit("/join/", 1)[1] if "/join/" in who else who
        with self.transaction(write=True) as tx:
            found = (self._annotator(tx, "id", int(token)) if token.isdigit() and len(token) < 12
                     else self._annotator(tx, "token_hash", hash_token(token)) if token
                     else None)
            if found is None:
                raise HHRLHFError(f"no annotator with the id or invite token {who[:60]!r}")
            if not found.revoked:
                tx.execute("UPDATE annotators SET revoked = ? WHERE id = ?",
                           (time.time(), found.id))
            ended = tx.execute("DELETE FROM sessions WHERE annotator_id = ?",
                               (found.id,)).rowcount
        return found, max(int(ended or 0), 0)

    def consent(self, annotator_id: int) -> None:
        with self.transaction(write=True) as tx:
            tx.execute("UPDATE annotators SET consented = ? WHERE id = ? AND consented IS NULL",
                       (time.time(), annotator_id))

    def annotators(self) -> list[dict[str, Any]]:
        with self.transaction() as tx:
            rows = tx.all("SELECT id, name, role, is_upworker, created, consented, revoked "
                          "FROM annotators ORDER BY id")
        return [{"id": r[0], "name": r[1], "role": r[2], "is_upworker": bool(r[3]),
                 "created": r[4], "consented": r[5], "revoked": r[6]} for r in rows]


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(16) == b"SQLite format 3\x00"


def open_store(target: str | Path) -> Store:
    """The store at ``target``: an SQLite file (created when missing) or a postgresql:// URL."""
    return Store(target)


def open_existing_store(target: str | Path) -> Store:
    """The store at ``target`` for a command that reads what was collected: a missing SQLite
    file is an error, never a new empty database."""
    if not is_postgres_url(target) and not Path(target).is_file():
        raise HHRLHFError("no such database file", target)
    return Store(target)
