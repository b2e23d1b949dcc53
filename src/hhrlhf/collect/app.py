"""The `hhrlhf collect` web app: FastAPI, Jinja (autoescaped) pages and small vanilla JS.

Access: an invite link (``/join/<token>``) shows a sign-in page; its button POSTs back with a
token tied to a pre-session cookie (no login CSRF: another site cannot sign a visitor in as
someone else), and that opens a session (an HttpOnly cookie). Every page and API call needs a
session, looked up on every call (a revoked annotator's calls get 401 at once), except
``/healthz``, the sign-in page and the static files, which tell nothing.
Every write needs the session's CSRF token (header ``X-CSRF-Token``; a form field for the one
plain form) and an idempotency key (``key``); writes are rate-limited per annotator. The
content security policy allows no inline script or style; texts are put in pages escaped (Jinja)
or as ``textContent`` (JS). An annotator sees only their own work; the one exception is by
design: an *overlap* item, another annotator's context and two responses (never their pick or
name), for the agreement on the admin page.
"""

from __future__ import annotations

import hmac
import json
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

from hhrlhf.collect import work
from hhrlhf.collect.responder import Event, Responder
from hhrlhf.collect.store import (
    MAX_TAGS,
    SESSION_SECONDS,
    STRENGTHS,
    Annotator,
    Conflict,
    Store,
)
from hhrlhf.errors import HHRLHFError
from hhrlhf.explorer.app import ResponseHeaders, security_headers
from hhrlhf.records import ASSISTANT, Dialogue, Turn

HERE = Path(__file__).parent
EXPLORER_STATIC = HERE.parent / "explorer" / "static"
SESSION_COOKIE = "hhrlhf_collect"
JOIN_COOKIE = "hhrlhf_collect_join"  # the pre-session of the sign-in page
CSRF_HEADER = "x-csrf-token"
MAX_BODY_BYTES = 256 * 1024  # a message is at most 20,000 characters
# Suggested review tags (reviewers may type their own): themes of the published tags.
SUGGESTED_TAGS = ("violence", "crime", "hate speech", "sexual content", "self-harm",
                  "privacy", "misinformation", "harmful advice", "profanity", "evasive",
                  "not harmful")
TASK_TITLES = {"helpful": "Helpfulness comparisons", "harmless": "Harmlessness comparisons",
               "redteam": "Red teaming", "review": "Reviewing red-team attempts"}


@dataclass
class AppConfig:
    store: Store
    task: str  # helpful, harmless, redteam, review
    responders: list[Responder] = field(default_factory=list)
    pm: Any = None  # scores red-team attempts when they are closed
    overlap: float = 0.1
    rate_per_minute: int = 120


