"""People as the online loop's label source (``labels: collect``): a round's comparisons come
from annotators working in the ``hhrlhf collect`` app.

A round deploys its policy: it writes ``round-RR/deploy.json`` (the time the deployment
began, the policy, the task and the address; written once, read back on resume), then runs
``hhrlhf collect serve --db DB --policy POLICY --task TASK --host H --port P`` as a child
process. The database, host and port are the loop's settings, the same in every round and
after a resume, so the invite links that the operator made once with ``hhrlhf collect invite
--db DB`` keep working. The loop reads the database (the export's own rows,
:func:`hhrlhf.collect.export.comparison_rows`) every ``collect_poll`` seconds: the round's
comparisons are the task's exported rows whose two responses were generated after the
deployment began (the side file's ``responses_at``), so rows of earlier rounds, of other
tasks, or made before the loop started never count. When ``pairs_per_round`` of them are in,
the server is stopped and the first ``pairs_per_round`` (in the export's order) are written
to ``round-RR/comparisons.jsonl.gz`` (the official format, ``chosen`` the preferred response)
with their side lines in ``round-RR/comparisons.side.jsonl``.

Every submit is committed by the server before it is acknowledged, so a loop killed (even with
SIGKILL; the server, its child, is then stopped by the kernel) loses nothing: resumed, it
reads the same ``deploy.json``, starts the server again on the same address and goes on
counting from what is in the database.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hhrlhf.child import ChildServer
from hhrlhf.errors import HHRLHFError

DEPLOY = "deploy.json"
SIDE = "comparisons.side.jsonl"


@dataclass(frozen=True)
class Deployment:
    """What a round deployed, and from when its comparisons count."""

    round: int
    started: float  # seconds since the epoch: responses generated from then on are the round's
    policy: str
    task: str
    db: str
    url: str


def _timestamp(iso: str | None) -> float:
    if not iso:
        return float("-inf")
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def round_rows(db: str, deployment: Deployment) -> tuple[list[dict[str, str]],
                                                           list[dict[str, Any]]]:
    """(official rows, side rows) of the round so far: the task's exported comparisons whose
    responses were generated after the deployment began, in the export's order."""
    from hhrlhf.collect.export import comparison_rows
    from hhrlhf.collect.store import open_store

    store = open_store(db)
    try:
        with store.transaction() as tx:
            rows, side = comparison_rows(tx, deployment.task)
    finally:
        store.close()
    # the export writes times to the millisecond, truncated
    since = int(deployment.started * 1000) / 1000 - 1e-6
    keep = [i for i, s in enumerate(side) if _timestamp(s.get("responses_at")) >= since]
    return [rows[i] for i in keep], [side[i] for i in keep]


def read_deployment(path: Path) -> Deployment:
    import json

    try:
        return Deployment(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise HHRLHFError(f"unreadable deployment record: {e}", path) from None


def collect_round(folder: Path, r: int, deployed: int, policy: Path, config: Any,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """Deploy ``policy`` in the collect app and wait for the round's quota of comparisons;
    write them into ``folder`` (``comparisons.jsonl.gz`` and its side file). The round's
    collect info."""
    from hhrlhf.runs import write_json, write_jsonl

    c = config
    k = c.pairs_per_round
    deploy_path = folder / DEPLOY
    if deploy_path.is_file():
        deployment = read_deployment(deploy_path)
    else:
        shown = f"[{c.collect_host}]" if ":" in c.collect_host else c.collect_host
        deployment = Deployment(r, time.time(), str(policy), c.collect_task, c.collect_db,
                                f"http://{shown}:{c.collect_port}/")
        write_json(deploy_path, asdict(deployment))
    rows, side = round_rows(c.collect_db, deployment)
    if len(rows) < k:
        args = [sys.executable, "-m", "hhrlhf.cli", "collect", "serve", "--db", c.collect_db,
                "--policy", deployment.policy, "--task", deployment.task,
                "--host", c.collect_host, "--port", str(c.collect_port),
                "--overlap", str(c.collect_overlap),
                "--max-new-tokens", str(c.max_new_tokens),
                "--temperature", str(c.temperature)]
        log = folder / "collect-server.log"
        server = ChildServer(args, deployment.url.rstrip("/") + "/healthz",
                             "online: the collect server", log=log)
        say(f"round {r}: deploying {deployment.policy} ({deployment.task}) at "
            f"{deployment.url}; invite annotators with `hhrlhf collect invite --db "
            f"{c.collect_db} --name NAME --url {deployment.url}`")
        try:  # a port still held by a server shutting down (a resumed loop's): tried 30 s
            server.start(timeout=300.0, busy_retry_s=30.0)
        except HHRLHFError as e:
            raise HHRLHFError(f"{e} (its log: {log})") from None
        try:
            shown_count, last_line = -1, 0.0
            while True:
                if len(rows) != shown_count or time.monotonic() - last_line > 60:
                    say(f"round {r}: {min(len(rows), k)}/{k} comparisons")
                    shown_count, last_line = len(rows), time.monotonic()
                if len(rows) >= k:
                    break
                if not server.alive():
                    raise HHRLHFError(f"online: the collect server stopped: "
                                      f"{server.last_line()} (its log: {log})")
                time.sleep(c.collect_poll)
                rows, side = round_rows(c.collect_db, deployment)
        finally:
            server.stop()
        rows, side = round_rows(c.collect_db, deployment)
    rows = rows[:k]
    # the side lines keyed by the row's place in the round's file (and the export's)
    side = [dict(s, index=i, export_index=s.get("index")) for i, s in enumerate(side[:k])]
    from hhrlhf.online.loop import write_rows

    write_rows(folder / "comparisons.jsonl.gz", rows)
    write_jsonl(folder / SIDE, side)
    return {"deployed": deployed, "source": "collect", "task": deployment.task, "labels": len(rows),
            "annotators": len({s.get("annotator_id") for s in side}),
            "url": deployment.url, "db": deployment.db, "started": deployment.started}
