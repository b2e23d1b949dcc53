"""Helpers for the `hhrlhf collect` tests: work done straight through the store (the same
transactions the web app runs), and a real server on 127.0.0.1."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from web_support import served_app, wait_until_up

from hhrlhf.collect import work
from hhrlhf.collect.store import Annotator, Store

_keys = itertools.count()


def key() -> str:
    return f"k{next(_keys)}-{time.monotonic_ns()}"


def annotator(store: Store, name: str, role: str = "annotator") -> Annotator:
    aid, token = store.add_annotator(name, role)
    who = store.annotator_by_token(token)
    assert who is not None and who.id == aid
    store.consent(aid)
    return who


def converse(store: Store, who: Annotator, task: str, messages: list[str],
             picks: list[str] | None = None, overlap: float = 0.0) -> int:
    """A conversation of ``task`` through the store: each message, two fixed responses, the
    pick ('left'/'right', default left) at strength 2. Returns the conversation id."""
    cid: int | None = None
    for turn, text in enumerate(messages):
        answer = store.write(who.id, key(), lambda tx, c=cid, t=turn, m=text: work.add_message(
            tx, who, task, c, 2 * t, m))
        cid = int(answer["conversation_id"])
        with store.transaction(write=True) as tx:
            pending = work.pending_response(tx, who, cid)
            assert pending is not None
            item = work.add_item(tx, pending, (f"Answer A{turn} to {text}",
                                               f"Answer B{turn} to {text}"),
                                 ("pol-a", "pol-b"), {"a": {"seed": turn}, "b": {"seed": -turn}},
                                 overlap)
        side = (picks or [])[turn] if picks and turn < len(picks) else "left"
        store.write(who.id, key(), lambda tx, i=item, s=side: work.judge(
            tx, who, task, i, s, 2, time.time()))
    assert cid is not None
    store.write(who.id, key(), lambda tx: work.finish(tx, who, task, cid))
    return cid


def red_team(store: Store, who: Annotator, messages: list[str], rating: int,
             description: str, scores: tuple[float, float] | None = (0.5, -0.25)) -> int:
    cid: int | None = None
    for turn, text in enumerate(messages):
        answer = store.write(who.id, key(), lambda tx, c=cid, t=turn, m=text: work.add_message(
            tx, who, "redteam", c, 2 * t, m))
        cid = int(answer["conversation_id"])
        with store.transaction(write=True) as tx:
            pending = work.pending_response(tx, who, cid)
            assert pending is not None
            work.add_response_turn(tx, pending, f"Reply {turn}", "pol-a", {"seed": turn})
    assert cid is not None
    answer = store.write(who.id, key(), lambda tx: work.close_attempt(
        tx, who, cid, rating, description, "pol-a", "85M", "plain lm", scores))
    return int(answer["attempt_id"])


@contextmanager
def served(app: Any) -> Iterator[str]:
    """The collect app on 127.0.0.1 (a free port, uvicorn in a thread); yields its base URL."""
    with served_app(app, "/healthz") as base:
        yield base


def wait_up(base: str, timeout: float = 120.0) -> None:
    """Until the collect server at ``base`` answers."""
    wait_until_up(base + "/healthz", timeout)


def join(base: str, link: str) -> tuple[httpx.Client, str]:
    """A client signed in through an invite link, as a script does it: GET the link (the
    sign-in page, its form token and the pre-session cookie), POST the form; then its CSRF
    token (from the next page's ``<meta name="csrf">``)."""
    token = link.rsplit("/join/", 1)[1]
    client = httpx.Client(base_url=base, timeout=60)
    form = client.get(f"/join/{token}")
    assert form.status_code == 200, form.text
    sign_in = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert sign_in, form.text
    r = client.post(f"/join/{token}", data={"csrf": sign_in.group(1)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get("/consent")
    csrf = re.search(r'name="csrf" content="([^"]+)"', page.text)
    assert csrf, page.text
    return client, csrf.group(1)


def judged_turn(client: httpx.Client, conversation_id: int | None, position: int, text: str,
                side: str = "left") -> tuple[int, dict[str, Any]]:
    """One comparison turn through the HTTP API (a consented client with its CSRF header):
    the message, the two responses (server-sent events), the pick at strength 2.
    Returns (conversation id, the judged item: its left and right texts)."""
    import json

    r = client.post("/api/message", json={"key": key(), "conversation_id": conversation_id,
                                          "position": position, "text": text})
    assert r.status_code == 200, r.text
    cid = int(r.json()["conversation_id"])
    r = client.post("/api/respond", json={"key": key(), "conversation_id": cid})
    assert r.status_code == 200, r.text
    done = [chunk for chunk in r.text.split("\n\n") if chunk.startswith("event: done")]
    assert done, r.text
    state = json.loads(done[-1].split("data: ", 1)[1])
    item = state["item"]
    r = client.post("/api/judge", json={"key": key(), "item_id": item["id"], "side": side,
                                        "strength": 2})
    assert r.status_code == 200, r.text
    return cid, item


@contextmanager
def decoding(policy: Any, settings: Any) -> Iterator[Any]:
    """The embedded default's responder for a policy folder: its decode process (`hhrlhf
    policy serve`, a child on loopback) started, and ended after."""
    from hhrlhf.collect.responder import make_responder

    responder = make_responder(str(policy), settings)
    try:
        yield responder
    finally:
        responder.close()
