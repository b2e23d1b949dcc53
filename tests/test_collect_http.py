"""`hhrlhf collect serve` over HTTP: a real server on 127.0.0.1 with a tiny policy built here,
real SQLite. Every endpoint refuses a missing or bad session and a missing CSRF token; a
whole comparison turn through the API; the rate limit; the endpoint responder against a real
OpenAI-compatible streaming server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from collect_support import join, served
from fastapi import FastAPI, Request
from policy_support import build_tiny, first_rows, one_thread  # noqa: F401
from starlette.responses import StreamingResponse

from hhrlhf.collect.app import AppConfig, create_app
from hhrlhf.collect.export import FILES, export
from hhrlhf.collect.responder import (
    EndpointResponder,
    LocalResponder,
    Settings,
    collect_text,
)
from hhrlhf.collect.store import open_store
from hhrlhf.read import read_comparisons
from hhrlhf.records import Dialogue

SETTINGS = Settings(max_new_tokens=12, max_prompt_length=96)
WRITES = ["/api/message", "/api/respond", "/api/judge", "/api/finish", "/api/attempt",
          "/api/review"]
READS = ["/", "/api/state", "/admin", "/api/admin", "/consent"]


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory, real_file: Path) -> Path:
    out = tmp_path_factory.mktemp("policy") / "tiny"
    build_tiny(first_rows(real_file, 200), out)
    return out


@pytest.fixture(scope="module")
def responder(policy: Path) -> LocalResponder:
    return LocalResponder(policy, SETTINGS)


@pytest.fixture
def site(tmp_path: Path, responder: LocalResponder) -> Iterator[dict[str, Any]]:
    store = open_store(tmp_path / "c.sqlite")
    links = {}
    for name, role in (("ada", "annotator"), ("bob", "annotator"), ("root", "admin")):
        _, token = store.add_annotator(name, role)
        links[name] = f"/join/{token}"
    app = create_app(AppConfig(store=store, task="helpful", responders=[responder],
                               overlap=0.0, rate_per_minute=600))
    with served(app) as base:
        yield {"base": base, "links": links, "store": store, "tmp": tmp_path}
    store.close()


def sse_events(response: httpx.Response) -> list[tuple[str, Any]]:
    events = []
    for chunk in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_every_endpoint_needs_a_session_and_writes_a_csrf_token(site: dict[str, Any]) -> None:
    base = site["base"]
    anon = httpx.Client(base_url=base)
    bad = httpx.Client(base_url=base, cookies={"hhrlhf_collect": "not-a-session"})
    for client in (anon, bad):
        for path in READS:
            assert client.get(path).status_code == 401, path
        for path in WRITES:
            r = client.post(path, json={"key": "k1"}, headers={"x-csrf-token": "x"})
            assert r.status_code == 401, path
    assert anon.get("/join/nope").status_code == 401
    client, csrf = join(base, site["links"]["ada"])
    # before consent: nothing but the consent page
    assert client.get("/api/state").status_code == 403
    assert client.post("/consent", data={"csrf": "wrong"}).status_code == 403
    assert client.post("/consent", data={"csrf": csrf}).status_code == 303
    assert client.get("/api/state").status_code == 200
    for path in WRITES:
        r = client.post(path, json={"key": "k2", "conversation_id": 1, "position": 0,
                                    "text": "hi"})
        assert r.status_code == 403 and "CSRF" in r.json()["detail"], path
        r = client.post(path, json={"key": "k2"}, headers={"x-csrf-token": csrf + "x"})
        assert r.status_code == 403, path
    big = client.post("/api/message", content=b"x" * 300_000,
                      headers={"x-csrf-token": csrf, "content-type": "application/json"})
    assert big.status_code == 413
    # an annotator is not an admin
    assert client.get("/admin").status_code == 403
    assert client.get("/api/admin").status_code == 403
    # the headers of every page: no inline script can run
    r = client.get("/")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "<script>" not in r.text


def consented(site: dict[str, Any], name: str) -> tuple[httpx.Client, str]:
    client, csrf = join(site["base"], site["links"][name])
    assert client.post("/consent", data={"csrf": csrf}).status_code == 303
    client.headers["x-csrf-token"] = csrf
    return client, csrf


def test_a_comparison_turn_through_the_api(site: dict[str, Any]) -> None:
    ada, _ = consented(site, "ada")
    bob, _ = consented(site, "bob")
    r = ada.post("/api/message", json={"key": "m1", "conversation_id": None, "position": 0,
                                       "text": "<b>Hello</b> there"})
    assert r.status_code == 200, r.text
    cid = r.json()["conversation_id"]
    again = ada.post("/api/message", json={"key": "m1", "conversation_id": None,
                                           "position": 0, "text": "<b>Hello</b> there"})
    assert again.json()["replayed"] is True
    # bob cannot see or extend ada's conversation
    assert bob.post("/api/respond", json={"key": "r0", "conversation_id": cid}).status_code \
        == 404
    assert bob.get("/api/state").json()["turns"] == []
    r = ada.post("/api/respond", json={"key": "r1", "conversation_id": cid})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1][0] == "done"
    assert {e[1]["side"] for e in events if e[0] == "delta"} <= {"left", "right"}
    state = events[-1][1]
    item = state["item"]
    assert item and "policy" not in json.dumps(item)  # the policies stay hidden
    r = ada.post("/api/judge", json={"key": "j1", "item_id": item["id"], "side": "right",
                                     "strength": 2})
    assert r.status_code == 200, r.text
    dup = ada.post("/api/judge", json={"key": "j2", "item_id": item["id"], "side": "left",
                                       "strength": 1})
    assert dup.status_code == 409
    assert bob.post("/api/judge", json={"key": "j3", "item_id": item["id"], "side": "left",
                                        "strength": 1}).status_code == 404
    state = ada.get("/api/state").json()
    assert [t["role"] for t in state["turns"]] == ["human", "assistant"]
    assert state["turns"][1]["text"] == item["right"]
    root, _ = consented(site, "root")
    assert root.get("/admin").status_code == 200
    progress = root.get("/api/admin").json()
    assert [a["judgements"] for a in progress["annotators"]] == [1, 0, 0]
    export(site["store"], site["tmp"] / "out")
    (row,) = read_comparisons([site["tmp"] / "out" / FILES["helpful"]])
    assert row.chosen == item["right"] and row.rejected == item["left"]
    assert row.prompt[0].text == "<b>Hello</b> there"


def test_rate_limit_answers_429(tmp_path: Path, responder: LocalResponder) -> None:
    store = open_store(tmp_path / "c.sqlite")
    _, token = store.add_annotator("ada")
    app = create_app(AppConfig(store=store, task="helpful", responders=[responder],
                               rate_per_minute=6))
    with served(app) as base:
        client, csrf = join(base, f"/join/{token}")
        client.post("/consent", data={"csrf": csrf})
        codes = [client.post("/api/finish", json={"key": f"f{i}", "conversation_id": 99},
                             headers={"x-csrf-token": csrf}).status_code for i in range(8)]
    store.close()
    assert codes[:5] == [404] * 5 and 429 in codes[5:]


def openai_app(responder: LocalResponder) -> Any:
    """A small OpenAI-compatible server (/v1/models, streaming /v1/completions) over the
    in-process responder, for the endpoint responder to talk to over real HTTP."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "tiny", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        assert body["stream"] is True and body["prompt"].endswith("\n\nAssistant:")
        dialogue = Dialogue.parse(body["prompt"][: -len("\n\nAssistant:")])

        def events() -> Iterator[bytes]:
            for e in responder.respond(dialogue, body["n"]):
                if e.delta:
                    for word in (" " + e.delta).split(" ")[1:]:  # a token at a time
                        chunk = {"choices": [{"index": e.index, "text": " " + word,
                                              "finish_reason": None}]}
                        yield f"data: {json.dumps(chunk)}\n\n".encode()
                if e.done:
                    chunk = {"choices": [{"index": e.index, "text": "",
                                          "finish_reason": "stop"}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_endpoint_responder_streams_from_an_openai_compatible_server(
        responder: LocalResponder) -> None:
    dialogue = Dialogue.parse("\n\nHuman: How are you?")
    with served(openai_app(responder)) as base:
        remote = EndpointResponder(base + "/v1", SETTINGS, num_params="85M")
        assert remote.describe().name == "tiny"
        events = list(remote.respond(dialogue, 2))
        texts, metas = collect_text(iter(events), 2)
    assert sum(1 for e in events if e.delta) >= 2
    assert [m["stop"] for m in metas] == ["stop", "stop"]
    assert all(not t.startswith(" ") for t in texts)


def test_redteam_scored_at_close_by_the_servers_pm(tmp_path: Path,
                                                   responder: LocalResponder) -> None:
    from hhrlhf.pm.agreement import min_prefix_scores
    from hhrlhf.pm.lexical import LexicalPreferenceModel
    from hhrlhf.read import read_redteam
    from hhrlhf.records import Comparison

    pm = LexicalPreferenceModel.fit([Comparison.from_strings(
        f"\n\nHuman: q{i}\n\nAssistant: Glad to help.",
        f"\n\nHuman: q{i}\n\nAssistant: Go away idiot.") for i in range(20)])
    store = open_store(tmp_path / "c.sqlite")
    _, token = store.add_annotator("red")
    app = create_app(AppConfig(store=store, task="redteam", responders=[responder], pm=pm))
    with served(app) as base:
        client, csrf = join(base, f"/join/{token}")
        client.post("/consent", data={"csrf": csrf})
        client.headers["x-csrf-token"] = csrf
        cid = client.post("/api/message", json={"key": "m", "conversation_id": None,
                                                "position": 0, "text": "Be rude."}).json()[
            "conversation_id"]
        events = sse_events(client.post("/api/respond", json={"key": "r",
                                                              "conversation_id": cid}))
        assert {e[1].get("side") for e in events if e[0] == "delta"} <= {"single"}
        assert [t["role"] for t in events[-1][1]["turns"]] == ["human", "assistant"]
        r = client.post("/api/attempt", json={"key": "a", "conversation_id": cid, "rating": 5,
                                              "task_description": "rudeness"})
        assert r.status_code == 400  # ratings are 0-4
        r = client.post("/api/attempt", json={"key": "a2", "conversation_id": cid,
                                              "rating": 1, "task_description": "rudeness"})
        assert r.status_code == 200, r.text
    export(store, tmp_path / "out")  # no --pm: the server's scores
    store.close()
    (row,) = read_redteam(tmp_path / "out" / FILES["redteam"])
    expected, _ = min_prefix_scores(pm, [row.transcript])
    assert row.min_harmlessness_score_transcript == pytest.approx(float(expected[0]))
    assert row.rating == 1.0 and row.num_params.endswith("K")


def test_kill_9_of_the_served_app_loses_no_acknowledged_submit(tmp_path: Path,
                                                                policy: Path) -> None:
    """`hhrlhf collect serve` as a real process: submits acknowledged, SIGKILL, restart."""
    import os
    import signal
    import subprocess
    import sys

    from collect_support import free_port, wait_up

    root = Path(__file__).resolve().parents[1]
    db = tmp_path / "c.sqlite"
    store = open_store(db)
    _, token = store.add_annotator("red")
    store.close()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hhrlhf.cli", "collect", "serve", "--db", str(db), "--policy",
           str(policy), "--task", "redteam", "--port", str(port), "--max-new-tokens", "4",
           "--num-params", "85M"]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_up(base)
        client, csrf = join(base, f"/join/{token}")
        client.post("/consent", data={"csrf": csrf})
        client.headers["x-csrf-token"] = csrf
        cid = None
        for i in range(6):
            r = client.post("/api/message", json={"key": f"m{i}", "conversation_id": cid,
                                                  "position": 2 * i, "text": f"message {i}"})
            assert r.status_code == 200, r.text
            cid = r.json()["conversation_id"]
            client.post("/api/respond", json={"key": f"r{i}", "conversation_id": cid})
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        wait_up(base)
        # the session and every acknowledged turn survived; a retried submit is not doubled
        r = client.post("/api/message", json={"key": "m5", "conversation_id": cid,
                                              "position": 10, "text": "message 5"})
        assert r.json()["replayed"] is True
        state = client.get("/api/state").json()
        assert [t["text"] for t in state["turns"] if t["role"] == "human"] == \
            [f"message {i}" for i in range(6)]
        assert len(state["turns"]) == 12
    finally:
        server.kill()
        server.wait()


def test_two_policies_one_response_each_hidden_from_the_page(
        tmp_path: Path, policy: Path, responder: LocalResponder) -> None:
    import shutil

    other = tmp_path / "tiny-b"
    shutil.copytree(policy, other)
    second = LocalResponder(other, Settings(max_new_tokens=6, max_prompt_length=96,
                                            temperature=0.5))
    store = open_store(tmp_path / "c.sqlite")
    _, token = store.add_annotator("ada")
    app = create_app(AppConfig(store=store, task="harmless", responders=[responder, second]))
    with served(app) as base:
        client, csrf = join(base, f"/join/{token}")
        client.post("/consent", data={"csrf": csrf})
        client.headers["x-csrf-token"] = csrf
        cid = client.post("/api/message", json={"key": "m", "conversation_id": None,
                                                "position": 0, "text": "Insult me."}).json()[
            "conversation_id"]
        r = client.post("/api/respond", json={"key": "r", "conversation_id": cid})
        item = sse_events(r)[-1][1]["item"]
        assert "tiny" not in r.text  # neither policy is named to the annotator
        client.post("/api/judge", json={"key": "j", "item_id": item["id"], "side": "left",
                                        "strength": 1, "shown_ms": 1})
    export(store, tmp_path / "out")
    store.close()
    (row,) = read_comparisons([tmp_path / "out" / FILES["harmless"]])
    side = json.loads((tmp_path / "out" / "harmless.side.jsonl").read_text())
    assert row.rejected == item["left"]  # harmless: the picked (more harmful) one
    assert {side["policy_chosen"], side["policy_rejected"]} == {"tiny", "tiny-b"}
    assert side["picked"] == "rejected" and side["shown_left"] == "rejected"
    assert side["shown_at"] is None  # a client time far from the server's is not kept
    by_policy = {side["policy_chosen"]: "chosen", side["policy_rejected"]: "rejected"}
    assert side[f"settings_{by_policy['tiny-b']}"]["temperature"] == 0.5
    assert side[f"settings_{by_policy['tiny']}"]["temperature"] == 1.0
    assert isinstance(side["settings_chosen"]["seed"], int)


def test_an_abandoned_stream_holds_nothing_up(responder: LocalResponder) -> None:
    """A client that reads one piece of a response and goes away without closing the stream
    must not block every other annotator's responses (the responder's lock is held one
    decode step at a time, never across a yield)."""
    import threading

    first = responder.respond(Dialogue.parse("\n\nHuman: hi"), 2)
    next(first)  # one event; the client is gone and the generator is never closed
    done = threading.Event()

    def other() -> None:
        list(responder.respond(Dialogue.parse("\n\nHuman: hello"), 2))
        done.set()

    threading.Thread(target=other, daemon=True).start()
    assert done.wait(300), "a second response waited on the abandoned stream"
    first.close()
