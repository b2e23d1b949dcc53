"""`hhrlhf collect` under load: many simulated annotators submitting at once, then kill -9.

The real server (``hhrlhf collect serve``, a process of its own, the embedded SQLite default)
on a tiny policy built here, which it decodes in its own child process (``hhrlhf policy
serve``); A annotators (asyncio + httpx, one client each, invited first, spread over a few
client processes so that the clients' own interpreter lock does not inflate what they
measure) each loop: write a message (a submit), stream the two responses (model time: timed
apart), pick one (a submit), and every few turns start a new conversation (a submit). Every
submit carries its own idempotency key and is retried with the same key until it is
acknowledged, as the browser does. The annotators start within one second of each other.
Before each message and each pick an annotator pauses for ``--think`` seconds on average
(0.5 to 1.5 times it; default 1 s: a person reading two responses and choosing takes ten
seconds or more, so 50 such annotators are a lab of several hundred people). ``--think 0``
takes no pause at all: every client submits again as soon as it can, which measures the
server's capacity (saturated, where latency is queueing) rather than its latency. Each client
logs what was acknowledged, and the server's own time of each submit (its ``Server-Timing``
header: from the request's arrival in the app to its answer, the durable write included).

Phase 1 runs for ``--seconds``: submit latency (request to acknowledgement, excluding the
model) is measured here. Phase 2 keeps the load on, kills the server with SIGKILL, starts it
again on the same database and port, and runs on for a while. Then, from the database and
from ``hhrlhf collect export``: every acknowledged message is stored exactly once, every
acknowledged pick once, and every acknowledged pick is a row of the export. Lost = an
acknowledged submit missing; duplicated = a submit stored more than once.

Streaming: before the load, the time to the first token as a client reads the server-sent
events (one annotator's turns on the idle server), against the sampler's own first-token time
(the decode process's engine in this process, the same two-response request); and the
client's first-token time under phase 1's load.

The last line: ``collect: <A> annotators, <S> submits, lost <L>, duplicated <D>,
submit p95 <X> ms``.

    .venv/bin/python benchmarks/bench_collect.py [--quick] [--annotators 50] [--seconds 60]
        [--think 1.0] [--client-processes 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
START_SPREAD_S = 1.0
MAX_NEW_TOKENS = 8


@dataclass
class Log:
    """One simulated annotator's own record of what the server acknowledged."""

    aid: int
    messages: list[str] = field(default_factory=list)  # acknowledged message texts
    picks: list[int] = field(default_factory=list)  # acknowledged item ids
    finishes: int = 0
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start time, seconds)
    server: list[tuple[float, float]] = field(default_factory=list)  # the server's own time
    model: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)  # to the first token the client reads
    retries: int = 0
    n: int = 0  # submits made: numbers the idempotency keys across both phases


def build_policy(out: Path) -> None:
    from hhrlhf.policy.model import TinyConfig, init_tiny
    from hhrlhf.read import read_comparisons

    rows = []
    for c in read_comparisons([DATA]):
        rows.append(c.chosen_raw)
        if len(rows) >= 200:
            break
    init_tiny(rows, out, TinyConfig(vocab_size=600, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=512))


def start_server(db: Path, policy: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hhrlhf.cli", "collect", "serve", "--db", str(db),
           "--policy", str(policy), "--task", "helpful", "--port", str(port),
           "--max-new-tokens", str(MAX_NEW_TOKENS), "--rate", "100000", "--overlap", "0.1"]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


