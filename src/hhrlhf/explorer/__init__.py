"""The explorer: a SQLite full-text index over every dialogue, and a local web app on top of it.

- :mod:`hhrlhf.explorer.index` builds ``<cache>/explorer.sqlite`` (FTS5), incrementally per file
  and atomically (a copy is built, then renamed over the old database);
- :mod:`hhrlhf.explorer.query` answers searches and row look-ups on a read-only connection;
- :mod:`hhrlhf.explorer.app` is the FastAPI app (HTML pages and the JSON API they use).
"""

from hhrlhf.explorer.index import BuildReport, IndexConfig, build_index, default_db_path
from hhrlhf.explorer.query import ExplorerDB, QueryError, SearchParams, to_fts_query

__all__ = [
    "BuildReport",
    "ExplorerDB",
    "IndexConfig",
    "QueryError",
    "SearchParams",
    "build_index",
    "default_db_path",
    "to_fts_query",
]
