"""`hhrlhf index` and `hhrlhf serve`: the explorer's search index and its local web app."""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import sys
from pathlib import Path
from typing import Any

import click

from hhrlhf.commands.options import quiet_option
from hhrlhf.errors import HHRLHFError

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _build(paths: tuple[Path, ...], db: Path | None, rebuild: bool, quiet: bool) -> Path:
    from hhrlhf.explorer.index import IndexConfig, build_index

    report = build_index(IndexConfig(db_path=db, paths=paths, rebuild=rebuild,
                                     progress=not quiet and sys.stderr.isatty()))
    for line in report.lines():
        click.echo(line)
    return report.db_path


@click.command("index")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--db", type=click.Path(path_type=Path, dir_okay=False),
              help="Database file.  [default: <cache>/explorer.sqlite]")
@click.option("--rebuild", is_flag=True, help="Index every file again, changed or not.")
@quiet_option("No progress bars (drawn on a terminal only).")
def index(paths: tuple[Path, ...], db: Path | None, rebuild: bool, quiet: bool) -> None:
    """Build the SQLite search index over every fetched file, plus PATHS (local files).

    Incremental: files whose SHA-256 has not changed since the last build are skipped. The new
    database replaces the old one only when complete. Runs at once take turns (a lock); a file
    at --db that is not an hhrlhf index is never replaced; a damaged index is built again.
    """
    _build(paths, db, rebuild, quiet)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port; a bad host and a busy port are told apart (only the
    second is fixed by another --port)."""
    address = _listen_address(host, port)
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY on accepted sockets only when their
    # proto says TCP; without it a response written in two parts waits ~40 ms (Nagle).
    sock = socket.socket(address[0], socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address[1])
    except OSError as e:
        sock.close()
        where = f"cannot listen on {host}:{port}"
        if e.errno == errno.EADDRINUSE:
            raise HHRLHFError(f"{where}: the port is in use; pick another with --port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise HHRLHFError(f"{where}: {host} is not an address of this machine "
                              "(--host 127.0.0.1: this machine only; 0.0.0.0: all of its "
                              "addresses)") from None
        if e.errno == errno.EACCES:
            raise HHRLHFError(f"{where}: permission denied (ports below 1024 need "
                              "privileges); pick another with --port") from None
        raise HHRLHFError(f"{where}: {e.strerror or e}") from None
    return sock


def _listen_address(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """(family, socket address) for --host: an IP address, or a name this machine resolves."""
    if re.fullmatch(r"[0-9.]+", host):  # looks like IPv4: never sent to a name server
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise HHRLHFError(f"--host {host} is not a valid IPv4 address") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise HHRLHFError(f"--host {host} is not an address or a known name of this machine "
                          f"({e.strerror})") from None
    family, _, _, _, address = infos[0]
    return family, address


@click.command("serve")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback shows the data to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--db", type=click.Path(path_type=Path, dir_okay=False),
              help="Database file.  [default: <cache>/explorer.sqlite]")
@click.option("--no-update", is_flag=True,
              help="Serve the database as it is (it is still built when missing).")
@quiet_option("No progress bars while the index is built (drawn on a terminal only).")
def serve(paths: tuple[Path, ...], host: str, port: int, db: Path | None,
          no_update: bool, quiet: bool) -> None:
    """Browse and search the data in a local web app (and its JSON API).

    Brings the index up to date first (built on first use; unchanged files are skipped).
    """
    from hhrlhf.extras import require

    require("explorer", "hhrlhf serve")
    import uvicorn

    from hhrlhf.explorer.app import create_app
    from hhrlhf.explorer.index import check_index, default_db_path

    sock = _bind(host, port)  # before the index is built: a bad --host or --port fails at once
    db_path = db or default_db_path()
    # Even with --no-update a damaged database is built again (the build says so): served,
    # it would answer every page with an error.
    try:
        if not no_update or not db_path.exists() or paths or check_index(db_path) is not None:
            db_path = _build(paths, db, False, quiet)
    except BaseException:
        sock.close()
        raise
    if host not in _LOOPBACK:
        click.echo(f"hhrlhf: note: listening on {host}: anyone who can reach this machine can "
                   "read the data", err=True)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {db_path} at http://{shown}:{port}/ (Ctrl+C to stop)")
    config = uvicorn.Config(create_app(db_path), log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])
