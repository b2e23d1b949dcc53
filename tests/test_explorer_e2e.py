"""The explorer in a real browser: Debian's headless Chromium driven by Playwright, against the
real server on 127.0.0.1, over the real harmless-base test file and a generated red-team file.

Walks through: the content warning, a search, a filter, a pair with its highlighted
differences (screenshot), escaping of script/HTML payloads, and a malformed query's message.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from explorer_support import seed_cache, served
from playwright.sync_api import Browser, expect
from redteam_gen import XSS_IMG, XSS_SCRIPT, write_cached_redteam_file
from web_support import chromium, watch

from hhrlhf.explorer import IndexConfig, build_index

ROOT = Path(__file__).resolve().parents[1]
README_SHOT = ROOT / "docs" / "img" / "explorer-pair.png"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, real_file: Path) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("explorer_e2e")
    cache = seed_cache(root / "cache", real_file)
    gt, pins = write_cached_redteam_file(cache, 300, seed=5)
    mp = pytest.MonkeyPatch()
    mp.setenv("HHRLHF_CACHE", str(cache))
    mp.setenv("HHRLHF_PINS", str(pins))  # the generated red-team file, pinned on purpose
    try:
        db = build_index(IndexConfig(progress=False, stats_plot=False)).db_path
        with served(db) as base:
            yield {"base": base, "gt": gt}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def test_warning_search_filter_and_pair(site: dict[str, Any], browser: Browser,
                                        tmp_path: Path) -> None:
    base = site["base"]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = watch(page)

    # The content warning stands before any transcript.
    page.goto(base + "/search")
    expect(page.locator("#content-warning")).to_be_visible()
    expect(page.locator("#results")).to_have_count(0)
    page.click("#accept-warning")
    expect(page.locator("#search-form")).to_be_visible()
    cookie = next(c for c in context.cookies() if c["name"] == "hhrlhf_content_warning")
    assert cookie["expires"] == -1  # a session cookie: remembered for this session only

    # A search.
    page.fill("#q", "pizza")
    page.press("#q", "Enter")
    expect(page.locator("li.hit").first).to_be_visible()
    expect(page.locator("li.hit mark.hit").first).to_be_visible()
    status = page.locator("#status").inner_text()
    unfiltered = httpx.get(base + "/api/search", params={"q": "pizza"}).json()["total"]
    assert status.startswith(f"{unfiltered:,} result")
    # Each snippet says where its match is.
    wheres = [w.lower() for w in page.locator("li.hit .snippet .where").all_inner_texts()]
    assert wheres and set(wheres) <= {"context", "chosen", "rejected"}
    assert len(wheres) == page.locator("li.hit").count()

    # Numbered pages with the total: 1 2 3 ... last, and where this page stands.
    page.goto(base + "/search?kind=pairs&page=5")
    expect(page.locator("li.hit").first).to_be_visible()
    pages = -(-2312 // 20)
    pager = page.locator("#pager")
    expect(pager.locator(".current")).to_have_text("5")
    links = pager.locator("a").all_inner_texts()
    assert links == ["← previous", "1", "2", "3", "4", "6", "7", str(pages), "next →"], links
    assert pager.locator(".gap").count() == 1
    expect(pager.locator(".total")).to_have_text("results 81–100 of 2,312")
    pager.locator("a", has_text=str(pages)).click()
    page.wait_for_url(f"**page={pages}**")
    expect(pager.locator(".total")).to_have_text(f"results {20 * (pages - 1) + 1:,}–2,312 of "
                                                 "2,312")
    page.goto(base + "/search?q=pizza")
    expect(page.locator("li.hit").first).to_be_visible()

    # A filter: only pairs of at least 6 turns (a select searches at once when changed).
    page.fill("#f-turns_min", "6")
    page.select_option("#f-kind", "pairs")
    page.wait_for_url("**kind=pairs**")
    expect(page.locator("li.hit").first).to_be_visible()
    assert "turns_min=6" in page.url
    filtered = httpx.get(base + "/api/search",
                         params={"q": "pizza", "kind": "pairs", "turns_min": 6}).json()
    assert 0 < filtered["total"] < unfiltered
    assert page.locator("#status").inner_text().startswith(f"{filtered['total']:,} result")
    kinds = page.locator("li.hit .badge", has_text="pair").all_inner_texts()
    turns = page.locator("li.hit .badge", has_text=" turns").all_inner_texts()
    assert len(kinds) == len(turns) == len(filtered["results"])
    assert min(int(t.split()[0]) for t in turns) >= 6

    # Open the first pair: the shared context once, the two responses with their differences.
    first = filtered["results"][0]
    page.locator("a.hit-link").first.click()
    page.wait_for_url(f"**{first['url']}")
    expect(page.locator("#context .turn").first).to_be_visible()
    chosen_marks = page.locator("#chosen-text mark.diff")
    rejected_marks = page.locator("#rejected-text mark.diff")
    expect(chosen_marks.first).to_be_visible()
    expect(rejected_marks.first).to_be_visible()
    pair = httpx.get(base + first["api_url"]).json()
    assert page.locator("#chosen-text").inner_text().strip() == pair["chosen"].strip()
    assert chosen_marks.all_inner_texts() == [t for t, ch in pair["diff"]["chosen"] if ch]
    expect(page.locator("#permalink")).to_have_attribute("href", first["url"])
    shot = tmp_path / "explorer-pair.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("HHRLHF_UPDATE_DOCS_IMAGES") == "1":  # refresh the README's picture
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, README_SHOT)

    # The permalink works in the same session without the warning; a new session warns again.
    page.goto(base + first["url"])
    expect(page.locator("#responses")).to_be_visible()
    fresh = browser.new_context().new_page()
    fresh.goto(base + first["url"])
    expect(fresh.locator("#content-warning")).to_be_visible()
    fresh.context.close()
    assert problems == []
    context.close()


def test_payloads_show_as_text_and_never_run(site: dict[str, Any], browser: Browser) -> None:
    base = site["base"]
    context = browser.new_context()
    page = context.new_page()
    problems = watch(page)
    page.goto(base + "/warning?next=/search%3Fq%3Dscript%26kind%3Dredteam")
    page.click("#accept-warning")
    expect(page.locator("li.hit").first).to_be_visible()
    snippet = page.locator("li.hit .snippet").first.inner_text()
    assert "<script>alert(1)</script>" in snippet
    assert page.locator("main script, main img").count() == 0

    i = site["gt"].xss_indices[0]
    page.goto(f"{base}/redteam/red-team-attempts/{i}")
    expect(page.locator("#transcript")).to_contain_text(XSS_SCRIPT)
    expect(page.locator("#transcript")).to_contain_text(XSS_IMG)
    expect(page.locator("#task")).to_contain_text(XSS_IMG)
    assert page.locator("main script, main img").count() == 0
    assert problems == []

    # A malformed query: a clear message in the page, no results.
    page.goto(base + "/search")
    page.fill("#q", '"unbalanced')
    page.press("#q", "Enter")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("unbalanced double quote")
    expect(page.locator("li.hit")).to_have_count(0)
    assert problems == []
    context.close()