class RateLimiter:
    """A token bucket per annotator: ``per_minute`` writes a minute, bursts of a quarter."""

    def __init__(self, per_minute: int):
        self.rate = per_minute / 60.0
        self.burst = max(5.0, per_minute / 4)
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, who: int) -> float:
        """0 when allowed (a token taken), else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[who] = (tokens - 1, now)
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1 - tokens) / self.rate


class Denied(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def server_timing(arrived: float) -> list[tuple[bytes, bytes]]:
    """``Server-Timing: app;dur=<ms>``: from the request's arrival in the app to its answer's
    start (the body read, the wait for a thread, the checks, the durable write), for load
    tests."""
    ms = (time.perf_counter() - arrived) * 1000
    return [(b"server-timing", f"app;dur={ms:.2f}".encode())]


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def create_app(config: AppConfig) -> FastAPI:
    store, task = config.store, config.task
    if task not in TASK_TITLES:
        raise HHRLHFError(f"unknown task {task!r}; known: {', '.join(TASK_TITLES)}")
    if task != "review" and not config.responders:
        raise HHRLHFError("a task other than review needs a policy")
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = lambda t: "" if t is None else time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime(t))
    templates = Jinja2Templates(env=env)
    limiter = RateLimiter(config.rate_per_minute)
    join_secret = secrets.token_bytes(32)  # signs the sign-in form's token (this process)
    # Writes get worker threads of their own: the shared pool's threads can all be taken by
    # response streams waiting for the model, and a submit must not wait behind them.
    write_threads = anyio.CapacityLimiter(16)
    app = FastAPI(title="hhrlhf collect", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.config = config
    app.add_middleware(ResponseHeaders, headers=security_headers)
    app.add_middleware(ResponseHeaders, headers=server_timing)  # the outermost: all the app
    app.mount("/static/explorer", StaticFiles(directory=EXPLORER_STATIC), name="explorer")
    app.mount("/static/collect", StaticFiles(directory=HERE / "static"), name="collect")

    def is_api(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def page(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"task": task,
                                                          "task_title": TASK_TITLES[task],
                                                          **context}, status_code=code)

    def error(request: Request, status: int, message: str,
              headers: dict[str, str] | None = None) -> Response:
        if is_api(request):
            return JSONResponse({"detail": message}, status_code=status, headers=headers)
        return page(request, "error.html", status, status=status, message=message,
                    who=None, csrf="")

    @app.exception_handler(Denied)
    async def on_denied(request: Request, exc: Denied) -> Response:
        headers = None if exc.retry_after is None else {
            "retry-after": str(max(1, round(exc.retry_after)))}
        return error(request, exc.status, exc.message, headers)

    @app.exception_handler(Conflict)
    async def on_conflict(request: Request, exc: Conflict) -> Response:
        return error(request, exc.status, exc.message)

    @app.exception_handler(HHRLHFError)
    async def on_user_error(request: Request, exc: HHRLHFError) -> Response:
        return error(request, 503, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"nothing at {request.url.path}"
        return error(request, exc.status_code, message)

    # -- who is asking ------------------------------------------------------------------
    def session(request: Request) -> tuple[Annotator, str]:
        token = request.cookies.get(SESSION_COOKIE)
        found = store.session(token) if token else None
        if found is None:
            raise Denied(401, "not signed in: open your invite link")
        return found

    def consented(request: Request) -> tuple[Annotator, str]:
        who, csrf = session(request)
        if not who.consented:
            raise Denied(403, "read and accept the instructions first (/consent)")
        return who, csrf

    def may_work(who: Annotator) -> None:
        if task == "review" and who.role not in ("reviewer", "admin"):
            raise Denied(403, "this server is for reviewers")

    def check_writer(request: Request) -> Annotator:
        """The checks of every write: session, consent, CSRF, rate, role."""
        who, csrf = consented(request)
        sent = request.headers.get(CSRF_HEADER, "")
        if not sent or not hmac.compare_digest(sent, csrf):
            raise Denied(403, "missing or wrong CSRF token (reload the page)")
        wait = limiter.allow(who.id)
        if wait:
            raise Denied(429, "too many requests; slow down", wait)
        may_work(who)
        return who

    async def write_call(request: Request,
                         handler: Callable[[Annotator, dict[str, Any]], Any]) -> Any:
        """Read the JSON body here, then run the checks and ``handler`` in a worker thread:
        database work (a commit waits for its fsync) never blocks the event loop."""
        raw = b""
        async for chunk in request.stream():  # bounded: a session cannot send gigabytes
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise Denied(413, f"the request is larger than {MAX_BODY_BYTES:,} bytes")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None

        def run() -> Any:
            t0 = time.perf_counter()
            who = check_writer(request)
            if not isinstance(body, dict):
                raise Denied(400, "the body is not a JSON object")
            result = handler(who, body)
            if isinstance(result, dict):
                # the server's own time (checks and the durable write), for load tests
                ms = (time.perf_counter() - t0) * 1000
                return JSONResponse(result, headers={"server-timing": f"write;dur={ms:.2f}"})
            return result

        return await anyio.to_thread.run_sync(run, limiter=write_threads)

    def field_int(body: dict[str, Any], name: str, optional: bool = False) -> int | None:
        v = body.get(name)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise Denied(400, f"{name!r} must be a whole number")
        return v

    def field_str(body: dict[str, Any], name: str) -> str:
        v = body.get(name)
        if not isinstance(v, str):
            raise Denied(400, f"{name!r} must be a string")
        return v

    def shown_time(body: dict[str, Any]) -> float | None:
        v = body.get("shown_ms")
        now = time.time()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and \
                now - 86400 < v / 1000 < now + 60:
            return float(v) / 1000
        return None

    # -- pages --------------------------------------------------------------------------
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    def invited(token: str) -> Annotator:
        who = store.annotator_by_token(token) if len(token) < 200 else None
        if who is None:
            raise Denied(401, "this invite link is not valid (ask for a new one)")
        if who.revoked:
            raise Denied(401, "this invite link was revoked (ask for a new one)")
        return who

    async def read_form(request: Request) -> dict[str, str]:
        from urllib.parse import parse_qs

        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > 4096:
                raise Denied(413, "the form is too large")
        form = parse_qs(raw.decode("utf-8", "replace"))
        return {k: v[0] for k, v in form.items() if v}

    def join_csrf(pre_session: str) -> str:
        return hmac.new(join_secret, pre_session.encode(), "sha256").hexdigest()

    @app.get("/join/{token}", response_class=HTMLResponse, include_in_schema=False)
    def join_page(request: Request, token: str) -> Response:
        """The invite link shows a page; only its button (a POST) signs in. A GET that
        signed in would let another site sign a visitor in as someone else (login CSRF)."""
        who = invited(token)
        pre = secrets.token_urlsafe(24)  # the pre-session that the form's token is tied to
        response = page(request, "join.html", who=None, csrf="", invitee=who.name,
                        token=token, join_csrf=join_csrf(pre))
        response.set_cookie(JOIN_COOKIE, pre, httponly=True, samesite="strict",
                            path="/join", max_age=3600)
        return response

    @app.post("/join/{token}", include_in_schema=False)
    async def join(request: Request, token: str) -> Response:
        form = await read_form(request)
        pre, sent = request.cookies.get(JOIN_COOKIE, ""), form.get("csrf", "")
        if request.headers.get("sec-fetch-site") == "cross-site" or not pre or not sent or \
                not hmac.compare_digest(sent, join_csrf(pre)):
            raise Denied(403, "missing or wrong sign-in token (open your invite link again)")
        who = invited(token)
        session_token, _ = store.new_session(who.id)
        response = RedirectResponse("/" if who.consented else "/consent", status_code=303)
        # Lax: a link to the app from a mail or chat (another site) opens it signed in.
        # Writes need the CSRF token anyway.
        response.set_cookie(SESSION_COOKIE, session_token, httponly=True, samesite="lax",
                            path="/", max_age=SESSION_SECONDS)
        response.delete_cookie(JOIN_COOKIE, path="/join")
        return response

    @app.get("/consent", response_class=HTMLResponse, include_in_schema=False)
    def consent_page(request: Request) -> HTMLResponse:
        who, csrf = session(request)
        return page(request, "consent.html", who=who, csrf=csrf)

    @app.post("/consent", include_in_schema=False)
    async def consent_accept(request: Request) -> Response:
        who, csrf = session(request)
        sent = (await read_form(request)).get("csrf", "")
        if not sent or not hmac.compare_digest(sent, csrf):
            raise Denied(403, "missing or wrong CSRF token (reload the page)")
        store.consent(who.id)
        return RedirectResponse("/", status_code=303)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(request: Request) -> Response:
        who, csrf = consented(request)
        if task == "review":
            if who.role == "annotator":
                raise Denied(403, "this server is for reviewers")
            return page(request, "review.html", who=who, csrf=csrf,
                        suggested=SUGGESTED_TAGS, max_tags=MAX_TAGS)
        return page(request, "work.html", who=who, csrf=csrf,
                    strengths=STRENGTHS)

    @app.get("/admin", response_class=HTMLResponse, include_in_schema=False)
    def admin(request: Request) -> HTMLResponse:
        who, csrf = consented(request)
        if who.role != "admin":
            raise Denied(403, "the admin page is for admins")
        with store.transaction() as tx:
            p = work.progress(tx)
        return page(request, "admin.html", who=who, csrf=csrf, p=p, overlap=config.overlap,
                    policies=[r.describe() for r in config.responders])

    # -- API ----------------------------------------------------------------------------
    @app.get("/api/state")
    def api_state(request: Request) -> dict[str, Any]:
        who, _ = consented(request)
        may_work(who)
        if task == "review":
            with store.transaction() as tx:
                return {"task": task, "attempt": work.next_for_review(tx, who)}
        with store.transaction() as tx:
            return {"task": task, **work.page_state(tx, who, task)}

    @app.get("/api/admin")
    def api_admin(request: Request) -> dict[str, Any]:
        who, _ = consented(request)
        if who.role != "admin":
            raise Denied(403, "the admin page is for admins")
        with store.transaction() as tx:
            return work.progress(tx)

    @app.post("/api/message")
    async def api_message(request: Request) -> Any:
        def handle(who: Annotator, body: dict[str, Any]) -> Any:
            if task == "review":
                raise Denied(400, "reviewers do not write messages")
            cid = field_int(body, "conversation_id", optional=True)
            position = field_int(body, "position")
            text = field_str(body, "text")
            assert position is not None
            return store.write(who.id, field_str(body, "key"), lambda tx: work.add_message(
                tx, who, task, cid, position, text))

        return await write_call(request, handle)

    @app.post("/api/respond")
    async def api_respond(request: Request) -> Any:
        """The response(s) to the last message, streamed as server-sent events: ``delta``
        events ({side, text}: side is left/right, or single in red teaming), then ``done``
        with the page state (or ``error``)."""
        def handle(who: Annotator, body: dict[str, Any]) -> Any:
            if task == "review":
                raise Denied(400, "nothing to generate when reviewing")
            cid = field_int(body, "conversation_id")
            assert cid is not None
            with store.transaction() as tx:
                pending = work.pending_response(tx, who, cid)
            return StreamingResponse(generate(who, pending), media_type="text/event-stream",
                                     headers={"cache-control": "no-store"})

        return await write_call(request, handle)

    def state_of(who: Annotator) -> dict[str, Any]:
        with store.transaction() as tx:
            return {"task": task, **work.page_state(tx, who, task)}

    async def in_thread(fn: Callable[[], Any]) -> Any:
        """Database work of a stream: in a write thread, never on the event loop."""
        return await anyio.to_thread.run_sync(fn, limiter=write_threads)

    async def generate(who: Annotator, pending: work.Pending | None) -> AsyncIterator[bytes]:
        """The stream: the responses are read from the decode server asynchronously (no
        thread is held while the model writes); the stores are done in a write thread."""
        if pending is None:  # generated already (another tab, a retry): the page reloads
            yield _sse("done", await in_thread(lambda: state_of(who)))
            return
        try:
            if task == "redteam":
                async for chunk in generate_single(who, pending):
                    yield chunk
            else:
                async for chunk in generate_pair(who, pending):
                    yield chunk
        except HHRLHFError as e:
            yield _sse("error", {"detail": str(e)})

    async def generate_single(who: Annotator, pending: work.Pending) -> AsyncIterator[bytes]:
        responder = config.responders[0]
        text = ""
        meta: dict[str, Any] = {}
        async for e in responder.respond(pending.dialogue, 1):
            text += e.delta
            if e.delta:
                yield _sse("delta", {"side": "single", "text": e.delta})
            if e.done:
                meta = e.meta
        info = responder.describe()

        def save() -> dict[str, Any]:
            with store.transaction(write=True) as tx:
                work.add_response_turn(tx, pending, text, info.name, {**info.settings, **meta})
            return state_of(who)

        yield _sse("done", await in_thread(save))

    async def generate_pair(who: Annotator, pending: work.Pending) -> AsyncIterator[bytes]:
        left = random.SystemRandom().choice("ab")
        side_of = {"a": "left" if left == "a" else "right",
                   "b": "right" if left == "a" else "left"}
        texts = {"a": "", "b": ""}
        metas: dict[str, dict[str, Any]] = {"a": {}, "b": {}}

        async def stream(events: AsyncIterator[Event],
                         label: dict[int, str]) -> AsyncIterator[bytes]:
            async for e in events:
                which = label[e.index]
                texts[which] += e.delta
                if e.delta:
                    yield _sse("delta", {"side": side_of[which], "text": e.delta})
                if e.done:
                    metas[which] = e.meta

        first = config.responders[0]
        if len(config.responders) > 1:
            second = config.responders[1]
            async for chunk in stream(first.respond(pending.dialogue, 1), {0: "a"}):
                yield chunk
            async for chunk in stream(second.respond(pending.dialogue, 1), {0: "b"}):
                yield chunk
        else:
            second = first
            async for chunk in stream(first.respond(pending.dialogue, 2), {0: "a", 1: "b"}):
                yield chunk
        info_a, info_b = first.describe(), second.describe()
        settings = {"a": {**info_a.settings, **metas["a"]}, "b": {**info_b.settings, **metas["b"]}}

        def save() -> dict[str, Any]:
            with store.transaction(write=True) as tx:
                work.add_item(tx, pending, (texts["a"], texts["b"]), (info_a.name, info_b.name),
                              settings, config.overlap, left)
            return state_of(who)

        yield _sse("done", await in_thread(save))

    @app.post("/api/judge")
    async def api_judge(request: Request) -> Any:
        def handle(who: Annotator, body: dict[str, Any]) -> Any:
            if task not in ("helpful", "harmless"):
                raise Denied(400, "this server does not run a comparison task")
            item = field_int(body, "item_id")
            side = field_str(body, "side")
            strength = field_int(body, "strength", optional=True) or 0
            shown = shown_time(body)
            assert item is not None
            return store.write(who.id, field_str(body, "key"), lambda tx: work.judge(
                tx, who, task, item, side, strength, shown))

        return await write_call(request, handle)

    @app.post("/api/finish")
    async def api_finish(request: Request) -> Any:
        def handle(who: Annotator, body: dict[str, Any]) -> Any:
            if task not in ("helpful", "harmless"):
                raise Denied(400, "a red-team attempt ends with its rating (/api/attempt)")
            cid = field_int(body, "conversation_id")
            assert cid is not None
            return store.write(who.id, field_str(body, "key"), lambda tx: work.finish(
                tx, who, task, cid))

        return await write_call(request, handle)

    @app.post("/api/attempt")
    async def api_attempt(request: Request) -> Any:
        def handle(who: Annotator, body: dict[str, Any]) -> Any:
            if task != "redteam":
                raise Denied(400, "this server does not run red teaming")
            cid = field_int(body, "conversation_id")
            rating = field_int(body, "rating")
            description = field_str(body, "task_description")
            key = field_str(body, "key")
            assert cid is not None and rating is not None
            info = config.responders[0].describe()
            scores = score_attempt(who, cid, description) if config.pm is not None else None
            return store.write(who.id, key, lambda tx: work.close_attempt(
                tx, who, cid, rating, description, info.name, info.num_params or "0K",
                info.model_type, scores))

        return await write_call(request, handle)

    def score_attempt(who: Annotator, cid: int, description: str) -> tuple[float, float] | None:
        from hhrlhf.pm.agreement import min_prefix_scores

        with store.transaction() as tx:
            turns = work.conversation_turns(tx, cid) if tx.one(
                "SELECT 1 FROM conversations WHERE id = ? AND annotator_id = ?",
                (cid, who.id)) else []
        if not any(t.role == ASSISTANT for t in turns):
            return None  # the write refuses it with the reason
        transcript, _ = min_prefix_scores(config.pm, [Dialogue(tuple(turns))])
        described = config.pm.score([Dialogue((Turn(ASSISTANT, description.strip()),))])
        return float(transcript[0]), float(described[0])

    @app.post("/api/review")
    async def api_review(request: Request) -> Any:
        def handle(who: Annotator, body: dict[str, Any]) -> Any:
            if task != "review":
                raise Denied(400, "this server does not run reviews")
            attempt = field_int(body, "attempt_id")
            tags = body.get("tags")
            if not isinstance(tags, list):
                raise Denied(400, "'tags' must be a list of strings")
            assert attempt is not None
            return store.write(who.id, field_str(body, "key"), lambda tx: work.review(
                tx, who, attempt, tags))

        return await write_call(request, handle)

    return app

