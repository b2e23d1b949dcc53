"""Reading the explorer's database: searches, rows, counts. Read-only, safe to share by threads.

The connection is opened read-only (SQLite URI ``mode=ro``), one per thread, and opened again
when the database file is replaced by a new build.

The query language is small on purpose: words and ``"quoted phrases"`` (all must match),
``OR`` between alternatives, ``-word`` to exclude. User text never reaches FTS5 as syntax:
every word or phrase becomes an FTS5 string (``"..."``); raw FTS5 operators are refused with a
message saying how to search for them as text.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from hhrlhf.errors import HHRLHFError
from hhrlhf.explorer.diff import word_diff
from hhrlhf.explorer.index import KIND_PAIR, KIND_REDTEAM, PAIRS, REDTEAM, TURN_SEP
from hhrlhf.explorer.schema import (
    CellOut,
    DiffOut,
    FacetsOut,
    FlagCountOut,
    FlagOut,
    OverviewOut,
    PairOut,
    RedTeamOut,
    SearchHit,
    SearchOut,
    SnippetField,
    SortOut,
    SourceOut,
    TagCountOut,
    TurnOut,
)
from hhrlhf.records import TASK_SCORE

MAX_QUERY_CHARS = 500
MAX_TERMS = 32
# Ranking by relevance (bm25) costs a little per matching row; past this many matches the
# results come in corpus order instead (a word that common ranks nothing anyway). Said in the
# response ("ranked": false, and a note).
RANK_LIMIT = 5_000
SNIPPET_TOKENS = 24
PREVIEW_CHARS = 240
_HIT_START, _HIT_END = "\x02", "\x03"
# The FTS5 columns, in order, and what each holds for a pair and for a red-team attempt.
_PAIR_FIELDS: tuple[SnippetField, ...] = ("context", "chosen", "rejected", "context")
_REDTEAM_FIELDS: tuple[SnippetField, ...] = ("transcript", "transcript", "transcript",
                                             "task_description")
# FTS5 syntax outside quotes: refused, with a message, rather than guessed at.
_SYNTAX_CHARS = frozenset("()*^{}")
_SYNTAX_WORDS = frozenset({"AND", "NOT", "NEAR"})

SORTS: dict[str, str] = {
    "relevance": "best match first (needs a query)",
    "order": "corpus order (file, then row)",
    "turns": "fewest turns first",
    "-turns": "most turns first",
    "rating": "red-team rating, lowest first",
    "-rating": "red-team rating, highest first",
    "score": "harmlessness score, lowest (most harmful) first",
    "-score": "harmlessness score, highest first",
}
_ORDER_SQL = {
    "order": "f.id",
    "turns": "f.num_turns, f.id",
    "-turns": "f.num_turns DESC, f.id",
    "rating": "f.rating IS NULL, f.rating, f.id",
    "-rating": "f.rating IS NULL, f.rating DESC, f.id",
    "score": "f.score IS NULL, f.score, f.id",
    "-score": "f.score IS NULL, f.score DESC, f.id",
}
WORKERS = {"upwork": 1, "mturk": 0}
STATS_STATE = "stats_state"  # the meta key of the pairs' counts (hhrlhf.stats.Stats.to_state)


class QueryError(ValueError):
    """A search the user can fix: bad query text, unknown filter value, page out of range."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


class NotFound(QueryError):
    def __init__(self, message: str):
        super().__init__(message, 404)


