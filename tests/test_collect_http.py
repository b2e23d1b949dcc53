"""`hhrlhf collect serve` over HTTP: a real server on 127.0.0.1 with a tiny policy built here,
decoded in its own process (`hhrlhf policy serve`, started for it), real SQLite. Every
endpoint refuses a missing or bad session and a missing CSRF token; sign-in only by the
invite page's POST; revocation; a whole comparison turn through the API; the rate limit; the
responses streamed token by token from the decode process."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from collect_support import decoding, join, served
from policy_support import build_tiny, first_rows, one_thread  # noqa: F401

from hhrlhf.collect.app import AppConfig, create_app
from hhrlhf.collect.export import FILES, export
from hhrlhf.collect.responder import (
    DecodeProcess,
    EndpointResponder,
    Settings,
    collect_text,
    make_responder,
)
from hhrlhf.collect.store import open_store
from hhrlhf.errors import HHRLHFError
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
def responder(policy: Path) -> Iterator[EndpointResponder]:
    with decoding(policy, SETTINGS) as r:
        yield r


@pytest.fixture
def site(tmp_path: Path, responder: EndpointResponder) -> Iterator[dict[str, Any]]:
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


def test_sign_in_only_by_the_invite_pages_post(site: dict[str, Any]) -> None:
    """No login CSRF: the invite link's GET signs nobody in; the POST needs the form's token,
    which is tied to the pre-session cookie of the browser that loaded the page."""
    base, link = site["base"], site["links"]["ada"]

    def form(client: httpx.Client) -> str:
        r = client.get(link)
        assert r.status_code == 200 and "Sign in as ada" in r.text
        m = re.search(r'name="csrf" value="([^"]+)"', r.text)
        assert m
        return m.group(1)

    victim, attacker = httpx.Client(base_url=base), httpx.Client(base_url=base)
    theirs = form(attacker)  # the attacker's own page and token, for their own invite
    mine = form(victim)
    assert "hhrlhf_collect" not in victim.cookies  # the GET opened no session
    assert victim.get("/api/state").status_code == 401
    assert httpx.post(base + link, data={"csrf": theirs}).status_code == 403  # no cookie
    assert victim.post(link, data={"csrf": theirs}).status_code == 403  # not its cookie's
    assert victim.post(link, data={}).status_code == 403
    assert victim.post(link, data={"csrf": mine},
                       headers={"sec-fetch-site": "cross-site"}).status_code == 403
    assert victim.get("/api/state").status_code == 401
    r = victim.post(link, data={"csrf": mine})
    assert r.status_code == 303 and r.headers["location"] == "/consent"
    assert victim.get("/consent").status_code == 200
    assert victim.post(link, data={"csrf": mine}).status_code == 403  # the token is used up
    assert victim.post("/join/nope", data={"csrf": form(victim)}).status_code == 401


def test_revoke_ends_sessions_at_once_and_the_link_stops_working(
        site: dict[str, Any], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from policy_support import run_cli

    db = str(site["tmp"] / "c.sqlite")
    ada, _ = consented(site, "ada")
    ada_phone, _ = consented(site, "ada")  # a second session of the same person
    bob, _ = consented(site, "bob")
    admin, _ = consented(site, "root")
    aid = site["store"].annotators()[0]["id"]
    assert ada.get("/api/state").status_code == 200
    code, out, _ = run_cli(["collect", "revoke", "--db", db, str(aid)], capsys, monkeypatch)
    assert code == 0 and "revoked annotator 1 (ada): 2 sessions ended" in out
    for client in (ada, ada_phone):  # at once: the very next call of each session
        for path in READS:
            assert client.get(path).status_code == 401, path
        for path in WRITES:
            assert client.post(path, json={"key": "after"}).status_code == 401, path
    r = httpx.get(site["base"] + site["links"]["ada"])
    assert r.status_code == 401 and "revoked" in r.text
    assert bob.get("/api/state").status_code == 200  # others go on
    page = admin.get("/admin").text
    assert re.search(r"<td>ada</td>.*?revoked \d{4}-", page, re.DOTALL)
    assert admin.get("/api/admin").json()["annotators"][0]["revoked"] > 0
    # by the invite link too; again: nothing more to end; unknown: one line
    code, out, _ = run_cli(["collect", "revoke", "--db", db,
                            "http://x" + site["links"]["bob"]], capsys, monkeypatch)
    assert code == 0 and "bob" in out and bob.get("/api/state").status_code == 401
    code, out, _ = run_cli(["collect", "revoke", "--db", db, str(aid)], capsys, monkeypatch)
    assert code == 0 and "0 sessions ended" in out
    code, _, err = run_cli(["collect", "revoke", "--db", db, "999"], capsys, monkeypatch)
    assert code != 0 and err.count("\n") == 1 and "no annotator" in err


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
    # streamed as the decode process produces the tokens: several pieces, not one a side
    assert sum(1 for e in events if e[0] == "delta") > 2
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


def test_rate_limit_answers_429(tmp_path: Path, responder: EndpointResponder) -> None:
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


def test_responses_stream_token_by_token_from_the_decode_process(
        responder: EndpointResponder, policy: Path) -> None:
    """The embedded default decodes in a child process (`hhrlhf policy serve` on loopback,
    with a random API key): its tokens come as they are produced, several pieces a
    response; without the key it answers nobody; a bad folder is a one-line error."""
    import asyncio

    dialogue = Dialogue.parse("\n\nHuman: How are you?")
    owner = responder.owner
    assert isinstance(owner, DecodeProcess) and owner.child.alive()
    assert owner.url.startswith("http://127.0.0.1:")

    async def pieces() -> list[Any]:
        return [e async for e in responder.respond(dialogue, 2)]

    events = asyncio.run(pieces())
    texts, metas = asyncio.run(collect_text(responder.respond(dialogue, 2), 2))
    assert sum(1 for e in events if e.delta) > 2  # streamed, not one piece a response
    assert [m["stop"] for m in metas] == ["stop", "stop"] or all(m["stop"] for m in metas)
    assert all(isinstance(m["seed"], int) for m in metas)
    assert all(not t.startswith(" ") for t in texts)
    assert responder.describe().name == "tiny"
    assert responder.describe().num_params.endswith("K")  # counted by the decode process
    assert httpx.get(owner.url + "/v1/models").status_code == 401  # the key is needed
    bad = policy.parent / "not-a-policy"
    bad.mkdir(exist_ok=True)
    with pytest.raises(HHRLHFError, match="decode process .* did not start: .*config.json"):
        make_responder(str(bad), SETTINGS)


def test_redteam_scored_at_close_by_the_servers_pm(tmp_path: Path,
                                                   responder: EndpointResponder) -> None:
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
    import time

    from collect_support import wait_up
    from web_support import free_port

    def children(pid: int) -> list[int]:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]

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
        decoders = children(server.pid)
        assert len(decoders) == 1  # the decode process of --policy FOLDER
        os.kill(server.pid, signal.SIGKILL)
        server.wait()
        for _ in range(600):  # it dies with the server, even killed with SIGKILL
            if not Path(f"/proc/{decoders[0]}").exists():
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{decoders[0]}").exists(), "a decode process outlived its server"
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
        tmp_path: Path, policy: Path, responder: EndpointResponder) -> None:
    import shutil

    other = tmp_path / "tiny-b"
    shutil.copytree(policy, other)
    second_settings = Settings(max_new_tokens=6, max_prompt_length=96, temperature=0.5)
    store = open_store(tmp_path / "c.sqlite")
    _, token = store.add_annotator("ada")
    with decoding(other, second_settings) as second, served(create_app(AppConfig(
            store=store, task="harmless", responders=[responder, second]))) as base:
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


def test_an_abandoned_stream_holds_nothing_up(responder: EndpointResponder) -> None:
    """A client that reads one piece of a response and stops reading, without closing the
    stream, must not block every other annotator's responses."""
    import asyncio

    async def run() -> list[str]:
        first = responder.respond(Dialogue.parse("\n\nHuman: hi"), 2)
        await first.__anext__()  # one event; then nothing is read
        try:
            texts, _ = await asyncio.wait_for(collect_text(responder.respond(
                Dialogue.parse("\n\nHuman: hello"), 2), 2), 300)
        finally:
            await first.aclose()
        return texts

    assert len(asyncio.run(run())) == 2
