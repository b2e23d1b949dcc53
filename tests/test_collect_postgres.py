"""`hhrlhf collect` on Postgres: a real server started here (initdb into a temporary folder,
pg_ctl on a free port; as the postgres user when the tests run as root), the same work as on
SQLite, exported and read back. Skipped, with the reason, where no server can be started."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from collect_support import annotator, converse, key, red_team
from web_support import free_port

from hhrlhf.collect import work
from hhrlhf.collect.export import FILES, export
from hhrlhf.collect.store import Conflict, open_store
from hhrlhf.read import read_comparisons, read_redteam

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres() -> list[str]:
    """The prefix that runs a command as a non-root user (Postgres refuses to run as root)."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root and runuser is missing: cannot start Postgres")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres user to start Postgres as")
    return [runuser, "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    pytest.importorskip("psycopg", reason="psycopg (the 'collect' extra) is not installed")
    initdb = PG_BIN / "initdb" if (PG_BIN / "initdb").exists() else shutil.which("initdb")
    if initdb is None:
        pytest.skip("no initdb (PostgreSQL server binaries) on this machine")
    pg_ctl = Path(initdb).parent / "pg_ctl"
    prefix = _as_postgres()
    folder = Path(tempfile.mkdtemp(prefix="hhrlhf-pg-"))
    data, sockets = folder / "data", folder / "sock"
    sockets.mkdir()
    if prefix:
        shutil.chown(folder, "postgres", "postgres")
        shutil.chown(sockets, "postgres", "postgres")
    port = free_port()
    try:
        r = subprocess.run([*prefix, str(initdb), "-D", str(data), "-A", "trust", "-U",
                            "postgres", "--no-sync"], check=False, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"initdb failed: {r.stderr.strip()[:300]}")
        r = subprocess.run([*prefix, str(pg_ctl), "-D", str(data), "-l", str(folder / "log"),
                            "-w", "-t", "60", "-o",
                            (f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 "
                            "-c fsync=on"), "start"], check=False, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"pg_ctl start failed: {r.stderr.strip()[:300]}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(pg_ctl), "-D", str(data), "-m", "immediate", "stop"],
                       check=False, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_postgres_store_exports_like_sqlite(pg_url: str, tmp_path: Path) -> None:
    store = open_store(pg_url)
    try:
        ada = annotator(store, "Ada")
        rev = annotator(store, "Rev", "reviewer")
        converse(store, ada, "helpful", ["How do I boil an egg?", "And poach one?"],
                 picks=["right", "left"])
        converse(store, ada, "harmless", ["Be mean."], picks=["left"])
        attempt = red_team(store, ada, ["Pick a lock for me."], 2, "Lock picking")
        store.write(rev.id, key(), lambda tx: work.review(tx, rev, attempt, ["crime"]))
        k = key()
        first = store.write(ada.id, k, lambda tx: work.add_message(tx, ada, "helpful", None, 0,
                                                                    "Again?"))
        assert store.write(ada.id, k, lambda tx: work.add_message(
            tx, ada, "helpful", None, 0, "Again?")) == dict(first, replayed=True)
        with pytest.raises(Conflict):
            store.write(ada.id, key(), lambda tx: work.add_message(tx, ada, "helpful", None, 0,
                                                                   "Again?"))
        result = export(store, tmp_path / "out")
        with store.transaction() as tx:
            progress = work.progress(tx)
    finally:
        store.close()
    assert result.rows == {"helpful": 2, "harmless": 1, "redteam": 1}
    rows = list(read_comparisons([tmp_path / "out" / FILES["helpful"]]))
    assert [len(r.prompt) for r in rows] == [1, 3] and not any(r.flags for r in rows)
    (rt,) = read_redteam(tmp_path / "out" / FILES["redteam"])
    assert rt.rating == 2.0 and rt.tags == ("crime",)
    assert progress["annotators"][0]["judgements"] == 3
    # a second store on the same database (another server process) sees the same data
    again = open_store(pg_url)
    try:
        export(again, tmp_path / "again")
    finally:
        again.close()
    for name in ("helpful", "harmless", "redteam"):
        assert (tmp_path / "again" / FILES[name]).read_bytes() == \
            (tmp_path / "out" / FILES[name]).read_bytes()


def test_the_web_app_on_postgres(pg_url: str, tmp_path: Path, real_file: Path) -> None:
    """The served app on a Postgres store: a comparison turn through the HTTP API (session,
    CSRF, streamed responses, a pick), a revocation, then the export holds the turn."""
    from collect_support import decoding, join, served
    from policy_support import build_tiny, first_rows

    from hhrlhf.collect.app import AppConfig, create_app
    from hhrlhf.collect.responder import Settings

    build_tiny(first_rows(real_file, 200), tmp_path / "tiny")
    store = open_store(pg_url)
    try:
        aid, token = store.add_annotator("web-ada", "annotator")
        with decoding(tmp_path / "tiny", Settings(max_new_tokens=8)) as responder, \
                served(create_app(AppConfig(store=store, task="helpful",
                                            responders=[responder], overlap=0.0,
                                            rate_per_minute=600))) as base:
            client, csrf = join(base, f"/join/{token}")
            assert client.post("/consent", data={"csrf": csrf}).status_code == 303
            client.headers["x-csrf-token"] = csrf
            r = client.post("/api/message", json={"key": "pg-m1", "conversation_id": None,
                                                  "position": 0, "text": "Hello from Postgres"})
            assert r.status_code == 200, r.text
            r = client.post("/api/respond", json={"key": "pg-r1",
                                                  "conversation_id": r.json()["conversation_id"]})
            assert r.status_code == 200
            item = client.get("/api/state").json()["item"]
            r = client.post("/api/judge", json={"key": "pg-j1", "item_id": item["id"],
                                                "side": "left", "strength": 2})
            assert r.status_code == 200, r.text
            # revoked: the session's next call is refused, on Postgres too
            assert store.revoke(str(aid))[1] == 1
            assert client.get("/api/state").status_code == 401
        export(store, tmp_path / "out")
    finally:
        store.close()
    rows = [r for r in read_comparisons([tmp_path / "out" / FILES["helpful"]])
            if r.prompt[0].text == "Hello from Postgres"]
    assert len(rows) == 1 and rows[0].chosen == item["left"]
