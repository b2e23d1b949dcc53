"""The explorer web app: HTML pages (Jinja2, autoescaped) and the JSON API they use.

Pages: ``/`` overview, ``/search`` (vanilla JS calling ``/api/search``), ``/pair/<file>/<row>``,
``/redteam/<file>/<row>``, ``/api`` and ``/docs`` (the API described from its OpenAPI schema,
with a plain form to try each endpoint: it works offline, unlike a CDN-hosted Swagger UI). A content
warning stands before any page that shows dialogue text, until accepted for the browser
session (a session cookie). The database is opened read-only.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup, escape
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hhrlhf.errors import HHRLHFError
from hhrlhf.explorer.index import default_db_path
from hhrlhf.explorer.query import MAX_QUERY_CHARS, SORTS, ExplorerDB, QueryError, SearchParams
from hhrlhf.explorer.schema import (
    ErrorOut,
    FacetsOut,
    OverviewOut,
    PairOut,
    RedTeamOut,
    SearchOut,
)

HERE = Path(__file__).parent
WARNING_COOKIE = "hhrlhf_content_warning"
MAX_PAGE = 100_000
# No inline script or style anywhere: even a text that escaped escaping could not run.
SECURITY_HEADERS = [
    (b"content-security-policy", (
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]

API_DESCRIPTION = f"""
Browse and search Anthropic's HH-RLHF preference pairs and red-team attempts, as indexed by
`hhrlhf index` (SQLite FTS5). Every endpoint is read-only and answers JSON.

**Query language** (`q`): words and `"quoted phrases"` must all match (porter stemming:
`steal` also finds `stealing`); `OR` between two terms matches either; `-word` excludes.
FTS5 operators (`AND`, `NOT`, `NEAR`, `*`, `^`, parentheses) are refused with a 400 that says
so: put them in double quotes to search for them as text. At most {MAX_QUERY_CHARS} characters.

