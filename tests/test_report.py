"""`hhrlhf report`: one self-contained HTML file, checked in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from redteam_gen import (
    XSS_IMG,
    XSS_SCRIPT,
    GroundTruth,
    write_cached_redteam_file,
    write_redteam_file,
)
from web_support import chromium

ROOT = Path(__file__).resolve().parents[1]
HHRLHF = ROOT / ".venv" / "bin" / "hhrlhf"


def run(args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HHRLHF_CACHE": str(cache)}
    return subprocess.run([str(HHRLHF), "report", *args], check=False, capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture
def full_cache(seeded_cache: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, GroundTruth]:
    """The cache with the real harmless-base test file and a generated red-team file (pinned
    by $HHRLHF_PINS: the real file's own pins refuse it)."""
    gt, pins = write_cached_redteam_file(seeded_cache, n=600, seed=11)
    monkeypatch.setenv("HHRLHF_PINS", str(pins))
    return seeded_cache, gt


def test_report_in_a_browser(full_cache: tuple[Path, GroundTruth], tmp_path: Path) -> None:
    cache, gt = full_cache
    out = tmp_path / "out" / "report.html"
    p = run(["-o", str(out)], cache, tmp_path)  # no sources: everything in the cache
    assert p.returncode == 0, p.stderr
    assert out.exists() and f"wrote {out}" in p.stdout
    html = out.read_text(encoding="utf-8")
    # Self-contained: no external reference at all, and the page forbids scripts.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<script" not in html.replace("&lt;script", "")
    assert "Content-Security-Policy" in html
    assert html.count('src="data:image/png;base64,') == 6

    from playwright.sync_api import Dialog

    errors: list[str] = []
    dialogs: list[str] = []
    requests: list[str] = []
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: errors.append(f"console: {m.text}")
                if m.type == "error" else None)
        def on_dialog(d: Dialog) -> None:  # an alert() would land here
            dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", on_dialog)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(out.as_uri(), wait_until="load")

        assert page.title() == "HH-RLHF data report"
        assert page.locator("h1").inner_text() == "HH-RLHF data report"
        warning = page.locator("#content-warning")
        assert warning.is_visible() and "Content warning" in warning.inner_text()
        box = warning.bounding_box()
        assert box is not None and box["y"] < 400  # at the top, seen first
        h2 = page.locator("h2").all_inner_texts()
        for heading in ("Preference data: statistics", "Preference data: audit",
                        "Red-team attempts"):
            assert heading in h2
        h3 = page.locator("h3").all_inner_texts()
        for heading in ("Attacks by model type and size", "Tags", "Red-team members",
                        "Most harmful transcripts"):
            assert heading in h3

        # The tables a reader sees carry the ground truth's numbers.
        rows = page.locator("table.cells tbody tr")
        assert rows.count() == 12
        for (mt, size), plan in gt.cells.items():
            row = rows.filter(has_text=mt).filter(has_text=size).first
            cells = row.locator("td").all_inner_texts()
            assert cells[:3] == [mt, size, f"{plan.attacks:,}"]
            assert cells[4] == f"{100 * plan.successes(3) / plan.attacks:.1f}%"
        audit_rows = page.locator("#preference-audit table tbody tr").all_inner_texts()
        assert any(r.startswith("empty_response") and "\t4\t" in r for r in audit_rows)
        assert "2,312 comparisons" in page.locator("#preference-stats").inner_text()

        # Every image loaded.
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
        assert len(widths) == 6 and all(w > 0 for w in widths)

        # The payload rows are shown as text and did not run.
        page.eval_on_selector_all("details", "els => els.forEach(e => e.open = true)")
        text = page.locator("body").inner_text()
        assert XSS_SCRIPT in text and XSS_IMG in text
        assert page.eval_on_selector_all("script", "els => els.length") == 0
        assert page.eval_on_selector_all("img:not([src^='data:'])", "els => els.length") == 0
        harmful = page.locator("details.harmful").filter(has_text=XSS_SCRIPT)
        assert harmful.count() == 4  # one planted per model type, each the most harmful

        # Tables fit the column at 1024 px: no sideways scroll, of the page or of a table.
        page.set_viewport_size({"width": 1024, "height": 900})
        assert page.evaluate("document.documentElement.scrollWidth") <= 1024
        overflow = page.eval_on_selector_all(
            "table", "els => els.filter(t => t.getBoundingClientRect().right > "
            "document.documentElement.clientWidth + 0.5).map(t => t.className || "
            "t.querySelector('th').innerText)")
        assert overflow == []
        assert page.eval_on_selector_all(
            "*", "els => els.filter(e => e.scrollWidth > e.clientWidth + 1 && "
            "getComputedStyle(e).overflowX !== 'visible').length") == 0
        # Numbers: thousands separators, two decimals; quantiles named in words.
        headers = page.locator("table.quantiles thead th").all_inner_texts()
        assert headers[2:] == ["10th percentile", "25th percentile", "median",
                               "75th percentile", "90th percentile"]
        dist_headers = page.locator("#preference-stats table").nth(1).locator(
            "th").all_inner_texts()
        assert "median" in dist_headers and "99th percentile" in dist_headers
        first = page.locator("#preference-stats table").first.locator(
            "tbody td").all_inner_texts()
        assert first[1] == "2,312" and re.fullmatch(r"\d+\.\d\d", first[2]), first
        assert all(re.fullmatch(r"[\d,]+\.\d\d", v) for v in first[3:6]), first
        dist = page.locator("#preference-stats table").nth(1).locator(
            "tbody tr").filter(has_text="prompt").locator("td").all_inner_texts()
        assert re.fullmatch(r"\d,\d{3}", dist[-1]), dist  # the longest prompt: 1,000+

        shot = tmp_path / "report.png"
        page.set_viewport_size({"width": 1200, "height": 900})
        page.eval_on_selector_all("details", "els => els.forEach(e => e.open = false)")
        page.screenshot(path=str(shot))
    assert errors == [] and dialogs == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("HHRLHF_UPDATE_DOCS_IMAGES") == "1":  # refresh the README's picture
        docs_img = ROOT / "docs" / "img"
        docs_img.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, docs_img / "report.png")


