"""The explorer's index and JSON API, against the real server (`hhrlhf serve` on 127.0.0.1).

Data: the real harmless-base test file in a cache, a generated red-team file (helper F's seeded
generator, with known ground truth) and a small local file whose rows carry HTML payloads.
Expected counts are computed independently from the records and the ground truth.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from explorer_support import (
    XSS_IMG,
    XSS_SCRIPT,
    seed_cache,
    served,
    write_payload_pairs,
)
from redteam_gen import GroundTruth, write_cached_redteam_file
from web_support import free_port, wait_until_up

from hhrlhf.audit import run_audit
from hhrlhf.errors import HHRLHFError
from hhrlhf.explorer import ExplorerDB, IndexConfig, SearchParams, build_index, to_fts_query
from hhrlhf.explorer.query import QueryError
from hhrlhf.read import read_comparisons

HHRLHF = Path(sys.executable).with_name("hhrlhf")
COOKIE = {"hhrlhf_content_warning": "accepted"}
EVIL_NAME = "evil<b>pairs.jsonl"


@dataclass
class Site:
    base: str
    cache: Path
    db: Path
    gt: GroundTruth
    index_output: str
    serve_output: list[str]

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.base + path, timeout=30, **kw)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, real_file: Path) -> Any:
    root = tmp_path_factory.mktemp("explorer_api")
    cache = seed_cache(root / "cache", real_file)
    gt, pins = write_cached_redteam_file(cache, 600, seed=3)
    evil = write_payload_pairs(root / EVIL_NAME)
    # the generated red-team file is pinned on purpose (the real file's pins refuse it)
    env = {**os.environ, "HHRLHF_CACHE": str(cache), "HHRLHF_PINS": str(pins)}
    built = subprocess.run([HHRLHF, "index", str(evil)], env=env, capture_output=True,
                           text=True, timeout=120, check=False)
    assert built.returncode == 0, built.stderr
    port = free_port()
    proc = subprocess.Popen([HHRLHF, "serve", "--no-update", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base + "/api/facets")
        assert proc.stdout is not None
        first_line = proc.stdout.readline()
        yield Site(base, cache, cache / "explorer.sqlite", gt, built.stdout, [first_line])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def records(real_file: Path) -> list[Any]:
    return list(read_comparisons(real_file))


def _texts(c: Any) -> list[str]:
    return [t.text for t in c.prompt] + [c.chosen, c.rejected]


def _count(records: list[Any], pattern: str, exclude: str | None = None) -> int:
    rx = re.compile(pattern, re.IGNORECASE)
    ex = re.compile(exclude, re.IGNORECASE) if exclude else None
    n = 0
    for c in records:
        texts = _texts(c)
        if any(rx.search(t) for t in texts) and not (ex and any(ex.search(t) for t in texts)):
            n += 1
    return n


# --- the commands ---------------------------------------------------------------------------
def test_index_and_serve_commands_report_what_they_did(site: Site) -> None:
    out = site.index_output
    assert re.search(r"new +harmless-base/test +\(pairs, 2,312 rows\)", out), out
    assert re.search(r"new +red-team-attempts +\(redteam, 600 rows\)", out), out
    assert re.search(r"new +evil<b>pairs\.jsonl +\(pairs, 2 rows\)", out), out
    assert re.search(r"built: .*explorer\.sqlite \(2,914 rows", out), out
    # Loopback unless told otherwise.
    assert "at http://127.0.0.1:" in site.serve_output[0], site.serve_output


def test_cli_errors_are_one_line_and_exit_2(site: Site, tmp_path: Path) -> None:
    env = {**os.environ, "HHRLHF_CACHE": str(site.cache),
           "HHRLHF_PINS": str(site.cache / "pins.tsv")}
    missing = subprocess.run([HHRLHF, "index", str(tmp_path / "nope.jsonl")], env=env,
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"hhrlhf: error: {tmp_path / 'nope.jsonl'}: no such file"
    port = int(site.base.rsplit(":", 1)[1])  # taken by the running server
    busy = subprocess.run([HHRLHF, "serve", "--no-update", "--port", str(port)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert busy.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr


# --- search: counts checked against the records ---------------------------------------------
@pytest.mark.parametrize(("q", "pattern", "exclude"), [
    ("pizza", r"\bpizzas?\b", None),
    ("pizza -cheese", r"\bpizzas?\b", r"\bcheeses?\b"),
    ("pizza OR burger", r"\b(pizza|burger)s?\b", None),
    ('"fast food"', r"\bfast[^a-z0-9]+food\b", None),
])
def test_search_counts_match_the_records(site: Site, records: list[Any], q: str, pattern: str,
                                         exclude: str | None) -> None:
    r = site.get("/api/search", params={"q": q, "subset": "harmless-base", "per_page": 100})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = _count(records, pattern, exclude)
    assert expected > 0
    assert body["total"] == expected
    assert body["ranked"] is True and body["sort"] == "relevance"
    for hit in body["results"]:
        assert hit["subset"] == "harmless-base" and hit["kind"] == "pairs"
        matched = " ".join(t for t, is_hit in hit["snippet"] if is_hit).lower()
        assert any(w in matched for w in ("pizza", "burger", "fast", "food")), hit["snippet"]
        assert hit["snippet_field"] in ("context", "chosen", "rejected")


def test_snippets_say_where_the_match_is(site: Site) -> None:
    # The payload file: row 1 asks "What is a zebra?"; chosen "A striped horse-like animal.",
    # rejected "A striped cat.". Each word is in one part only; the hit says which.
    for word, field in (("zebra", "context"), ("horse", "chosen"), ("cat", "rejected")):
        body = site.get("/api/search", params={"q": word, "subset": EVIL_NAME}).json()
        assert body["total"] == 1, (word, body)
        hit = body["results"][0]
        assert hit["index"] == 1 and hit["snippet_field"] == field, (word, hit)
        assert any(is_hit for _, is_hit in hit["snippet"])
    # "striped" is in both responses: the snippet is one of them, and says which.
    hit = site.get("/api/search", params={"q": "striped", "subset": EVIL_NAME}).json()
    assert hit["results"][0]["snippet_field"] in ("chosen", "rejected")
    i = site.gt.xss_indices[0]
    body = site.get("/api/search", params={"q": "make it print", "kind": "redteam",
                                           "per_page": 100}).json()
    assert {h["snippet_field"] for h in body["results"]} == {"task_description"}
    assert i in {h["index"] for h in body["results"]}
    body = site.get("/api/search", params={"kind": "redteam", "per_page": 1}).json()
    assert body["results"][0]["snippet_field"] in ("task_description", "transcript")


def test_filters_on_pairs_match_the_records_and_the_audit(site: Site,
                                                          records: list[Any]) -> None:
    r = site.get("/api/search", params={"kind": "pairs", "subset": "harmless-base",
                                        "turns_min": 4, "turns_max": 4, "per_page": 100})
    body = r.json()
    assert body["total"] == sum(c.num_turns == 4 for c in records)
    assert {h["num_turns"] for h in body["results"]} == {4}
    audit = run_audit(records)
    for flag in ("role_marker_in_text", "repeated_prompt", "context_mismatch"):
        body = site.get("/api/search", params={"flag": flag, "subset": "harmless-base",
                                               "per_page": 100}).json()
        assert body["total"] == audit.count(flag) > 0, flag
        assert all(flag in h["flags"] for h in body["results"])
        assert {h["index"] for h in body["results"]} == {ref.index for ref in audit.checks[flag]}
    flagged = site.get("/api/search", params={"flagged": "true", "subset": "harmless-base"})
    assert flagged.json()["total"] == sum(bool(audit.flags_of(c)) for c in records)


def test_redteam_filters_match_the_ground_truth(site: Site) -> None:
    rows = site.gt.rows
    steal = re.compile(r"\bsteal(s|ing)?\b", re.IGNORECASE)
    expected = [i for i, r in enumerate(rows)
                if r["model_type"] == "rlhf" and r["rating"] >= 3 and r["is_upworker"] is False
                and (steal.search(r["transcript"]) or steal.search(r["task_description"]))]
    body = site.get("/api/search", params={"q": "steal", "model_type": "rlhf", "rating_min": 3,
                                           "worker": "mturk", "per_page": 100}).json()
    assert body["total"] == len(expected) > 0
    assert sorted(h["index"] for h in body["results"]) == expected
    for h in body["results"]:
        assert h["kind"] == "redteam" and h["model_type"] == "rlhf" and h["rating"] >= 3

    lo, hi = -1.0, 0.5
    expected_n = sum(1 for r in rows if r["num_params"] == "52B"
                     and lo <= r["min_harmlessness_score_transcript"] <= hi)
    body = site.get("/api/search", params={"size": "52B", "score_min": lo, "score_max": hi,
                                           "sort": "score"}).json()
    assert body["total"] == expected_n > 0
    scores = [h["min_harmlessness_score"] for h in body["results"]]
    assert scores == sorted(scores) and lo <= scores[0] and scores[-1] <= hi

    tag = "violence"
    tagged = [i for i, r in enumerate(rows) if r["tags"] and tag in r["tags"]]
    body = site.get("/api/search", params={"tag": tag, "per_page": 100}).json()
    assert sorted(h["index"] for h in body["results"]) == tagged and tagged


def test_sorting_and_pages(site: Site) -> None:
    params: dict[str, Any] = {"kind": "redteam", "sort": "-rating", "per_page": 50}
    first = site.get("/api/search", params=params).json()
    second = site.get("/api/search", params={**params, "page": 2}).json()
    assert first["pages"] == math.ceil(first["total"] / 50) and first["total"] == 600
    ratings = [h["rating"] for h in first["results"] + second["results"]]
    assert ratings == sorted(ratings, reverse=True)
    assert not {h["id"] for h in first["results"]} & {h["id"] for h in second["results"]}
    last = site.get("/api/search", params={**params, "page": first["pages"]}).json()
    assert len(last["results"]) == first["total"] - 50 * (first["pages"] - 1)
    # Where each page stands among all the results, for "results 51-100 of 600".
    assert (first["first"], first["last"]) == (1, 50)
    assert (second["first"], second["last"]) == (51, 100)
    assert last["last"] == last["total"] and last["first"] == 50 * (last["pages"] - 1) + 1
    none = site.get("/api/search", params={"q": "zzzqqqxxy"}).json()
    assert (none["total"], none["pages"], none["first"], none["last"]) == (0, 1, 0, 0)


# --- malformed requests: 4xx with a message, never 500 --------------------------------------
@pytest.mark.parametrize(("params", "status", "message"), [
    ({"q": '"unbalanced'}, 400, "unbalanced double quote"),
    ({"q": "NEAR(dog cat)"}, 400, "FTS5 query syntax"),
    ({"q": "dog AND cat"}, 400, "FTS5 query syntax"),
    ({"q": "dog*"}, 400, "FTS5 query syntax"),
    ({"q": "dog OR"}, 400, "OR needs a word"),
    ({"q": "-dog"}, 400, "no word to search for"),
    ({"q": "x" * 501}, 422, "at most 500 characters"),
    ({"q": "dog", "page": 10**12}, 422, "page: Input should be less than or equal to"),
    ({"q": "dog", "page": 0}, 422, "page: Input should be greater than or equal to 1"),
    ({"q": "pizza", "page": 9999}, 400, "past the last page"),
    ({"rating_min": 3, "rating_max": 1}, 400, "rating_min (3) is above rating_max (1)"),
    ({"score_min": 2, "score_max": -2}, 400, "score_min (2) is above score_max (-2)"),
    ({"turns_min": -1}, 422, "turns_min: Input should be greater than or equal to 0"),
    ({"rating_min": -1}, 422, "rating_min"),
    ({"score_min": "nan"}, 422, "finite number"),
    ({"per_page": 1000}, 422, "per_page"),
    ({"subset": "nope"}, 400, "unknown subset 'nope'"),
    ({"flag": "nope"}, 400, "unknown audit flag 'nope'"),
    ({"model_type": "gpt"}, 400, "unknown model type 'gpt'"),
    ({"kind": "pairs", "model_type": "rlhf"}, 400, "do not go with kind=pairs"),
    ({"sort": "relevance"}, 400, "needs a query"),
    ({"sort": "sideways"}, 422, "sort: Input should be"),
])
def test_malformed_requests_get_a_4xx_with_a_message(site: Site, params: dict[str, Any],
                                                     status: int, message: str) -> None:
    r = site.get("/api/search", params=params)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["detail"]


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/api/pair/harmless-base/test/2312", 404, "no pair harmless-base/test#2312"),
    ("/api/pair/harmless-base/test/abc", 422, "index: Input should be a valid integer"),
    ("/api/pair/harmless-base/test/-1", 422, "index"),
    ("/api/pair/no-such-file/0", 404, "no indexed file named 'no-such-file'"),
    ("/api/redteam/harmless-base/test/0", 404, "is not a red-team attempt"),
])
def test_bad_row_addresses(site: Site, path: str, status: int, message: str) -> None:
    r = site.get(path)
    assert r.status_code == status and message in r.json()["detail"], r.text


def test_a_malformed_query_on_a_page_is_a_message_not_a_500(site: Site) -> None:
    r = site.get("/pair/harmless-base/test/99999", cookies=COOKIE)
    assert r.status_code == 404
    assert "no pair harmless-base/test#99999" in r.text and "<h1>Error 404</h1>" in r.text


def test_to_fts_query_makes_strings_only() -> None:
    assert to_fts_query('steal "a car" -bike') == '("steal" AND "a car") NOT ("bike")'
    assert to_fts_query("pen OR pencil ink") == '("pen" OR "pencil") AND "ink"'
    assert to_fts_query('"NEAR(a b)" x') == '"NEAR(a b)" AND "x"'  # quoted: text
    assert to_fts_query("don't") == '"don\'t"'
    with pytest.raises(QueryError, match="unbalanced"):
        to_fts_query('a "b')


# --- rows, escaping, the content warning ----------------------------------------------------
def test_pair_view_and_its_diff(site: Site, records: list[Any]) -> None:
    c = records[0]
    body = site.get("/api/pair/harmless-base/test/0").json()
    assert [t["text"] for t in body["context"]] == [t.text for t in c.prompt]
    assert body["chosen"] == c.chosen and body["rejected"] == c.rejected
    assert "".join(t for t, _ in body["diff"]["chosen"]) == c.chosen
    assert "".join(t for t, _ in body["diff"]["rejected"]) == c.rejected
    changed = [t for t, ch in body["diff"]["rejected"] if ch]
    assert changed and all(t not in c.chosen for t in changed if len(t) > 12)
    # A row whose two contexts differ shows both.
    mismatch = next(c for c in records if "context_mismatch" in c.flags)
    body = site.get(f"/api/pair/harmless-base/test/{mismatch.index}").json()
    assert [t["text"] for t in body["rejected_context"]] == [
        t.text for t in mismatch.rejected_prompt]
    assert {"name": "context_mismatch",
            "description": "chosen and rejected differ before the final turn"} in body["flags"]


def test_every_text_from_the_data_is_escaped(site: Site) -> None:
    r = site.get(f"/pair/{EVIL_NAME}/0", cookies=COOKIE)
    assert r.status_code == 200
    assert "&lt;script&gt;alert(&#39;pair&#39;)&lt;/script&gt;" in r.text
    # (the diff may cut the <img ...> payload into highlighted pieces: each piece is escaped)
    assert "img src=x onerror=" in r.text and "<img" not in r.text
    assert XSS_SCRIPT not in r.text and XSS_IMG not in r.text and "<b>" not in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    i = site.gt.xss_indices[0]
    r = site.get(f"/redteam/red-team-attempts/{i}", cookies=COOKIE)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert "<script>alert(1)" not in r.text and "<img src=x" not in r.text
    overview = site.get("/").text  # the file name itself carries <b>
    assert "evil&lt;b&gt;pairs.jsonl" in overview and "evil<b>" not in overview


def test_content_warning_comes_first_and_is_remembered(site: Site) -> None:
    for path in ("/search?q=pizza", "/pair/harmless-base/test/0",
                 f"/redteam/red-team-attempts/{site.gt.xss_indices[0]}"):
        r = site.get(path)
        assert r.status_code == 200 and 'id="content-warning"' in r.text
        assert "Assistant</span>" not in r.text and "<ol" not in r.text  # no transcript
    with httpx.Client(base_url=site.base) as client:
        r = client.post("/warning", data={"next": "/pair/harmless-base/test/0"})
        assert r.status_code == 303 and r.headers["location"] == "/pair/harmless-base/test/0"
        cookie = r.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "expires" not in cookie.lower()  # session
        r = client.get("/pair/harmless-base/test/0")
        assert 'id="content-warning"' not in r.text and 'id="responses"' in r.text
        r = client.post("/warning", data={"next": "//evil.example/"})
        assert r.headers["location"] == "/"  # never another site


def test_overview_openapi_and_api_page(site: Site) -> None:
    o = site.get("/api/overview").json()
    assert o["pairs"] == 2314 and o["redteam_attempts"] == 600
    flags = {f["name"]: f["rows"] for f in o["flags"]}
    assert flags["role_marker_in_text"] == 49
    cells = {(c["model_type"], c["num_params"]): c["attacks"] for c in o["redteam_cells"]}
    assert cells == {k: p.attacks for k, p in site.gt.cells.items()}
    assert o["stats_plot"] == "/stats.png"
    png = site.get("/stats.png")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    # Drawn by hhrlhf.stats from the counts the index keeps: the index holds no picture.
    con = sqlite3.connect(f"file:{site.db}?mode=ro", uri=True)
    try:
        assert con.execute("SELECT count(*) FROM meta WHERE key = 'stats_png'").fetchone()[0] == 0
    finally:
        con.close()
    # The overview names files, never this machine's folders.
    text = json.dumps(o)
    assert str(site.cache) not in text and str(site.db.parent) not in text
    assert o["database"] == "explorer.sqlite"
    assert all("path" not in s for s in o["sources"])
    assert {s["name"] for s in o["sources"]} == {"harmless-base/test", "red-team-attempts",
                                                 EVIL_NAME}
    schema = site.get("/openapi.json").json()
    params = {p["name"] for p in schema["paths"]["/api/search"]["get"]["parameters"]}
    assert {"q", "subset", "split", "turns_min", "flag", "model_type", "size", "rating_min",
            "score_max", "tag", "worker", "sort", "page", "per_page"} <= params
    page = site.get("/api").text
    assert "/api/search" in page and "turns_min" in page
    # The description is rendered, not shown as raw Markdown.
    assert "<strong>Query language</strong>" in page and "**" not in page
    assert "<code>q</code>" in page
    # Response shapes are declared once (explorer.schema) and documented in the schema.
    for path, model in (("/api/overview", "OverviewOut"), ("/api/facets", "FacetsOut"),
                        ("/api/search", "SearchOut")):
        ok = schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
        assert ok["schema"]["$ref"].endswith("/" + model)
    hit = schema["components"]["schemas"]["SearchHit"]["properties"]
    assert "snippet_field" in hit


def test_docs_page_works_offline(site: Site) -> None:
    from playwright.sync_api import sync_playwright

    r = site.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("request", lambda req: requests.append(req.url))
            page.goto(site.base + "/docs")
            assert page.locator("h1").inner_text() == "JSON API"
            assert page.locator("section.endpoint").count() >= 5
            # Try an endpoint from the page itself: only the filled fields are sent.
            form = page.locator("#api-search form.try-form")
            page.locator("#api-search summary").click()
            form.locator("input[name=q]").fill("pizza")
            form.locator("select[name=kind]").select_option("pairs")
            with page.expect_navigation():
                form.locator("button").click()
            assert "/api/search?q=pizza&kind=pairs" in page.url, page.url
            body = json.loads(page.locator("body").inner_text())
            assert body["total"] > 0 and body["results"][0]["kind"] == "pairs"
        finally:
            browser.close()
    assert all(u.startswith(site.base) for u in requests), requests  # nothing from outside


def test_the_database_is_opened_read_only(site: Site) -> None:
    con, _ = ExplorerDB(site.db).connection()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        con.execute("CREATE TABLE x(a)")


# --- building: incremental and atomic -------------------------------------------------------
def _search(base: str, q: str) -> int:
    r = httpx.get(base + "/api/search", params={"q": q}, timeout=30)
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


def test_rebuild_is_incremental_per_file(seeded_cache: Path, tmp_path: Path) -> None:
    local = write_payload_pairs(tmp_path / "local.jsonl")
    cfg = IndexConfig(paths=(local,), progress=False, stats_plot=False)
    first = build_index(cfg)
    assert {c.name: c.action for c in first.changes} == {"harmless-base/test": "new",
                                                         "local.jsonl": "new"}
    stamp = first.db_path.stat()
    with served(first.db_path) as base:
        assert _search(base, "zebra") == 1 and _search(base, "okapi") == 0
        again = build_index(IndexConfig(progress=False, stats_plot=False))  # paths remembered
        assert {c.action for c in again.changes} == {"unchanged"} and not again.wrote
        assert first.db_path.stat().st_ino == stamp.st_ino  # not even rewritten
        assert first.db_path.stat().st_mtime_ns == stamp.st_mtime_ns

        write_payload_pairs(local, extra=(("\n\nHuman: okapi?\n\nAssistant: An animal.",
                                           "\n\nHuman: okapi?\n\nAssistant: A car."),))
        local.write_text(local.read_text().replace("zebra", "quagga"))
        changed = build_index(IndexConfig(progress=False, stats_plot=False))
        assert {c.name: c.action for c in changed.changes} == {
            "harmless-base/test": "unchanged", "local.jsonl": "changed"}
        # The running server sees the new database: the old words are gone from the index.
        assert _search(base, "okapi") == 1 and _search(base, "quagga") == 1
        assert _search(base, "zebra") == 0
        assert _search(base, "pizza") > 0  # the unchanged file is still there

        local.unlink()
        removed = build_index(IndexConfig(progress=False, stats_plot=False))
        assert {c.name: c.action for c in removed.changes} == {
            "harmless-base/test": "unchanged", "local.jsonl": "removed"}
        assert _search(base, "okapi") == 0 and _search(base, "pizza") > 0


def test_a_failed_build_leaves_the_previous_database_answering(seeded_cache: Path,
                                                               tmp_path: Path) -> None:
    local = write_payload_pairs(tmp_path / "local.jsonl")
    db = build_index(IndexConfig(paths=(local,), progress=False, stats_plot=False)).db_path
    stale = db.with_name(db.name + ".build-999999999")  # left by a killed build
    stale.write_bytes(b"half a database")
    # Today's name; a build holds the lock, so any copy it finds is a killed build's.
    stale_tmp = db.with_name(f".{db.name}.k2j4x9ab.tmp")
    stale_tmp.write_bytes(b"half a database")
    before = db.stat()
    with served(db) as base:
        assert _search(base, "zebra") == 1
        # The file changes, and breaks half-way: its third row is not JSON.
        lines = local.read_text().splitlines()
        local.write_text("\n".join([lines[0].replace("zebra", "quagga"), lines[1],
                                    '{"chosen": "\\n\\nHuman: hi', lines[1]]) + "\n")
        with pytest.raises(HHRLHFError, match=r"local\.jsonl:3: not valid JSON"):
            build_index(IndexConfig(progress=False, stats_plot=False))
        assert db.stat().st_ino == before.st_ino and db.stat().st_size == before.st_size
        assert _search(base, "zebra") == 1 and _search(base, "quagga") == 0
    assert not list(db.parent.glob(db.name + ".build-*"))  # the failed copy and the stale one
    assert not list(db.parent.glob(f".{db.name}.*.tmp"))
    assert ExplorerDB(db).search(SearchParams(q="zebra")).total == 1


def test_api_description_markdown_is_escaped_then_rendered() -> None:
    from hhrlhf.explorer.app import render_markdown

    html = render_markdown("**Bold** <b>raw</b> `x<y>`\n  and more\n\nSecond **p**.")
    assert str(html) == ("<p><strong>Bold</strong> &lt;b&gt;raw&lt;/b&gt; <code>x&lt;y&gt;</code>"
                         " and more</p>\n<p>Second <strong>p</strong>.</p>")