**Errors** are `{{"detail": "<message>"}}`: 400 for a query or filter value that cannot be
answered (unbalanced quote, unknown subset, empty range, page past the last), 404 for a row
that does not exist, 422 for a parameter of the wrong type or out of bounds.
"""


RowIndex = Annotated[int, PathParam(ge=0, le=10**9, description="0-based row in the file")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "A query or filter that cannot be answered"},
    404: {"model": ErrorOut, "description": "No such row"},
    422: {"model": ErrorOut, "description": "A parameter of the wrong type or out of bounds"},
}


class ResponseHeaders:
    """Plain ASGI middleware (no task per request) that adds ``headers(arrived)`` to every
    HTTP answer as it starts; ``arrived`` is ``time.perf_counter()`` at the request's arrival.
    The explorer and the collect app add their security headers with it, the collect app its
    ``Server-Timing`` too."""

    def __init__(self, app: ASGIApp, headers: Callable[[float], list[tuple[bytes, bytes]]]):
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers(arrived)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def security_headers(arrived: float) -> list[tuple[bytes, bytes]]:
    return SECURITY_HEADERS


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body")]
        parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _safe_next(target: str | None) -> str:
    """A local path to go back to after the warning (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def create_app(db_path: str | Path | None = None) -> FastAPI:
    """The app over the database at ``db_path`` (default: ``<cache>/explorer.sqlite``)."""
    db = ExplorerDB(db_path or default_db_path())
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, d=0: "" if v is None else f"{v:,.{d}f}"
    templates = Jinja2Templates(env=env)

    app = FastAPI(title="hhrlhf explorer", version="1", description=API_DESCRIPTION,
                  docs_url=None, redoc_url=None)
    app.state.db = db
    app.add_middleware(ResponseHeaders, headers=security_headers)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def is_api(request: Request) -> bool:
        return request.url.path.startswith("/api/") or request.url.path == "/openapi.json"

    def page(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=code)

    def error_response(request: Request, status: int, message: str) -> Response:
        if is_api(request):
            return JSONResponse({"detail": message}, status_code=status)
        return page(request, "error.html", status, status=status, message=message)

    @app.exception_handler(QueryError)
    async def on_query_error(request: Request, exc: QueryError) -> Response:
        return error_response(request, exc.status, exc.message)

    @app.exception_handler(HHRLHFError)
    async def on_user_error(request: Request, exc: HHRLHFError) -> Response:
        return error_response(request, 503, str(exc))

    @app.exception_handler(sqlite3.DatabaseError)
    async def on_damaged_database(request: Request, exc: sqlite3.DatabaseError) -> Response:
        # A damaged file (a bad disk, a copy cut short): say so and how to mend it, not a 500.
        return error_response(request, 503, f"{db.path}: the explorer database cannot be read "
                              f"({exc}); build it again with `hhrlhf index --rebuild`")

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = jsonable_encoder(exc.errors())
        message = _validation_message(errors)
        if is_api(request):
            return JSONResponse({"detail": message, "errors": errors}, status_code=422)
        return page(request, "error.html", 422, status=422, message=message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"nothing at {request.url.path}"
        return error_response(request, exc.status_code, message)

    def warned(request: Request) -> bool:
        return request.cookies.get(WARNING_COOKIE) == "accepted"

    def warning_page(request: Request) -> HTMLResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return page(request, "warning.html", next=target)

    # --- JSON API -----------------------------------------------------------------------
    @app.get("/api/search", response_model=SearchOut, responses=_ERRORS, tags=["search"],
             summary="Full-text search with filters, sorting and pages")
    def api_search(
        q: Annotated[str | None, Query(max_length=MAX_QUERY_CHARS,
                                       description="Words, \"phrases\", OR, -word")] = None,
        kind: Annotated[Literal["pairs", "redteam"] | None,
                        Query(description="Only preference pairs or red-team attempts")] = None,
        subset: Annotated[str | None, Query(max_length=200,
                                            description="e.g. harmless-base")] = None,
        split: Literal["train", "test"] | None = None,
        turns_min: Annotated[int | None, Query(ge=0, le=100_000)] = None,
        turns_max: Annotated[int | None, Query(ge=0, le=100_000)] = None,
        flag: Annotated[list[str] | None, Query(
            max_length=20, description="Pairs with this audit flag (repeat for all of several)"
        )] = None,
        flagged: Annotated[bool | None, Query(
            description="Pairs with any audit flag (true) or none (false)")] = None,
        model_type: Annotated[str | None, Query(max_length=100,
                                                description="Red-team model type")] = None,
        size: Annotated[str | None, Query(max_length=20,
                                          description="Red-team model size: 2.7B, 13B, 52B")
                        ] = None,
        rating_min: Annotated[float | None, Query(ge=0, le=4, allow_inf_nan=False)] = None,
        rating_max: Annotated[float | None, Query(ge=0, le=4, allow_inf_nan=False)] = None,
        score_min: Annotated[float | None, Query(
            allow_inf_nan=False, description="min_harmlessness_score_transcript, at least")
        ] = None,
        score_max: Annotated[float | None, Query(allow_inf_nan=False)] = None,
        tag: Annotated[str | None, Query(max_length=200, description="Red-team tag")] = None,
        worker: Literal["upwork", "mturk"] | None = None,
        sort: Annotated[Literal[tuple(SORTS)] | None, Query(  # type: ignore[valid-type]
            description="; ".join(f"{k}: {v}" for k, v in SORTS.items()))] = None,
        page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
        per_page: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> SearchOut:
        params = SearchParams(
            q=q or None, kind=kind, subset=subset or None, split=split, turns_min=turns_min,
            turns_max=turns_max, flags=tuple(f for f in (flag or []) if f),
            flagged=flagged, model_type=model_type or None, size=size or None,
            rating_min=rating_min, rating_max=rating_max, score_min=score_min,
            score_max=score_max, tag=tag or None, worker=worker, sort=sort, page=page,
            per_page=per_page)
        return db.search(params)

    @app.get("/api/pair/{source:path}/{index}", response_model=PairOut, responses=_ERRORS,
             tags=["rows"], summary="One preference pair, with the word diff of its responses")
    def api_pair(source: str, index: RowIndex) -> PairOut:
        return db.pair(source, index)

    @app.get("/api/redteam/{source:path}/{index}", response_model=RedTeamOut,
             responses=_ERRORS, tags=["rows"], summary="One red-team attempt")
    def api_redteam(source: str, index: RowIndex) -> RedTeamOut:
        return db.redteam(source, index)

    @app.get("/api/overview", response_model=OverviewOut, tags=["overview"],
             summary="Counts per file, subset and split; audit flags; red-team cells")
    def api_overview() -> OverviewOut:
        return db.overview()

    @app.get("/api/facets", response_model=FacetsOut, tags=["overview"],
             summary="The values each search filter takes")
    def api_facets() -> FacetsOut:
        return db.facets()

    # --- pages --------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview_page(request: Request) -> HTMLResponse:
        return page(request, "overview.html", o=db.overview())

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page(request: Request) -> HTMLResponse:
        if not warned(request):
            return warning_page(request)
        qp = request.query_params
        return page(request, "search.html", facets=db.facets(), p=qp,
                    flags_on=qp.getlist("flag"))

    @app.get("/pair/{source:path}/{index}", response_class=HTMLResponse,
             include_in_schema=False)
    def pair_page(request: Request, source: str,
                  index: RowIndex) -> HTMLResponse:
        if not warned(request):
            return warning_page(request)
        pair = db.pair(source, index)
        return page(request, "pair.html", pair=pair)

    @app.get("/redteam/{source:path}/{index}", response_class=HTMLResponse,
             include_in_schema=False)
    def redteam_page(request: Request, source: str,
                     index: RowIndex) -> HTMLResponse:
        if not warned(request):
            return warning_page(request)
        rt = db.redteam(source, index)
        return page(request, "redteam.html", rt=rt)

    @app.get("/warning", response_class=HTMLResponse, include_in_schema=False)
    def warning_get(request: Request, next: str = "/") -> HTMLResponse:
        return page(request, "warning.html", next=_safe_next(next))

    @app.post("/warning", include_in_schema=False)
    async def warning_accept(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        response = RedirectResponse(_safe_next(form.get("next", ["/"])[0]), status_code=303)
        # A session cookie (no expiry): the warning comes back in a new browser session.
        response.set_cookie(WARNING_COOKIE, "accepted", httponly=True, samesite="strict",
                            path="/")
        return response

    @app.get("/stats.png", include_in_schema=False)
    def stats_png() -> Response:
        png = db.stats_png()
        if png is None:
            raise StarletteHTTPException(404, "no statistics plot in this database")
        return Response(png, media_type="image/png")

    @app.get("/api", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def api_page(request: Request) -> HTMLResponse:
        return page(request, "api.html", endpoints=_endpoints(app.openapi()),
                    base=str(request.base_url).rstrip("/"),
                    description=render_markdown(API_DESCRIPTION))

    return app


_INLINE = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`")


def render_markdown(text: str) -> Markup:
    """The little Markdown the API description uses (paragraphs, **bold**, `code`) as HTML.

    Everything is escaped first; only the markup made here is HTML.
    """
    out = []
    for para in re.split(r"\n\s*\n", text.strip()):
        html, pos = [], 0
        flat = " ".join(para.split())
        for m in _INLINE.finditer(flat):
            html.append(str(escape(flat[pos:m.start()])))
            if m.group(1) is not None:
                html.append(f"<strong>{escape(m.group(1))}</strong>")
            else:
                html.append(f"<code>{escape(m.group(2))}</code>")
            pos = m.end()
        html.append(str(escape(flat[pos:])))
        out.append("<p>" + "".join(html) + "</p>")
    return Markup("\n".join(out))


def _endpoints(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The API's operations, for the /api page, read from the OpenAPI schema."""
    out = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            params = []
            for prm in op.get("parameters", []):
                sch = prm.get("schema", {})
                options = sch.get("anyOf", [sch])
                enum = [v for o in options for v in o.get("enum", [])]
                types = sorted({o.get("type", "") for o in options} - {"null", ""})
                bounds = [f"{k}={o[k]}" for o in options for k in ("minimum", "maximum")
                          if k in o and not (isinstance(o[k], float) and math.isinf(o[k]))]
                params.append({
                    "name": prm["name"], "in": prm["in"], "required": prm.get("required", False),
                    "type": "/".join(types), "enum": enum, "bounds": bounds,
                    "description": prm.get("description", ""),
                })
            out.append({"method": method.upper(), "path": path, "summary": op.get("summary", ""),
                        "params": params,
                        # A plain GET form can try an endpoint whose parameters are all in
                        # the query string: no script, works offline.
                        "form": method == "get" and all(p["in"] == "query" for p in params),
                        "id": re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")})
    return out
