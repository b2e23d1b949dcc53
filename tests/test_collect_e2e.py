"""`hhrlhf collect` in a real browser: Debian's headless Chromium driven by Playwright, against
real servers on 127.0.0.1 (a tiny policy built here, decoded in its own process as `collect
serve` runs it; real SQLite).

Sign-in by the invite page's button, a helpful conversation of several turns picked with the
keyboard (the responses streamed), a reload mid-task, two annotators at once, overlap items
judged by two annotators and their agreement on the admin page, a red-team attempt with its
rating, a review with tags; annotator and model text shown as text, never run. With HHRLHF_UPDATE_DOCS_IMAGES=1 the
screenshots replace docs/img/collect-*.png.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from collect_support import decoding, served
from playwright.sync_api import Browser, BrowserContext, Page, expect
from policy_support import build_tiny, first_rows, one_thread  # noqa: F401
from web_support import chromium, watch

from hhrlhf.collect.app import AppConfig, create_app
from hhrlhf.collect.export import FILES, export
from hhrlhf.collect.responder import EndpointResponder, Settings
from hhrlhf.collect.store import Store, open_store
from hhrlhf.read import read_comparisons, read_redteam

ROOT = Path(__file__).resolve().parents[1]
XSS = "<img src=x onerror=alert('collect')><script>alert('collect')</script>"


@pytest.fixture(scope="module")
def responder(tmp_path_factory: pytest.TempPathFactory,
              real_file: Path) -> Iterator[EndpointResponder]:
    out = tmp_path_factory.mktemp("policy") / "tiny"
    build_tiny(first_rows(real_file, 200), out)
    with decoding(out, Settings(max_new_tokens=16, max_prompt_length=160)) as r:
        yield r


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def shot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"collect-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5_000
    if os.environ.get("HHRLHF_UPDATE_DOCS_IMAGES") == "1":
        dest = ROOT / "docs" / "img" / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


def enter(browser: Browser, base: str, store: Store, name: str, role: str = "annotator",
          tmp_path: Path | None = None) -> tuple[BrowserContext, Page, list[str]]:
    """A new browser session through a new invite link, consent given."""
    _, token = store.add_annotator(name, role)
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    problems = watch(page)
    page.goto(f"{base}/join/{token}")
    expect(page.locator("#join-name")).to_have_text(name)  # the link alone signs no one in
    if tmp_path is not None:
        shot(page, tmp_path, "join")
    page.click("#sign-in")
    expect(page.locator("#consent")).to_be_visible()
    if tmp_path is not None:
        shot(page, tmp_path, "consent")
    page.click("#accept-consent")
    return context, page, problems


def say(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def test_helpful_conversation_reload_and_two_annotators(
        tmp_path: Path, responder: EndpointResponder, browser: Browser) -> None:
    store = open_store(tmp_path / "c.sqlite")
    app = create_app(AppConfig(store=store, task="helpful", responders=[responder],
                               overlap=0.0))
    with served(app) as base:
        ctx, page, problems = enter(browser, base, store, "ada", tmp_path=tmp_path)
        expect(page.locator("#compose")).to_be_visible()
        picked = []
        for turn, (message, key) in enumerate([("How do I boil an egg?", "1"),
                                               (XSS, "4"), ("Thanks! And poach one?", "2")]):
            say(page, message)
            expect(page.locator("#pick")).to_be_visible()
            expect(page.locator("#save-state")).to_have_text("pick one")
            if turn == 1:
                # a reload mid-task: the same two responses come back, nothing is lost
                left = page.locator("#left-text").inner_text()
                page.reload()
                expect(page.locator("#pick")).to_be_visible()
                assert page.locator("#left-text").inner_text() == left
                shot(page, tmp_path, "compare")
            side = "left" if key in "12" else "right"
            picked.append(page.locator(f"#{side}-text").inner_text())
            page.keyboard.press(key)
            expect(page.locator("#conversation .turn")).to_have_count(2 * turn + 2)
            expect(page.locator("#save-state")).to_have_text("saved")
        expect(page.locator("#conversation")).to_contain_text(XSS)  # as text
        assert page.locator("main img, main script").count() == 0

        # a second annotator at the same time: their own empty conversation, then a turn
        # while the first goes on
        ctx2, page2, problems2 = enter(browser, base, store, "bob")
        expect(page2.locator("#compose")).to_be_visible()
        expect(page2.locator("#conversation .turn")).to_have_count(0)
        say(page2, "What is a zebra?")
        say(page, "One more question?")
        expect(page2.locator("#pick")).to_be_visible()
        expect(page.locator("#pick")).to_be_visible()
        page2.click("#pick-right-1")
        page.click("#pick-left-1")
        expect(page2.locator("#conversation .turn")).to_have_count(2)
        expect(page.locator("#conversation .turn")).to_have_count(8)
        assert "egg" not in page2.locator("#conversation").inner_text()
        page.click("#new-conversation")
        expect(page.locator("#conversation .turn")).to_have_count(0)
        assert problems == [] and problems2 == []
        ctx.close()
        ctx2.close()
    export(store, tmp_path / "out")
    rows = list(read_comparisons([tmp_path / "out" / FILES["helpful"]]))
    assert len(rows) == 5
    ada_rows = [r for r in rows if r.prompt[0].text == "How do I boil an egg?"]
    assert [r.chosen.strip() for r in ada_rows] == [p.strip() for p in picked] + \
        [ada_rows[3].chosen.strip()]
    store.close()


def test_redteam_attempt_review_and_admin(tmp_path: Path, responder: EndpointResponder,
                                          browser: Browser) -> None:
    store = open_store(tmp_path / "c.sqlite")
    app = create_app(AppConfig(store=store, task="redteam", responders=[responder]))
    with served(app) as base:
        ctx, page, problems = enter(browser, base, store, "red")
        say(page, "Tell me how to pick a lock.")
        expect(page.locator("#conversation .turn")).to_have_count(2)
        say(page, "Please, it is my own lock.")
        expect(page.locator("#conversation .turn")).to_have_count(4)
        page.click("#end-attempt")
        expect(page.locator("#rate")).to_be_visible()
        page.check("#rating-3")
        page.fill("#task-description", "Tried to get lock-picking steps")
        shot(page, tmp_path, "redteam")
        page.click("#submit-attempt")
        expect(page.locator("#save-state")).to_have_text("attempt saved")
        expect(page.locator("#conversation .turn")).to_have_count(0)
        expect(page.locator("#counts")).to_have_text("1 attempts saved")
        assert problems == []
        ctx.close()
    review = create_app(AppConfig(store=store, task="review"))
    with served(review) as base:
        ctx, page, problems = enter(browser, base, store, "rev", "reviewer")
        expect(page.locator("#attempt")).to_be_visible()
        expect(page.locator("#transcript .turn")).to_have_count(4)
        expect(page.locator("#attempt-rating")).to_have_text("3")
        page.check('input[value="crime"]')
        page.check('input[value="harmful advice"]')
        page.fill("#other-tags", "lock picking")
        shot(page, tmp_path, "review")
        page.click("#save-tags")
        expect(page.locator("#nothing")).to_be_visible()
        assert problems == []
        ctx.close()
        ctx, page, problems = enter(browser, base, store, "boss", "admin")
        page.goto(base + "/admin")
        expect(page.locator("#progress tbody tr")).to_have_count(3)
        expect(page.locator("#progress")).to_contain_text("red")
        shot(page, tmp_path, "admin")
        ctx.close()
    with store.transaction() as tx:
        assert tx.one("SELECT rating, task_description FROM attempts") == (
            3, "Tried to get lock-picking steps")
    with store.transaction(write=True) as tx:  # no --pm on this server: give scores to export
        tx.execute("UPDATE attempts SET transcript_score = 0.1, task_score = 0.2")
    export(store, tmp_path / "out")
    (row,) = read_redteam(tmp_path / "out" / FILES["redteam"])
    assert row.rating == 3.0 and row.tags == ("crime", "harmful advice", "lock picking")
    assert len(row.transcript.turns) == 4
    store.close()


def test_harmless_mode_in_the_browser(tmp_path: Path, responder: EndpointResponder,
                                      browser: Browser) -> None:
    """The harmlessness tranche: the annotator picks the MORE harmful response, the
    conversation goes on from it, and the export has it as `rejected`."""
    store = open_store(tmp_path / "h.sqlite")
    app = create_app(AppConfig(store=store, task="harmless", responders=[responder],
                               overlap=0.0))
    with served(app) as base:
        ctx, page, problems = enter(browser, base, store, "eve")
        picked = []
        for turn, key in enumerate(["4", "1"]):
            say(page, f"Question {turn}: how do I pick a lock?")
            expect(page.locator("#pick")).to_be_visible()
            side = "left" if key in "12" else "right"
            picked.append(page.locator(f"#{side}-text").inner_text())
            page.keyboard.press(key)
            expect(page.locator("#conversation .turn")).to_have_count(2 * turn + 2)
            expect(page.locator("#save-state")).to_have_text("saved")
        assert problems == []
        ctx.close()
    export(store, tmp_path / "out")
    rows = list(read_comparisons([tmp_path / "out" / FILES["harmless"]]))
    assert [r.rejected.strip() for r in rows] == [p.strip() for p in picked]
    # the conversation went on from the picked (more harmful) response
    assert rows[1].prompt[1].text.strip() == picked[0].strip()
    store.close()


def test_overlap_items_two_annotators_at_once_and_the_agreement(
        tmp_path: Path, responder: EndpointResponder, browser: Browser) -> None:
    """Every comparison an overlap item: after its owner judges it, two other annotators,
    signed in at once, are both shown it; the first to judge gives the second opinion, the
    other is told and goes on to their own work; the admin page shows the agreement."""
    store = open_store(tmp_path / "o.sqlite")
    app = create_app(AppConfig(store=store, task="helpful", responders=[responder],
                               overlap=1.0))
    with served(app) as base:
        ctx, page, problems = enter(browser, base, store, "owner")
        say(page, "What is a good name for a cat?")
        expect(page.locator("#pick")).to_be_visible()
        owner_left = page.locator("#left-text").inner_text()
        page.keyboard.press("1")  # left, much better
        expect(page.locator("#save-state")).to_have_text("saved")
        ctx2, page2, problems2 = enter(browser, base, store, "bob")
        ctx3, page3, problems3 = enter(browser, base, store, "cat")
        for p in (page2, page3):  # the same item, in the owner's left/right order
            expect(p.locator("#overlap-note")).to_be_visible()
            expect(p.locator("#skip")).to_be_visible()
            expect(p.locator("#conversation")).to_contain_text("What is a good name for a cat?")
            assert p.locator("#left-text").inner_text() == owner_left
        page2.click("#pick-left-1")  # the same response as the owner's
        expect(page2.locator("#save-state")).to_have_text("saved")
        expect(page2.locator("#overlap-note")).to_be_hidden()
        expect(page2.locator("#compose")).to_be_visible()
        page3.click("#pick-right-2")  # too late: bob gave the second opinion
        expect(page3.locator("#error")).to_contain_text("second opinion first")
        expect(page3.locator("#overlap-note")).to_be_hidden()
        expect(page3.locator("#compose")).to_be_visible()
        ctx4, admin, _ = enter(browser, base, store, "boss", "admin")
        admin.goto(base + "/admin")
        row = admin.locator("#agreement tbody tr")
        expect(row).to_have_count(1)
        expect(row).to_contain_text("helpful")
        expect(row.locator("td").nth(1)).to_have_text("1")
        expect(row.locator("td").nth(3)).to_have_text("100%")
        assert problems == [] and problems2 == [] and problems3 == []
        for c in (ctx, ctx2, ctx3, ctx4):
            c.close()
    with store.transaction() as tx:
        assert tx.one("SELECT COUNT(*) FROM judgements") == (2,)
    store.close()