async def wait_up(base: str, server: subprocess.Popen[bytes], log: Path,
                  timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                await client.get(base + "/healthz", timeout=5)
                return
            except httpx.TransportError:
                if server.poll() is not None:
                    sys.exit(f"the server stopped: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


class Annotator:
    def __init__(self, base: str, aid: int, token: str, log: Log, think: float = 0.0):
        self.base, self.aid, self.token, self.log = base, aid, token, log
        self.think = think
        self.client = httpx.AsyncClient(base_url=base, timeout=120, follow_redirects=True)
        self.csrf = ""

    async def enter(self) -> None:
        """Sign in as a script does: GET the invite link (the sign-in page: its form token,
        tied to the pre-session cookie it sets), POST the form; consent."""
        while True:
            page = await self.retry(lambda: self.client.get(f"/join/{self.token}"))
            m = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert m, page.text
            form = {"csrf": m.group(1)}
            r = await self.retry(lambda f=form: self.client.post(f"/join/{self.token}", data=f))
            if r.status_code == 200:  # followed the redirect to the consent page
                break
            await asyncio.sleep(0.25)  # the server restarted between the two (a new secret)
        m = re.search(r'name="csrf" content="([^"]+)"', r.text)
        assert m, r.text
        self.csrf = m.group(1)
        self.client.headers["x-csrf-token"] = self.csrf
        await self.retry(lambda: self.client.post("/consent", data={"csrf": self.csrf}))

    async def retry(self, call: Any) -> httpx.Response:
        """Until the server answers (it may be down: killed and restarting)."""
        while True:
            try:
                r = await call()
            except httpx.TransportError:
                self.log.retries += 1
                await asyncio.sleep(0.25)
                continue
            if r.status_code >= 500 or r.status_code == 429:
                self.log.retries += 1
                await asyncio.sleep(0.25)
                continue
            return r

    async def submit(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.log.n += 1
        body["key"] = f"a{self.aid}-s{self.log.n}"  # one key per submit, kept across retries
        t0 = time.monotonic()
        r = await self.retry(lambda: self.client.post(path, json=body))
        self.log.latencies.append((t0, time.monotonic() - t0))
        m = re.search(r"app;dur=([0-9.]+)", r.headers.get("server-timing", ""))
        if m:
            self.log.server.append((t0, float(m.group(1)) / 1000))
        return r.status_code, r.json()

    async def state(self) -> dict[str, Any]:
        r = await self.retry(lambda: self.client.get("/api/state"))
        return dict(r.json())

    async def respond(self, cid: int) -> dict[str, Any]:
        """The two responses, read as the browser reads them: server-sent events as they
        come. Times the first token (the first ``delta`` event) and the whole."""
        t0 = time.monotonic()
        while True:
            first, text = None, ""
            try:
                async with self.client.stream("POST", "/api/respond", json={
                        "conversation_id": cid, "key": "r"}) as r:
                    async for chunk in r.aiter_text():
                        if first is None and "event: delta" in chunk:
                            first = time.monotonic() - t0
                        text += chunk
            except httpx.TransportError:
                self.log.retries += 1
                await asyncio.sleep(0.25)
                continue
            if r.status_code == 200 and "event: done" in text:
                data = text.rsplit("event: done\ndata: ", 1)[1].split("\n\n", 1)[0]
                self.log.model.append(time.monotonic() - t0)
                if first is not None:
                    self.log.first.append(first)
                return dict(json.loads(data))
            self.log.retries += 1
            await asyncio.sleep(0.25)

    async def run(self, until: Until) -> None:
        # people do not all start in the same millisecond: each starts within the first
        # second
        await asyncio.sleep(random.uniform(0, START_SPREAD_S))
        await self.enter()
        while not until.done:
            state = await self.state()
            item = state.get("item")
            if state["mode"] == "overlap" or item is not None:
                await self.pause()  # reading the two responses
                code, _ = await self.submit("/api/judge", {"item_id": item["id"],
                                                           "side": "left", "strength": 1})
                if code == 200:
                    self.log.picks.append(item["id"])
                continue
            if state["needs_response"]:
                await self.respond(state["conversation_id"])
                continue
            if len(state["turns"]) >= 6:
                code, _ = await self.submit("/api/finish",
                                            {"conversation_id": state["conversation_id"]})
                self.log.finishes += code == 200
                continue
            await self.pause()  # writing the message
            text = f"annotator {self.aid} message {self.log.n}"
            code, _answer = await self.submit("/api/message", {
                "conversation_id": state["conversation_id"], "position": len(state["turns"]),
                "text": text})
            if code == 200:
                self.log.messages.append(text)

    async def pause(self) -> None:
        if self.think > 0:
            await asyncio.sleep(random.uniform(0.5, 1.5) * self.think)

    async def close(self) -> None:
        await self.client.aclose()


STREAM_PROBES = 8


async def idle_streams(base: str, aid: int, token: str) -> list[float]:
    """First-token times as a client reads them from the idle server: one annotator's
    ``STREAM_PROBES`` turns, one after another (message, the two responses, a pick)."""
    annotator = Annotator(base, aid, token, Log(aid))
    await annotator.enter()
    for _ in range(STREAM_PROBES):
        state = await annotator.state()
        if len(state["turns"]) >= 6:
            await annotator.submit("/api/finish", {"conversation_id": state["conversation_id"]})
            state = await annotator.state()
        await annotator.submit("/api/message", {
            "conversation_id": state["conversation_id"], "position": len(state["turns"]),
            "text": f"probe message {annotator.log.n}"})
        state = await annotator.state()
        state = await annotator.respond(state["conversation_id"])
        item = state.get("item") or (await annotator.state())["item"]
        await annotator.submit("/api/judge", {"item_id": item["id"], "side": "left",
                                              "strength": 1})
    await annotator.close()
    return annotator.log.first


def sampler_first_token(policy: Path, max_new_tokens: int) -> list[float]:
    """The sampler's own first-token time, in this process with nothing else running: the
    decode process's engine (``hhrlhf policy serve``'s) on the same two-response request,
    from the request to its first decode step."""
    import torch

    from hhrlhf.policy.model import Policy
    from hhrlhf.policy.server import CompletionRequest, Engine, completion_dialogue

    torch.set_num_threads(1)  # as the decode process runs (OMP_NUM_THREADS=1)
    engine = Engine(Policy.load(str(policy)), default_max_tokens=max_new_tokens)
    out = []
    for i in range(STREAM_PROBES + 2):
        prompt = f"\n\nHuman: probe message {i}\n\nAssistant:"
        req = CompletionRequest(prompt=prompt, n=2, max_tokens=max_new_tokens, seed=i,
                                stream=True, temperature=1.0, top_p=1.0, top_k=0,
                                truncate_prompt_tokens=None)
        t0 = time.monotonic()
        job = engine.job([completion_dialogue(prompt)], req, None)
        steps = engine.sampler.stream(job.prompts, n=job.n, max_new_tokens=job.max_tokens,
                                      temperature=job.temperature, seed=job.seed)
        next(steps)
        out.append(time.monotonic() - t0)
        steps.close()
    return out[2:]  # the first two warm the model up


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def load_here(base: str, tokens: list[tuple[int, str]], logs: list[Log], stop: Any,
                    think: float) -> list[Log]:
    annotators = [Annotator(base, aid, tok, log, think)
                  for (aid, tok), log in zip(tokens, logs)]
    until = Until()
    tasks = [asyncio.create_task(a.run(until)) for a in annotators]
    while not stop.is_set():  # asked now and then, not by every client on every turn
        await asyncio.sleep(0.1)
    until.done = True
    await asyncio.gather(*tasks)
    for a in annotators:
        await a.close()
    return logs


class Until:
    done = False


CLIENT_NICENESS = 5


def client_started() -> None:
    """A client process starts at a lower CPU priority: the annotators' browsers run on their
    own machines, and here the load generator would otherwise take the server's cores (it
    still goes before the decode process, at niceness 10)."""
    os.nice(CLIENT_NICENESS)


def client_process(base: str, tokens: list[tuple[int, str]], logs: list[Log],
                   stop: Any, think: float) -> list[Log]:
    """One client process: its share of the annotators, until ``stop`` is set."""
    return asyncio.run(load_here(base, tokens, logs, stop, think))


def load(pool: ProcessPoolExecutor, stop: Any, processes: int, base: str,
         tokens: list[tuple[int, str]], logs: list[Log], seconds: float, think: float,
         kill: Any) -> list[Log]:
    """The annotators, spread over ``processes`` client processes, for ``seconds`` (and at
    least a few seconds after ``kill``, if any, which runs here meanwhile and returns when
    the server is back). Their logs, in order."""
    stop.clear()
    stop_at = time.monotonic() + seconds
    shares = [list(range(i, len(tokens), processes)) for i in range(processes)]
    futures = [pool.submit(client_process, base, [tokens[j] for j in share],
                           [logs[j] for j in share], stop, think)
               for share in shares if share]
    if kill is not None:
        asyncio.run(kill())
        stop_at = max(stop_at, time.monotonic() + 5)
    time.sleep(max(0.0, stop_at - time.monotonic()))
    stop.set()
    out: list[Log | None] = [None] * len(logs)
    for share, future in zip([s for s in shares if s], futures):
        for j, log in zip(share, future.result()):
            out[j] = log
    assert all(log is not None for log in out)
    return [log for log in out if log is not None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="12 s of load, 10 s around the kill")
    ap.add_argument("--annotators", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0, help="phase 1 (latency)")
    ap.add_argument("--kill-seconds", type=float, default=25.0, help="phase 2 (kill -9)")
    ap.add_argument("--think", type=float, default=1.0,
                    help="an annotator's mean pause before a message or a pick, seconds "
                         "(0: none, the server saturated)")
    ap.add_argument("--client-processes", type=int, default=4,
                    help="processes the simulated annotators are spread over")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.kill_seconds = 12.0, 10.0
    sys.path.insert(0, str(ROOT / "src"))
    from hhrlhf.collect.export import FILES, export, side_name
    from hhrlhf.collect.store import open_store

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}; {args.annotators} annotators, phase 1 "
          f"{args.seconds:g} s, phase 2 (kill -9 and restart) {args.kill_seconds:g} s; "
          f"{args.client_processes} client processes; " + (
              f"a pause of {args.think * 0.5:g}-{args.think * 1.5:g} s before each message "
              "and pick" if args.think > 0 else "no pause (the server saturated)"))
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        build_policy(tmp / "policy")
        db = tmp / "collect.sqlite"
        store = open_store(db)
        tokens = [store.add_annotator(f"sim{i}") for i in range(args.annotators)]
        probe = store.add_annotator("probe")
        store.close()
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        server_log = tmp / "server.log"
        server = start_server(db, tmp / "policy", port, server_log)
        asyncio.run(wait_up(base, server, server_log))
        own_first = sampler_first_token(tmp / "policy", MAX_NEW_TOKENS)
        idle_first = asyncio.run(idle_streams(base, *probe))
        logs = [Log(aid) for aid, _ in tokens]
        processes = max(1, min(args.client_processes, args.annotators))
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(processes, mp_context=context, initializer=client_started)
        list(pool.map(abs, range(processes)))  # the client processes started before the clock
        manager = context.Manager()
        stop = manager.Event()

        # phase 1: steady load; submit latency
        t_start = time.monotonic()
        logs = load(pool, stop, processes, base, tokens, logs, args.seconds, args.think, None)
        phase1_end = time.monotonic()
        lat = [d for log in logs for t0, d in log.latencies if t0 < phase1_end]
        model = [d for log in logs for d in log.model]
        own = [d for log in logs for t0, d in log.server if t0 < phase1_end]
        submits1 = len(lat)
        print(f"phase 1: {submits1:,} submits in {phase1_end - t_start:.1f} s "
              f"({submits1 / (phase1_end - t_start):.0f}/s); submit latency p50 "
              f"{percentile(lat, 50) * 1000:.1f} ms, p95 {percentile(lat, 95) * 1000:.1f} ms, "
              f"p99 {percentile(lat, 99) * 1000:.1f} ms (server's own time p50 "
              f"{percentile(own, 50) * 1000:.1f} ms, p95 {percentile(own, 95) * 1000:.1f} ms); "
              f"model (two responses, streamed) p50 {percentile(model, 50) * 1000:.0f} ms, "
              f"p95 {percentile(model, 95) * 1000:.0f} ms")
        loaded_first = [d for log in logs for d in log.first]
        print(f"streaming: first token as the client reads it p50 "
              f"{percentile(idle_first, 50) * 1000:.0f} ms on the idle server, "
              f"{percentile(loaded_first, 50) * 1000:.0f} ms (p95 "
              f"{percentile(loaded_first, 95) * 1000:.0f} ms) under phase 1's load; the "
              f"sampler's own first token p50 {percentile(own_first, 50) * 1000:.0f} ms "
              f"(in-process, idle, the same two-response request)")

        # phase 2: kill -9 under load, restart, go on
        restarted: dict[str, float] = {}

        async def kill() -> None:
            nonlocal server
            await asyncio.sleep(args.kill_seconds / 3)
            restarted["t_kill"] = t_kill = time.monotonic()
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
            server = start_server(db, tmp / "policy", port, server_log)
            await wait_up(base, server, server_log)
            restarted["down_s"] = time.monotonic() - t_kill

        retries1 = sum(log.retries for log in logs)
        logs = load(pool, stop, processes, base, tokens, logs, args.kill_seconds, args.think,
                    kill)
        pool.shutdown()
        manager.shutdown()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        acked = [t0 + d for log in logs for t0, d in log.latencies]
        before = sum(t < restarted["t_kill"] for t in acked)
        print(f"phase 2: server killed with SIGKILL under load ({before - submits1} "
              f"submits acknowledged in phase 2 before it, requests failing meanwhile "
              f"{sum(log.retries for log in logs) - retries1:,}), back after "
              f"{restarted['down_s']:.1f} s; {len(acked) - before} submits acknowledged after")

        # the check, against each client's own log
        store = open_store(db)
        with store.transaction() as tx:
            human = tx.all("SELECT text, COUNT(*) FROM turns WHERE role = 'human' "
                           "GROUP BY text")
            judged = tx.all("SELECT annotator_id, item_id, COUNT(*) FROM judgements "
                            "GROUP BY annotator_id, item_id")
            integrity = tx.one("PRAGMA integrity_check")
        stored_msgs = {t: n for t, n in human}
        stored_picks = {(a, i): n for a, i, n in judged}
        acked_msgs = [m for log in logs for m in log.messages]
        acked_picks = [(log.aid, i) for log in logs for i in log.picks]
        lost = sum(m not in stored_msgs for m in acked_msgs) + \
            sum(p not in stored_picks for p in acked_picks)
        duplicated = sum(n - 1 for n in stored_msgs.values() if n > 1) + \
            sum(n - 1 for n in stored_picks.values() if n > 1) + \
            (len(acked_msgs) - len(set(acked_msgs))) + (len(acked_picks) - len(set(acked_picks)))
        result = export(store, tmp / "export")
        store.close()
        side = [json.loads(line) for line in
                (tmp / "export" / side_name(FILES["helpful"])).read_text().splitlines()]
        exported = {(s["annotator_id"], s["item_id"]) for s in side}
        second = {(o["annotator_id"], s["item_id"]) for s in side for o in s["second_opinions"]}
        missing_export = sum(p not in exported and p not in second for p in acked_picks)
        lost += missing_export
        submits = sum(len(log.latencies) for log in logs)
        retries = sum(log.retries for log in logs)
        print(f"check: {len(acked_msgs):,} messages and {len(acked_picks):,} picks "
              f"acknowledged; {result.rows.get('helpful', 0):,} rows exported; acknowledged "
              f"picks missing from the export: {missing_export}; client retries {retries:,}; "
              f"integrity {integrity[0] if integrity else '?'}")
        print(f"collect: {args.annotators} annotators, {submits} submits, lost {lost}, "
              f"duplicated {duplicated}, submit p95 {percentile(lat, 95) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
