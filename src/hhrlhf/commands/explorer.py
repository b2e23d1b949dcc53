"""`hhrlhf index` and `hhrlhf serve`: the explorer's search index and its local web app."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import click

from hhrlhf.errors import HHRLHFError

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _build(paths: tuple[Path, ...], db: Path | None, rebuild: bool) -> Path:
    from hhrlhf.explorer.index import IndexConfig, build_index

    report = build_index(IndexConfig(db_path=db, paths=paths, rebuild=rebuild,
                                     progress=sys.stderr.isatty()))
    for line in report.lines():
        click.echo(line)
    return report.db_path


@click.command("index")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--db", type=click.Path(path_type=Path, dir_okay=False),
              help="Database file.  [default: <cache>/explorer.sqlite]")
@click.option("--rebuild", is_flag=True, help="Index every file again, changed or not.")
def index(paths: tuple[Path, ...], db: Path | None, rebuild: bool) -> None:
    """Build the SQLite search index over every fetched file, plus PATHS (local files).

    Incremental: files whose SHA-256 has not changed since the last build are skipped. The new
    database replaces the old one only when complete.
    """
    _build(paths, db, rebuild)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY on accepted sockets only when their
    # proto says TCP; without it a response written in two parts waits ~40 ms (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise HHRLHFError(f"cannot listen on {host}:{port}: {e.strerror or e}; "
                          "pick another with --port") from None
    return sock


@click.command("serve")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback shows the data to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--db", type=click.Path(path_type=Path, dir_okay=False),
              help="Database file.  [default: <cache>/explorer.sqlite]")
@click.option("--no-update", is_flag=True,
              help="Serve the database as it is (it is still built when missing).")
def serve(paths: tuple[Path, ...], host: str, port: int, db: Path | None,
          no_update: bool) -> None:
    """Browse and search the data in a local web app (and its JSON API).

    Brings the index up to date first (built on first use; unchanged files are skipped).
    """
    from hhrlhf.extras import require

    require("explorer", "hhrlhf serve")
    import uvicorn

    from hhrlhf.explorer.app import create_app
    from hhrlhf.explorer.index import default_db_path

    db_path = db or default_db_path()
    if not no_update or not db_path.exists() or paths:
        db_path = _build(paths, db, False)
    if host not in _LOOPBACK:
        click.echo(f"hhrlhf: note: listening on {host}: anyone who can reach this machine can "
                   "read the data", err=True)
    sock = _bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {db_path} at http://{shown}:{port}/ (Ctrl+C to stop)")
    config = uvicorn.Config(create_app(db_path), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