def test_named_sources_and_atomic_write(tmp_path: Path, cache: Path, real_file: Path) -> None:
    gt = write_redteam_file(tmp_path / "rt.json.gz", n=300, seed=5)
    out = tmp_path / "r.html"
    p = run([str(gt.path), "-o", str(out), "--top", "1"], cache, tmp_path)
    assert p.returncode == 0, p.stderr
    html = out.read_text(encoding="utf-8")
    assert "Red-team attempts" in html and "Preference data" not in html
    assert html.count('class="harmful"') == 4  # --top 1: one per model type
    before = out.read_bytes()
    # A failure midway (a malformed second file) leaves the previous report untouched.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": "x"}\n{oops\n')
    p = run([str(real_file), str(bad), "-o", str(out)], cache, tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hhrlhf: error: {bad}:2: not valid JSON")
    assert out.read_bytes() == before
    # no temporary left; only the marker that lets `hhrlhf report` replace its own file
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".")) == [
        ".r.html.hhrlhf"]


def test_shared_report_names_files_not_folders_once_each(tmp_path: Path, cache: Path,
                                                         real_file: Path) -> None:
    gt = write_redteam_file(tmp_path / "data" / "rt.json.gz", n=200, seed=4)
    local = tmp_path / "data" / "mine.jsonl.gz"
    local.write_bytes(real_file.read_bytes())
    out = tmp_path / "r.html"
    # Each file named twice, once by a path that goes round about.
    twice = tmp_path / "data" / ".." / "data" / "mine.jsonl.gz"
    p = run([str(local), str(twice), str(gt.path), str(gt.path), "-o", str(out)], cache,
            tmp_path)
    assert p.returncode == 0, p.stderr
    html = out.read_text(encoding="utf-8")
    assert str(tmp_path) not in html and "/tmp" not in html  # no folder of this machine
    assert "mine.jsonl.gz" in html and "rt.json.gz" in html
    assert html.count('<section id="redteam-') == 1  # one section per file
    assert "2,312 comparisons" in html  # the preference file read once, not twice


def test_errors(tmp_path: Path, cache: Path) -> None:
    p = run([], cache, tmp_path)  # empty cache
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        ("hhrlhf: error: nothing in the cache to report on; run `hhrlhf fetch` or name "
         "subsets or files")]
    missing = tmp_path / "missing.jsonl.gz"
    p = run([str(missing)], cache, tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith(f"hhrlhf: error: {missing}: no such file")
    assert not (tmp_path / "report.html").exists()