def _fts_string(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _has_token(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


_SYNTAX_HELP = ('use words, "quoted phrases", OR between alternatives and -word to exclude; '
                "put it in double quotes to search for it as text")


def to_fts_query(text: str) -> str:
    """User text -> an FTS5 query made of quoted strings only. Raises :class:`QueryError`."""
    text = text.strip()
    if not text:
        raise QueryError("the query is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is too long ({len(text)} characters; at most "
                         f"{MAX_QUERY_CHARS})")
    clauses: list[list[str]] = []  # AND of (OR of strings)
    excluded: list[str] = []
    pending_or = False
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        negated = ch == "-" and i + 1 < n and not text[i + 1].isspace()
        if negated:
            i += 1
        if text[i] == '"':
            j = text.find('"', i + 1)
            if j < 0:
                raise QueryError('unbalanced double quote: a phrase opened with " is not closed '
                                 "(close it, or remove the quote)")
            term, quoted = text[i + 1 : j], True
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] != '"':
                j += 1
            term, quoted = text[i:j], False
            i = j
        if not quoted and not negated and term == "OR":
            if not clauses or pending_or:
                raise QueryError("OR needs a word or phrase on each side")
            pending_or = True
            continue
        if not quoted and (term in _SYNTAX_WORDS or _SYNTAX_CHARS.intersection(term)):
            raise QueryError(f"{term!r} is FTS5 query syntax, which search does not take: "
                             + _SYNTAX_HELP)
        if not _has_token(term):
            if pending_or:
                raise QueryError("OR needs a word or phrase on each side")
            continue  # punctuation alone: nothing to search for
        if negated:
            if pending_or:
                raise QueryError("OR cannot join an excluded (-word) term")
            excluded.append(_fts_string(term))
        elif pending_or:
            clauses[-1].append(_fts_string(term))
            pending_or = False
        else:
            clauses.append([_fts_string(term)])
    if pending_or:
        raise QueryError("OR needs a word or phrase on each side")
    if len(excluded) + sum(len(c) for c in clauses) > MAX_TERMS:
        raise QueryError(f"too many words in the query (at most {MAX_TERMS})")
    if not clauses:
        raise QueryError("the query has no word to search for (letters or digits; "
                         "excluded -words alone match nothing)")
    positive = " AND ".join(c[0] if len(c) == 1 else "(" + " OR ".join(c) + ")"
                            for c in clauses)
    if excluded:
        return f"({positive}) NOT ({' OR '.join(excluded)})"
    return positive


@dataclass
class SearchParams:
    """One search: the query text, the filters, the sort and the page."""

    q: str | None = None
    kind: str | None = None  # "pairs" or "redteam"
    subset: str | None = None
    split: str | None = None
    turns_min: int | None = None
    turns_max: int | None = None
    flags: tuple[str, ...] = ()  # rows with every one of these audit flags
    flagged: bool | None = None  # rows with any flag (True) or none (False)
    model_type: str | None = None
    size: str | None = None  # "2.7B", "13B", "52B"
    rating_min: float | None = None
    rating_max: float | None = None
    score_min: float | None = None
    score_max: float | None = None
    tag: str | None = None
    worker: str | None = None  # "upwork" or "mturk"
    sort: str | None = None  # a key of SORTS; default: relevance with a query, else order
    page: int = 1
    per_page: int = 20

    def redteam_filters(self) -> list[str]:
        names = ("model_type", "size", "rating_min", "rating_max", "score_min", "score_max",
                 "tag", "worker")
        return [n for n in names if getattr(self, n) is not None]


@dataclass
class _SourceInfo:
    id: int
    name: str
    subset: str  # the registry subset, or a local file's name
    split: str | None
    kind: str
    path: str
    sha256: str
    size: int
    rows: int
    explicit: bool
    indexed_at: str


@dataclass
class _Static:
    """What stays the same for one database file: sources, flag bits, filter values."""

    sources: dict[int, _SourceInfo]
    by_name: dict[str, _SourceInfo]
    flag_bits: dict[str, int]
    flag_desc: dict[str, str]
    cross_row: set[str]
    model_types: list[str]
    sizes: list[str]
    tags: list[tuple[str, int]]
    meta: dict[str, Any]
    cache: dict[str, Any] = field(default_factory=dict)

    def flag_names(self, value: int) -> list[str]:
        return [name for name, bit in self.flag_bits.items() if value >> bit & 1]

    @property
    def subsets(self) -> list[str]:
        return sorted({s.subset for s in self.sources.values()})

    @property
    def splits(self) -> list[str]:
        return sorted({s.split for s in self.sources.values() if s.split})


def _open_ro(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True,
                          check_same_thread=False)
    con.execute("PRAGMA mmap_size=1073741824")  # pages shared through the OS cache
    con.execute("PRAGMA cache_size=-16384")
    return con


def row_url(kind: str, source: str, index: int) -> str:
    return f"/{'pair' if kind == PAIRS else 'redteam'}/{quote(source, safe='/~')}/{index}"


def split_turns(roles: str | None, context: str | None) -> list[TurnOut]:
    if not roles:
        return []
    texts = (context or "").split(TURN_SEP)
    return [TurnOut(role="human" if r == "H" else "assistant", text=t)
            for r, t in zip(roles, texts)]


def _segments(snippet: str) -> list[tuple[str, bool]]:
    """A snippet with hit markers -> [(text, is_hit), ...]; turn separators become ' / '."""
    out: list[tuple[str, bool]] = []
    text = snippet.replace(TURN_SEP, " / ")
    hit = False
    buf = ""
    for ch in text:
        if ch in (_HIT_START, _HIT_END):
            if buf:
                out.append((buf, hit))
            buf, hit = "", ch == _HIT_START
        else:
            buf += ch
    if buf:
        out.append((buf, hit))
    return out


def _preview(text: str) -> str:
    text = " ".join(text.split(TURN_SEP)[0].split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


class ExplorerDB:
    """The explorer's database, read-only. ``path``: the file :func:`build_index` wrote."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._statics: dict[tuple[int, int, int], _Static] = {}

    # --- connection and per-file data ---------------------------------------------------
    def _identity(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise HHRLHFError("no explorer database here; run `hhrlhf index`",
                              self.path) from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def connection(self) -> tuple[sqlite3.Connection, _Static]:
        ident = self._identity()
        loc = self._local
        if getattr(loc, "ident", None) != ident:
            old = getattr(loc, "con", None)
            if old is not None:
                old.close()
            loc.con = _open_ro(self.path)
            loc.ident = ident
        with self._lock:
            static = self._statics.get(ident)
            if static is None:
                static = self._load_static(loc.con)
                self._statics = {ident: static}  # forget older files' data
        return loc.con, static

    @staticmethod
    def _load_static(con: sqlite3.Connection) -> _Static:
        from hhrlhf.audit import split_role

        sources: dict[int, _SourceInfo] = {}
        for (sid, name, path, subset, split, kind, explicit, sha, size, rows,
             at) in con.execute("SELECT id, name, path, subset, split, kind, explicit, sha256, "
                                "size, rows, indexed_at FROM sources ORDER BY id"):
            label = subset if subset else name
            sources[sid] = _SourceInfo(sid, name, label, split or split_role(name, None), kind,
                                       path, sha, size, rows, bool(explicit), at)
        bits, desc, cross = {}, {}, set()
        for name, bit, is_cross, description in con.execute(
                "SELECT name, bit, cross_row, description FROM flag_bits ORDER BY bit"):
            bits[name], desc[name] = bit, description
            if is_cross:
                cross.add(name)
        model_types = [r[0] for r in con.execute(
            "SELECT DISTINCT model_type FROM facets WHERE kind = 1 ORDER BY model_type")]
        sizes = [r[0] for r in con.execute(
            "SELECT num_params FROM facets WHERE kind = 1 GROUP BY num_params "
            "ORDER BY min(num_parameters)")]
        tags = [(t, n) for t, n in con.execute(
            "SELECT tag, count(*) FROM row_tags GROUP BY tag ORDER BY count(*) DESC, tag")]
        meta = {k: v for k, v in con.execute(
            "SELECT key, value FROM meta WHERE key NOT IN ('stats_png', ?)", (STATS_STATE,))}
        return _Static(sources, {s.name: s for s in sources.values()}, bits, desc, cross,
                       model_types, sizes, tags, meta)

    # --- search -------------------------------------------------------------------------
    def search(self, p: SearchParams) -> SearchOut:
        """Count, sort and page the rows that match; see :class:`SearchParams`."""
        start = time.perf_counter()
        con, st = self.connection()
        fts = to_fts_query(p.q) if p.q and p.q.strip() else None
        where, args = self._filters(p, st)
        sort = p.sort or ("relevance" if fts else "order")
        if sort not in SORTS:
            raise QueryError(f"unknown sort {sort!r}; known: {', '.join(SORTS)}")
        if sort == "relevance" and not fts:
            raise QueryError("sort=relevance needs a query (q)")
        if not 1 <= p.per_page <= 100:
            raise QueryError("per_page must be between 1 and 100")
        if p.page < 1:
            raise QueryError("page must be 1 or more")

        if fts:
            source = "fts CROSS JOIN facets f ON f.id = fts.rowid"
            where = ["fts MATCH ?", *where]
            args = [fts, *args]
        else:
            source = "facets f"
        cond = " AND ".join(where) or "1"
        offset = (p.page - 1) * p.per_page
        try:
            ids: list[int] | None = None
            fts_total = 0
            if fts:  # cheap: the doclists alone, no row is read
                fts_total = con.execute("SELECT count(*) FROM fts WHERE fts MATCH ?",
                                        (fts,)).fetchone()[0]
            if fts and sort == "relevance" and len(where) > 1 and fts_total <= RANK_LIMIT:
                # Few enough matches: score the filtered ones in the same pass that counts them.
                scored = con.execute(f"SELECT f.id, bm25(fts) FROM {source} WHERE {cond}",
                                     args).fetchall()
                total = len(scored)
                scored.sort(key=lambda r: (r[1], r[0]))
                ids = [r[0] for r in scored[offset : offset + p.per_page]]
            elif fts and len(where) == 1:
                total = fts_total
            else:
                total = con.execute(f"SELECT count(*) FROM {source} WHERE {cond}",
                                    args).fetchone()[0]
            pages = max(1, math.ceil(total / p.per_page))
            if p.page > pages:
                raise QueryError(f"page {p.page} is past the last page ({pages}) of "
                                 f"{total:,} results")
            ranked = sort == "relevance" and total <= RANK_LIMIT
            note = None
            if sort == "relevance":
                order = "bm25(fts), f.id" if ranked else "f.id"
                if not ranked:
                    note = (f"{total:,} rows match: more than {RANK_LIMIT:,}, so they are shown "
                            "in corpus order, not ranked; add words or filters to rank them")
            else:
                order = _ORDER_SQL[sort]
            if ids is None:
                ids = [r[0] for r in con.execute(
                    f"SELECT f.id FROM {source} WHERE {cond} ORDER BY {order} LIMIT ? OFFSET ?",
                    [*args, p.per_page, offset])]
            results = self._hits(con, st, ids, fts)
        except sqlite3.OperationalError as e:  # should not happen: the query is all strings
            raise QueryError(f"the search engine refused the query: {e}") from None
        return SearchOut(
            query=p.q or "", fts_query=fts, total=total, page=p.page, per_page=p.per_page,
            pages=pages, first=offset + 1 if results else 0, last=offset + len(results),
            sort=sort, ranked=ranked, note=note,
            took_ms=round((time.perf_counter() - start) * 1000, 2), results=results)

    def _filters(self, p: SearchParams, st: _Static) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        kind = p.kind or None
        if kind not in (None, PAIRS, REDTEAM):
            raise QueryError(f"unknown kind {kind!r}; known: {PAIRS}, {REDTEAM}")
        rt = p.redteam_filters()
        if rt:
            if kind == PAIRS:
                raise QueryError(f"{', '.join(rt)} filter red-team rows; they do not go with "
                                 "kind=pairs")
            kind = REDTEAM
        if p.flags or p.flagged is not None:
            if kind == REDTEAM:
                raise QueryError("audit flags belong to preference pairs; they do not go with "
                                 "red-team filters or kind=redteam")
            kind = PAIRS
        if kind is not None:
            where.append("f.kind = ?")
            args.append(KIND_PAIR if kind == PAIRS else KIND_REDTEAM)

        if p.subset or p.split:
            if p.subset and p.subset not in st.subsets:
                raise QueryError(f"unknown subset {p.subset!r}; indexed: "
                                 f"{', '.join(st.subsets)}")
            if p.split and p.split not in ("train", "test"):
                raise QueryError(f"unknown split {p.split!r}; known: train, test")
            ids = [s.id for s in st.sources.values()
                   if (not p.subset or s.subset == p.subset)
                   and (not p.split or s.split == p.split)]
            where.append(f"f.source_id IN ({','.join(map(str, ids)) or 'NULL'})")

        _range(where, args, "f.num_turns", "turns", p.turns_min, p.turns_max)
        _range(where, args, "f.rating", "rating", p.rating_min, p.rating_max)
        _range(where, args, "f.score", "score", p.score_min, p.score_max)

        if p.flags:
            mask = 0
            for name in p.flags:
                if name not in st.flag_bits:
                    raise QueryError(f"unknown audit flag {name!r}; known: "
                                     f"{', '.join(st.flag_bits)}")
                mask |= 1 << st.flag_bits[name]
            where.append("f.flags & ? = ?")
            args += [mask, mask]
        if p.flagged is not None:
            where.append("f.flags != 0" if p.flagged else "f.flags = 0")
        if p.model_type is not None:
            if p.model_type not in st.model_types:
                raise QueryError(f"unknown model type {p.model_type!r}; known: "
                                 f"{', '.join(st.model_types)}")
            where.append("f.model_type = ?")
            args.append(p.model_type)
        if p.size is not None:
            if p.size not in st.sizes:
                raise QueryError(f"unknown size {p.size!r}; known: {', '.join(st.sizes)}")
            where.append("f.num_params = ?")
            args.append(p.size)
        if p.tag is not None:
            if p.tag not in {t for t, _ in st.tags}:
                raise QueryError(f"unknown tag {p.tag!r}; see /api/facets for the tags")
            where.append("f.id IN (SELECT id FROM row_tags WHERE tag = ?)")
            args.append(p.tag)
        if p.worker is not None:
            if p.worker not in WORKERS:
                raise QueryError(f"unknown worker {p.worker!r}; known: upwork, mturk")
            where.append("f.upworker = ?")
            args.append(WORKERS[p.worker])
        return where, args

    def _hits(self, con: sqlite3.Connection, st: _Static, ids: list[int],
              fts: str | None) -> list[SearchHit]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = {r[0]: r for r in con.execute(
            "SELECT f.id, f.kind, f.source_id, f.num_turns, f.flags, f.model_type, "
            "f.num_params, f.rating, f.score, f.upworker, r.idx, substr(r.context, 1, 2000), "
            f"substr(r.task, 1, 500) FROM facets f JOIN rows r ON r.id = f.id "
            f"WHERE f.id IN ({marks})", ids)}
        out = []
        for rid in ids:
            (_, kind, sid, turns, flags, model_type, num_params, rating, score, upworker, idx,
             context, task) = rows[rid]
            src = st.sources[sid]
            kind_name = PAIRS if kind == KIND_PAIR else REDTEAM
            fields = _PAIR_FIELDS if kind == KIND_PAIR else _REDTEAM_FIELDS
            if fts:
                column, snippet = self._snippet(con, fts, rid)
                segments = _segments(snippet)
                where: SnippetField = fields[column]
            else:
                segments = [(_preview(task if task else context), False)]
                where = "task_description" if task else fields[0]
            hit = SearchHit(
                id=rid, kind=_kind(kind_name), source=src.name, subset=src.subset, split=src.split,
                index=idx, url=row_url(kind_name, src.name, idx),
                api_url="/api" + row_url(kind_name, src.name, idx), num_turns=turns,
                flags=st.flag_names(flags), snippet=segments, snippet_field=where)
            if kind == KIND_REDTEAM:
                hit.model_type, hit.num_params, hit.rating = model_type, num_params, rating
                hit.min_harmlessness_score, hit.is_upworker = score, bool(upworker)
            out.append(hit)
        return out

    @staticmethod
    def _snippet(con: sqlite3.Connection, fts: str, rid: int) -> tuple[int, str]:
        """(column, snippet) of the column with the most matches, so a hit says where it is.

        FTS5's own choice (column -1) does not say which column it took.
        """
        cols = ", ".join(f"snippet(fts, {i}, char(2), char(3), '…', ?)" for i in range(4))
        row = con.execute(f"SELECT {cols} FROM fts WHERE fts MATCH ? AND rowid = ?",
                          (*[SNIPPET_TOKENS] * 4, fts, rid)).fetchone()
        if not row:
            return 0, ""
        snippets = [s or "" for s in row]
        best = max(range(4), key=lambda i: (snippets[i].count(_HIT_START), -i))
        return best, snippets[best]

    # --- rows ---------------------------------------------------------------------------
    def _row(self, kind: int, source: str, index: int) -> tuple[sqlite3.Row, _SourceInfo,
                                                                _Static]:
        con, st = self.connection()
        src = st.by_name.get(source)
        what = "pair" if kind == KIND_PAIR else "red-team attempt"
        if src is None:
            raise NotFound(f"no indexed file named {source!r}")
        cur = con.execute(
            "SELECT r.*, f.flags, f.num_turns, f.model_type, f.num_params, f.rating, f.score, "
            "f.upworker, f.kind FROM rows r JOIN facets f ON f.id = r.id "
            "WHERE r.source_id = ? AND r.idx = ?", (src.id, index))
        cur.row_factory = sqlite3.Row
        row = cur.fetchone()
        if row is None or row["kind"] != kind:
            raise NotFound(f"no {what} {source}#{index} (rows: 0 to {src.rows - 1})"
                           if row is None else f"{source}#{index} is not a {what}")
        return row, src, st

    def _neighbours(self, src: _SourceInfo, index: int) -> dict[str, str | None]:
        kind = src.kind
        return {
            "prev": row_url(kind, src.name, index - 1) if index > 0 else None,
            "next": row_url(kind, src.name, index + 1) if index + 1 < src.rows else None,
        }

    def pair(self, source: str, index: int) -> PairOut:
        """One preference pair: the shared context, both responses, their word diff, flags."""
        row, src, st = self._row(KIND_PAIR, source, index)
        chosen, rejected = row["chosen"] or "", row["rejected"] or ""
        diff_c, diff_r = word_diff(chosen, rejected)
        flags = st.flag_names(row["flags"])
        return PairOut(
            kind="pairs", source=src.name, subset=src.subset, split=src.split, index=index,
            line=row["line"], url=row_url(PAIRS, src.name, index), num_turns=row["num_turns"],
            flags=[FlagOut(name=f, description=st.flag_desc.get(f, f)) for f in flags],
            context=split_turns(row["roles"], row["context"]),
            rejected_context=(split_turns(row["rejected_roles"], row["rejected_context"])
                              if row["rejected_roles"] is not None else None),
            chosen=chosen, rejected=rejected,
            diff=DiffOut(chosen=diff_c, rejected=diff_r),
            **self._neighbours(src, index))

    def redteam(self, source: str, index: int) -> RedTeamOut:
        """One red-team attempt: its transcript, metadata and scores."""
        row, src, _ = self._row(KIND_REDTEAM, source, index)
        meta = json.loads(row["meta"] or "{}")
        return RedTeamOut(
            kind="redteam", source=src.name, index=index, line=row["line"],
            url=row_url(REDTEAM, src.name, index),
            transcript=split_turns(row["roles"], row["context"]),
            task_description=row["task"] or "", model_type=row["model_type"],
            num_params=row["num_params"], rating=row["rating"],
            min_harmlessness_score_transcript=row["score"],
            task_description_harmlessness_score=meta.get(TASK_SCORE),  # the canonical name
            red_team_member_id=meta.get("red_team_member_id"),
            is_upworker=bool(row["upworker"]), tags=meta.get("tags"),
            **self._neighbours(src, index))

    # --- overview -----------------------------------------------------------------------
    def overview(self) -> OverviewOut:
        """Counts per file, subset and split; audit flag counts; red-team counts per cell."""
        con, st = self.connection()
        cached = st.cache.get("overview")
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        bits = st.flag_bits
        flag_counts: dict[str, int] = {}
        flagged = 0
        pairs = con.execute("SELECT count(*) FROM facets WHERE kind = 0").fetchone()[0]
        if bits:
            sums = ", ".join(f"sum(flags >> {b} & 1)" for b in bits.values())
            row = con.execute(f"SELECT {sums}, sum(flags != 0) FROM facets WHERE kind = 0"
                              ).fetchone()
            flag_counts = {name: int(row[i] or 0) for i, name in enumerate(bits)}
            flagged = int(row[-1] or 0)
        cells = [
            CellOut(model_type=m, num_params=s, attacks=n, mean_rating=r, success_share=ok,
                    mean_min_harmlessness_score=sc)
            for m, s, n, r, ok, sc in con.execute(
                "SELECT model_type, num_params, count(*), avg(rating), avg(rating >= 3), "
                "avg(score) FROM facets WHERE kind = 1 GROUP BY model_type, num_params "
                "ORDER BY model_type, min(num_parameters)")
        ]
        has_plot = con.execute(f"SELECT count(*) FROM meta WHERE key = '{STATS_STATE}'"
                               ).fetchone()[0] > 0
        # Names, never paths (a local file is named by its file name): the overview is for
        # anyone the app is shared with.
        out = OverviewOut(
            database=self.path.name, built_at=st.meta.get("built_at"),
            sources=[SourceOut(name=s.name, subset=s.subset, split=s.split,
                               kind=_kind(s.kind), rows=s.rows, sha256=s.sha256, size=s.size,
                               indexed_at=s.indexed_at)
                     for s in st.sources.values()],
            pairs=pairs,
            redteam_attempts=sum(s.rows for s in st.sources.values() if s.kind == REDTEAM),
            flagged_pairs=flagged,
            flags=[FlagCountOut(name=name, description=st.flag_desc.get(name, name),
                                cross_row=name in st.cross_row, rows=flag_counts.get(name, 0))
                   for name in bits],
            redteam_cells=cells,
            stats_plot="/stats.png" if has_plot else None)
        st.cache["overview"] = out
        return out

    def facets(self) -> FacetsOut:
        """The values each filter takes in this database."""
        _, st = self.connection()
        return FacetsOut(
            kinds=[PAIRS, REDTEAM], subsets=st.subsets, splits=st.splits,
            flags=[FlagOut(name=n, description=st.flag_desc.get(n, n)) for n in st.flag_bits],
            model_types=st.model_types, sizes=st.sizes,
            tags=[TagCountOut(tag=t, rows=n) for t, n in st.tags], workers=list(WORKERS),
            sorts=[SortOut(name=k, description=v) for k, v in SORTS.items()])

    def stats_png(self) -> bytes | None:
        """The statistics figure of the indexed pairs, drawn (once per database file) from the
        counts the index keeps: the figure comes from :mod:`hhrlhf.stats`, like the CLI's."""
        con, st = self.connection()
        if "stats_png" in st.cache:
            return st.cache["stats_png"]  # type: ignore[no-any-return]
        row = con.execute("SELECT value FROM meta WHERE key = ?", (STATS_STATE,)).fetchone()
        png = None
        if row:
            from hhrlhf.stats import Stats, stats_png

            stats = Stats.from_state(json.loads(row[0]))
            png = stats_png(stats) if stats.rows else None
        st.cache["stats_png"] = png
        return png


def _kind(name: str) -> Literal["pairs", "redteam"]:
    return "pairs" if name == PAIRS else "redteam"


def _range(where: list[str], args: list[Any], column: str, name: str, low: float | None,
           high: float | None) -> None:
    for v, label in ((low, f"{name}_min"), (high, f"{name}_max")):
        if v is not None and (isinstance(v, float) and not math.isfinite(v)):
            raise QueryError(f"{label} must be a finite number")
    if low is not None and high is not None and low > high:
        raise QueryError(f"{name}_min ({low:g}) is above {name}_max ({high:g}): "
                         "an empty range")
    if low is not None:
        where.append(f"{column} >= ?")
        args.append(low)
    if high is not None:
        where.append(f"{column} <= ?")
        args.append(high)
