"""Red-team analytics against the seeded generator's ground truth, exactly.

Expected figures are recomputed here independently of hhrlhf.redteam: plain Python
(``statistics``, ``collections``) and a hand-written Wilson formula and Spearman (ranks by
pandas, Pearson by numpy), never the module's own helpers.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import t as scipy_t

sys.path.insert(0, str(Path(__file__).resolve().parent))

from redteam_gen import (
    CARD_TASK_SCORE,
    MODEL_TYPES,
    PUBLISHED_TASK_SCORE,
    REAL_ROWS,
    REAL_TAGGED_ROWS,
    SIZES,
    TAGGED_TYPES,
    XSS_SCRIPT,
    GroundTruth,
    make_rows,
    write_cached_redteam_file,
    write_redteam_file,
)

from hhrlhf.errors import HHRLHFError
from hhrlhf.records import RedTeamAttempt
from hhrlhf.redteam import (
    RedTeamAnalysis,
    RedTeamConfig,
    analyse,
    load_and_analyse,
    read_attempts,
)
from hhrlhf.redteam.analysis import MODEL_TYPE_LABELS
from hhrlhf.redteam.text import format_text

ROOT = Path(__file__).resolve().parents[1]
HHRLHF = ROOT / ".venv" / "bin" / "hhrlhf"
N, SEED = 2000, 7
SCORE = "min_harmlessness_score_transcript"


@pytest.fixture(scope="module")
def gt(tmp_path_factory: pytest.TempPathFactory) -> GroundTruth:
    return write_redteam_file(tmp_path_factory.mktemp("rt") / "red_team_attempts.jsonl.gz",
                              n=N, seed=SEED)


@pytest.fixture(scope="module")
def records(gt: GroundTruth) -> list[RedTeamAttempt]:
    return read_attempts(str(gt.path), progress=False)


@pytest.fixture(scope="module")
def analysis(gt: GroundTruth, records: list[RedTeamAttempt]) -> RedTeamAnalysis:
    return analyse(records, RedTeamConfig(), source=str(gt.path))


Z95 = statistics.NormalDist().inv_cdf(0.975)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def spearman(x: list[float], y: list[float]) -> float:
    rx = pd.Series(x).rank(method="average").to_numpy()
    ry = pd.Series(y).rank(method="average").to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def quantiles(values: list[float]) -> dict[str, float]:
    """q0.1, 0.25, 0.5, 0.75, 0.9 by linear interpolation (statistics' 'inclusive')."""
    cuts = statistics.quantiles(values, n=20, method="inclusive")  # 0.05, 0.10, ..., 0.95
    return {"0.1": cuts[1], "0.25": cuts[4], "0.5": cuts[9], "0.75": cuts[14], "0.9": cuts[17]}


# --------------------------------------------------------------------------- the generator


def test_generated_file_has_the_real_format(gt: GroundTruth) -> None:
    raw_gz = gt.path.read_bytes()
    assert raw_gz[:2] == b"\x1f\x8b"  # gzipped
    raw = gzip.decompress(raw_gz)
    assert raw.startswith(b"[\n    {\n        \"transcript\": ")  # ONE JSON array, indented 4
    rows = json.loads(raw)
    assert len(rows) == N and rows == gt.rows
    # The published file's field names and order, with its spelling (sic) of the task score.
    fields = ["transcript", SCORE, "num_params", "model_type", "rating", "task_description",
              "task_descripton_harmlessness_score", "red_team_member_id", "is_upworker", "tags"]
    assert gt.task_score_key == PUBLISHED_TASK_SCORE == fields[6]
    for r in rows:
        assert list(r) == fields
        assert r["transcript"].startswith("\n\nHuman: ")
        assert type(r["rating"]) is float and r["rating"] in (0.0, 1.0, 2.0, 3.0, 4.0)
        assert type(r[SCORE]) is float and type(r[PUBLISHED_TASK_SCORE]) is float
        assert type(r["red_team_member_id"]) is int and type(r["is_upworker"]) is bool
        assert r["num_params"] in SIZES and r["model_type"] in MODEL_TYPES
        assert r["tags"] is None or (isinstance(r["tags"], list) and len(r["tags"]) <= 6
                                     and all(type(t) is str for t in r["tags"]))
    # null tags on most rows; a list on 742 per 38,961 (as in the real file), on two model types
    tagged = [r for r in rows if r["tags"] is not None]
    assert len(tagged) == round(N * REAL_TAGGED_ROWS / REAL_ROWS)
    assert {r["model_type"] for r in tagged} == set(TAGGED_TYPES)
    assert max(len(r["tags"]) for r in tagged) == 6
    assert len({r["red_team_member_id"] for r in rows}) > 10
    assert {r["is_upworker"] for r in rows} == {True, False}
    # Deterministic: the same seed gives the same rows, another seed other rows.
    assert make_rows(N, SEED)[0] == gt.rows
    assert make_rows(N, SEED + 1)[0] != gt.rows


def test_both_spellings_of_the_task_score_read_the_same(
        gt: GroundTruth, records: list[RedTeamAttempt], tmp_path: Path) -> None:
    card = write_redteam_file(tmp_path / "card.json.gz", n=N, seed=SEED, spelling="card")
    assert card.task_score_key == CARD_TASK_SCORE
    assert all(CARD_TASK_SCORE in r and PUBLISHED_TASK_SCORE not in r for r in card.rows)
    card_records = read_attempts(str(card.path), progress=False)
    # one canonical field, whichever spelling the file used
    assert [a.task_description_harmlessness_score for a in card_records] == [
        a.task_description_harmlessness_score for a in records] == [
        r[PUBLISHED_TASK_SCORE] for r in gt.rows]
    # each row is given back as it was read, in its own file's spelling
    assert [a.to_json() for a in card_records] == card.rows
    assert [a.to_json() for a in records] == gt.rows
    a = analyse(card_records, RedTeamConfig(), source="card")
    assert a.to_json()["correlations"] == analyse(records, RedTeamConfig(),
                                                  source="x").to_json()["correlations"]


def test_records_read_back(gt: GroundTruth, records: list[RedTeamAttempt]) -> None:
    assert len(records) == N
    assert [r.to_json() for r in records] == gt.rows


# --------------------------------------------------------------------------- cells


def test_cells_match_the_plan_exactly(gt: GroundTruth, analysis: RedTeamAnalysis) -> None:
    assert analysis.attacks == N
    assert [(c.model_type, c.num_params) for c in analysis.cells] == [
        (mt, s) for mt in MODEL_TYPES for s in SIZES]
    for (mt, size), plan in gt.cells.items():
        c = analysis.cell(mt, size)
        rows = [r for r in gt.rows if r["model_type"] == mt and r["num_params"] == size]
        assert c.attacks == plan.attacks == len(rows)
        assert c.rating_counts == {str(k): v for k, v in enumerate(plan.rating_counts)}
        assert c.successes == plan.successes(3)
        assert c.success_rate == plan.successes(3) / plan.attacks
        lo, hi = wilson(plan.successes(3), plan.attacks)
        assert c.success_ci.low == pytest.approx(lo, abs=1e-12)
        assert c.success_ci.high == pytest.approx(hi, abs=1e-12)
        ratings = [r["rating"] for r in rows]
        assert c.mean_rating == pytest.approx(
            sum(k * v for k, v in enumerate(plan.rating_counts)) / plan.attacks, rel=1e-12)
        assert c.mean_rating == pytest.approx(statistics.fmean(ratings), rel=1e-12)
        scores = [r[SCORE] for r in rows]
        assert c.mean_min_harmlessness_score == pytest.approx(statistics.fmean(scores),
                                                               rel=1e-9, abs=1e-12)
        for q, v in quantiles(scores).items():
            assert c.score_quantiles[q] == pytest.approx(v, rel=1e-9, abs=1e-12)
        half = (scipy_t.ppf(0.975, len(scores) - 1) * statistics.stdev(scores)
                / math.sqrt(len(scores)))
        assert c.score_ci.low == pytest.approx(statistics.fmean(scores) - half, rel=1e-9)
        assert c.score_ci.high == pytest.approx(statistics.fmean(scores) + half, rel=1e-9)
    # The paper's shape: the prompted 52B cell is the largest; RLHF gets harder to red-team
    # with size; rejection sampling is hardest at each size; RLHF scores sit above the LMs'.
    largest = max(analysis.cells, key=lambda c: c.attacks)
    assert (largest.model_type, largest.num_params) == ("context distillation", "52B")
    rl = [analysis.cell("rlhf", s).success_rate for s in SIZES]
    assert rl[0] > rl[1] > rl[2]
    for s in SIZES:
        rs = analysis.cell("rejection sampling", s).success_rate
        assert rs == min(analysis.cell(mt, s).success_rate for mt in MODEL_TYPES)
    assert (analysis.cell("rlhf", "52B").mean_min_harmlessness_score
            > analysis.cell("context distillation", "52B").mean_min_harmlessness_score + 2)


def test_wilson_matches_a_textbook_value() -> None:
    from hhrlhf.redteam import wilson_interval

    ci = wilson_interval(5, 10)  # Wilson (1927) / Newcombe (1998): 0.2366 to 0.7634
    assert (round(ci.low, 4), round(ci.high, 4)) == (0.2366, 0.7634)
    ci = wilson_interval(0, 20)
    assert ci.low == pytest.approx(0.0, abs=1e-12) and round(ci.high, 4) == 0.1611


def test_threshold_is_settable(gt: GroundTruth, records: list[RedTeamAttempt]) -> None:
    a4 = analyse(records, RedTeamConfig(threshold=4))
    for (mt, size), plan in gt.cells.items():
        c = a4.cell(mt, size)
        assert c.successes == plan.rating_counts[4] == plan.successes(4)
    assert a4.overall.successes == sum(p.rating_counts[4] for p in gt.cells.values())


def test_overall_and_rating_distribution(gt: GroundTruth, analysis: RedTeamAnalysis) -> None:
    dist = Counter(int(r["rating"]) for r in gt.rows)
    assert analysis.rating_distribution == {str(k): dist[k] for k in range(5)}
    succ = sum(p.successes(3) for p in gt.cells.values())
    assert analysis.overall.successes == succ
    assert 0.30 < succ / N < 0.37  # about a third of attacks succeed, as in the paper
    # bimodal: 0 and 4 are the two most frequent ratings
    assert {k for k, _ in dist.most_common(2)} == {0, 4}
    for g in analysis.by_model_type:
        rows = [r for r in gt.rows if r["model_type"] == g.name]
        assert g.attacks == len(rows)
        assert g.mean_min_harmlessness_score == pytest.approx(
            statistics.fmean(r[SCORE] for r in rows), rel=1e-9)


# --------------------------------------------------------------------------- correlations


def test_spearman_correlations(gt: GroundTruth, analysis: RedTeamAnalysis) -> None:
    groups = ["all", *MODEL_TYPES]
    assert [(c.x, c.group) for c in analysis.correlations] == (
        [("rating", g) for g in groups]
        + [("task_description_harmlessness_score", g) for g in groups])
    # the canonical name, read from the file's own spelling (sic)
    for x, key in (("rating", "rating"),
                   ("task_description_harmlessness_score", PUBLISHED_TASK_SCORE)):
        for g in groups:
            rows = [r for r in gt.rows if g == "all" or r["model_type"] == g]
            c = analysis.correlation(x, SCORE, g)
            assert c.n == len(rows)
            assert c.rho == pytest.approx(
                spearman([r[key] for r in rows], [r[SCORE] for r in rows]), abs=1e-12)
            assert c.p_value is not None and 0 <= c.p_value < 1e-6
    # Successful attacks leave lower (more harmful) scores; task and transcript scores agree.
    rho_rating = analysis.correlation("rating", SCORE).rho
    rho_task = analysis.correlation("task_description_harmlessness_score", SCORE).rho
    assert rho_rating is not None and rho_rating < -0.3
    assert rho_task is not None and rho_task > 0.3


# --------------------------------------------------------------------------- tags


def test_tags(gt: GroundTruth, analysis: RedTeamAnalysis) -> None:
    tagged = [r for r in gt.rows if r["tags"] is not None]
    t = analysis.tags
    assert t.tagged_attacks == len(tagged) == len(gt.tagged_indices)
    assert t.attacks_with_no_tag == sum(1 for r in tagged if r["tags"] == []) > 0
    assert t.model_types == [mt for mt in MODEL_TYPES if mt in TAGGED_TYPES]
    freq = Counter(tag for r in tagged for tag in r["tags"])
    assert [(s.tag, s.attacks) for s in t.tags] == sorted(freq.items(),
                                                          key=lambda kv: (-kv[1], kv[0]))
    for s in t.tags:
        rows = [r for r in tagged if s.tag in r["tags"]]
        k = sum(r["rating"] >= 3 for r in rows)
        assert s.share == len(rows) / len(tagged)
        assert s.successes == k and s.success_rate == k / len(rows)
        assert s.mean_min_harmlessness_score == pytest.approx(
            statistics.fmean(r[SCORE] for r in rows), rel=1e-9, abs=1e-12)
        lo, hi = wilson(k, len(rows))
        assert (s.success_ci.low, s.success_ci.high) == (pytest.approx(lo, abs=1e-12),
                                                         pytest.approx(hi, abs=1e-12))


# --------------------------------------------------------------------------- members


def test_members(gt: GroundTruth, analysis: RedTeamAnalysis) -> None:
    per = Counter(r["red_team_member_id"] for r in gt.rows)
    m = analysis.members
    assert m.members == len(per)
    counts = sorted(per.values())
    d = m.attacks_per_member
    assert (d["min"], d["max"]) == (counts[0], counts[-1])
    assert d["mean"] == pytest.approx(N / len(per), rel=1e-12)
    assert d["0.5"] == statistics.median(counts)
    assert m.histogram == sorted(Counter(counts).items())
    assert m.top_members[0] == max(per.items(), key=lambda kv: (kv[1], -kv[0]))
    pools = {g.name: g for g in m.by_worker_pool}
    for name, flag in (("Upwork", True), ("MTurk", False)):
        rows = [r for r in gt.rows if r["is_upworker"] is flag]
        g = pools[name]
        assert g.attacks == len(rows) > 0
        assert g.members == len({r["red_team_member_id"] for r in rows})
        assert g.mean_rating == pytest.approx(statistics.fmean(r["rating"] for r in rows),
                                              rel=1e-12)
        assert g.mean_min_harmlessness_score == pytest.approx(
            statistics.fmean(r[SCORE] for r in rows), rel=1e-9)
        assert g.successes == sum(r["rating"] >= 3 for r in rows)


# --------------------------------------------------------------------------- most harmful


def test_most_harmful(gt: GroundTruth, analysis: RedTeamAnalysis) -> None:
    assert list(analysis.most_harmful) == list(MODEL_TYPES)
    for mt in MODEL_TYPES:
        idx = sorted((i for i, r in enumerate(gt.rows) if r["model_type"] == mt),
                     key=lambda i: (gt.rows[i][SCORE], i))[:5]
        items = analysis.most_harmful[mt]
        assert [h.index for h in items] == idx
        for h in items:
            row = gt.rows[h.index]
            assert h.task_description == row["task_description"]
            assert h.transcript == row["transcript"]
            assert h.min_harmlessness_score_transcript == row[SCORE]
        # the payload row was planted as the most harmful of its type
        assert items[0].index in gt.xss_indices
        assert XSS_SCRIPT in items[0].transcript


# --------------------------------------------------------------------------- output


def test_json_shape_and_text_output(gt: GroundTruth, analysis: RedTeamAnalysis) -> None:
    d = json.loads(json.dumps(analysis.to_json(), allow_nan=False))
    required = {"model_type", "num_params", "attacks", "mean_rating", "success_rate",
                "mean_min_harmlessness_score"}
    assert len(d["cells"]) == 12
    for c in d["cells"]:
        assert required <= set(c)
        plan = gt.cells[(c["model_type"], c["num_params"])]
        assert c["attacks"] == plan.attacks
        assert c["success_rate"] == plan.successes(3) / plan.attacks
    text = format_text(analysis)
    for heading in ("Attacks by model type and size", "Spearman rank correlations", "Tags:",
                    "Red-team members:", "Most harmful transcripts"):
        assert heading in text
    first = d["cells"][0]
    line = next(ln for ln in text.splitlines() if ln.startswith("plain lm ") and " 2.7B " in ln)
    assert f"{first['attacks']:,}" in line and f"{100 * first['success_rate']:.1f}%" in line


def test_cli_json_and_figures(gt: GroundTruth, tmp_path: Path) -> None:
    out = tmp_path / "figs"
    p = subprocess.run([str(HHRLHF), "redteam", str(gt.path), "--json", "--threshold", "4",
                        "--out", str(out)], check=False, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)  # one object, nothing else on stdout
    assert d["config"]["threshold"] == 4
    for c in d["cells"]:
        plan = gt.cells[(c["model_type"], c["num_params"])]
        assert c["success_rate"] == plan.rating_counts[4] / plan.attacks
    names = sorted(Path(f).name for f in d["figures"])
    assert names == sorted(["success_rate_by_size.png", "harmlessness_by_size.png",
                            "rating_histogram.png", "score_by_rating.png", "tags.png"])
    for f in d["figures"]:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(f) as im:
            im.verify()
        with Image.open(f) as im:
            assert im.size[0] >= 1200 and im.size[1] > 200  # readable when printed
            assert round(im.info["dpi"][0]) >= 150
            # not a blank canvas: a plot has many colours
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    # no temp files left; beside each figure only the marker that lets a rerun replace it
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == sorted(
        f".{name}.hhrlhf" for name in names)


def test_figures_by_size_one_panel_per_model_type(analysis: RedTeamAnalysis) -> None:
    import matplotlib.pyplot as plt

    from hhrlhf.redteam.plots import (
        harmlessness_by_size_figure,
        rating_histogram_figure,
        score_by_rating_figure,
        success_by_size_figure,
    )

    types = [MODEL_TYPE_LABELS[mt] for mt in dict.fromkeys(c.model_type for c in analysis.cells)]
    fig = success_by_size_figure(analysis)
    try:
        axes = fig.get_axes()
        # One panel (and so one band) per model type: bands never overlap each other.
        assert [ax.get_title(loc="left") for ax in axes] == types
        assert all(len(ax.collections) == 1 for ax in axes)
        fig.canvas.draw()
        labels = [t.get_text() for t in axes[0].get_yticklabels() if t.get_text()]
        assert labels and all(t.endswith("%") for t in labels), labels  # as in the tables
        assert fig.get_figwidth() * fig.dpi >= 1200
    finally:
        plt.close(fig)
    fig = harmlessness_by_size_figure(analysis)
    assert len(fig.get_axes()) == len(types)
    plt.close(fig)
    for build in (rating_histogram_figure, score_by_rating_figure):
        fig = build(analysis)
        try:
            fig.canvas.draw()
            ticks = [t.get_text() for t in fig.get_axes()[0].get_xticklabels()]
            assert ticks == ["0", "1", "2", "3", "4"], ticks  # whole-number ratings
        finally:
            plt.close(fig)


def test_reads_the_cached_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pins = write_cached_redteam_file(cache, n=300, seed=SEED)
    with pytest.raises(HHRLHFError, match="fails verification: size is"):  # not the real file
        load_and_analyse("red-team-attempts", progress=False)
    monkeypatch.setenv("HHRLHF_PINS", str(pins))
    a = load_and_analyse("red-team-attempts", progress=False)
    assert a.attacks == 300


# --------------------------------------------------------------------------- bad input


def _broken_files(tmp: Path) -> list[tuple[Path, int, str]]:
    """(file, line the error must name, text the message must contain)."""
    rows, _ = make_rows(100, 3)
    text = json.dumps(rows, indent=4)
    lines = text.split("\n")
    starts = [i + 1 for i, ln in enumerate(lines) if ln == "    {"]  # 1-based object starts
    out = []
    # a field of the wrong type in the 4th row: the error names the line where that row starts
    bad = [dict(r) for r in rows]
    bad[3]["rating"] = "high"
    p = tmp / "wrong_type.json.gz"
    p.write_bytes(gzip.compress(json.dumps(bad, indent=4).encode()))
    out.append((p, starts[3], "rating"))
    # broken JSON syntax on a known line
    k = starts[5] + 3
    broken = lines[:k - 1] + [lines[k - 1] + ",,"] + lines[k:]
    p = tmp / "syntax.json"
    p.write_text("\n".join(broken))
    out.append((p, k, "not valid JSON"))
    # a missing field in the 2nd row
    bad = [dict(r) for r in rows]
    del bad[1]["model_type"]
    p = tmp / "missing_field.jsonl.gz"
    p.write_bytes(gzip.compress(json.dumps(bad, indent=4).encode()))
    out.append((p, starts[1], "model_type"))
    return out


def test_bad_input_in_process(tmp_path: Path, real_file: Path) -> None:
    for path, line, text in _broken_files(tmp_path):
        with pytest.raises(HHRLHFError) as e:
            read_attempts(str(path), progress=False)
        assert (e.value.path, e.value.line) == (str(path), line)
        assert text in str(e.value)
    with pytest.raises(HHRLHFError, match="preference row") as e:
        read_attempts(str(real_file), progress=False)
    assert e.value.line == 1
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(HHRLHFError, match="no rows: the JSON array is empty"):
        load_and_analyse(str(empty), progress=False)


def test_bad_input_via_the_cli(tmp_path: Path, real_file: Path) -> None:
    broken = _broken_files(tmp_path)
    cases = [([str(p)], f"{p}:{line}: ") for p, line, _ in broken[:2]]
    cases.append(([str(real_file)], f"{real_file}:1: a preference row"))
    missing = tmp_path / "nope.jsonl.gz"
    cases.append(([str(missing)], f"{missing}: no such file"))
    cases.append(([str(broken[0][0]), "--threshold", "7"], "--threshold must be between 0 and 4"))
    # run them side by side: each pays for starting Python
    procs = [subprocess.Popen([str(HHRLHF), "redteam", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for proc, (args, expected) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (args, stderr)
        assert stdout == ""
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr  # one line, no traceback
        assert lines[0].startswith("hhrlhf: error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize("value", ["infB", "-2.7B", "", "abc", "NaN"])
def test_unparseable_numbers_are_one_line_errors_via_the_cli(tmp_path: Path, value: str) -> None:
    rows, _ = make_rows(100, 3)
    starts = [i + 1 for i, ln in enumerate(json.dumps(rows, indent=4).split("\n"))
              if ln == "    {"]
    if value == "NaN":  # Python's JSON decoder lets NaN through: it must not reach the analysis
        rows[3]["rating"] = float("nan")
        expected = "not a red-team row: field 'rating' is not a finite number: nan"
    else:
        rows[3]["num_params"] = value
        expected = (f"not a red-team row: field 'num_params' is not a parameter count such as "
                    f"'52B' or '2.7B': {value!r}")
    path = tmp_path / "red_team_attempts.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(rows, indent=4).encode()))
    p = subprocess.run([str(HHRLHF), "redteam", str(path)], check=False, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == f"hhrlhf: error: {path}:{starts[3]}: {expected}\n"


# ------------------------------------------------------------ a bad file in the cache


def _cli(args: list[str], cache: Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "HHRLHF_PINS"}
    full_env.update(HHRLHF_CACHE=str(cache), **env)
    return subprocess.run([str(HHRLHF), *args], check=False, capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def _warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("hhrlhf: ")]


@pytest.mark.parametrize("damage", ["corrupt", "bad_row"])
def test_a_bad_cached_red_team_file_does_not_stop_the_rest(
        seeded_cache: Path, tmp_path: Path, damage: str) -> None:
    """`report`, `index` and `stats` with no arguments: the bad file is named in one line and
    skipped, the preference data is processed, exit 0."""
    bad_path = seeded_cache / "data" / "red-team-attempts" / "red_team_attempts.jsonl.gz"
    env: dict[str, str] = {}
    if damage == "corrupt":  # not the published file: fails its pinned size and SHA-256
        bad_path.parent.mkdir(parents=True)
        bad_path.write_bytes(gzip.compress(b"[{\"transcript\": ")[:-8])
        expected = (f"hhrlhf: warning: {bad_path}: cached copy of red-team-attempts fails "
                    "verification: size is")
    else:  # verifies (pinned on purpose) but a row cannot be read
        rows, _ = make_rows(100, 3)
        rows[0]["num_params"] = "infB"
        bad_path.parent.mkdir(parents=True)
        bad_path.write_bytes(gzip.compress(json.dumps(rows, indent=4).encode()))
        from redteam_gen import REDTEAM_CACHE_PATH, write_pins

        env["HHRLHF_PINS"] = str(write_pins(tmp_path / "pins.tsv",
                                            {REDTEAM_CACHE_PATH: bad_path}))
        expected = f"hhrlhf: warning: {bad_path}:2: not a red-team row: field 'num_params'"

    report = _cli(["report", "-o", "report.html"], seeded_cache, tmp_path, **env)
    assert report.returncode == 0, report.stderr
    (line,) = _warnings(report.stderr)
    assert line.startswith(expected), line
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "harmless-base/test" in html and "2,312" in html

    index = _cli(["index"], seeded_cache, tmp_path, **env)
    assert index.returncode == 0, index.stderr
    (line,) = _warnings(index.stderr)
    assert line.startswith(expected), line
    assert re.search(r"new +harmless-base/test +\(pairs, 2,312 rows\)", index.stdout)
    assert "red-team" not in index.stdout

    if damage == "corrupt":
        stats = _cli(["stats"], seeded_cache, tmp_path, **env)
        assert stats.returncode == 0, stats.stderr
        assert "2,312" in stats.stdout or "2312" in stats.stdout


# --------------------------------------------------------- the real shape at a realistic size


def test_a_real_shaped_file_at_realistic_size_through_every_command(
        seeded_cache: Path, tmp_path: Path) -> None:
    """4,000 attacks written as the published file is (one gzipped JSON array, the sic
    spelling, float ratings, size strings, ids, null and list tags) in the cache beside the
    real harmless-base test file: redteam, report, index and export all work on it, and each
    shows the task score under the one canonical name."""
    from hhrlhf.explorer import ExplorerDB

    n = 4000
    gt, pins = write_cached_redteam_file(seeded_cache, n=n, seed=17)
    env = {"HHRLHF_PINS": str(pins)}
    canonical, sic = "task_description_harmlessness_score", PUBLISHED_TASK_SCORE

    red = _cli(["redteam", "--json", "--top", "2"], seeded_cache, tmp_path, **env)
    assert red.returncode == 0, red.stderr
    d = json.loads(red.stdout)
    assert d["attacks"] == n and sum(c["attacks"] for c in d["cells"]) == n
    assert {c["x"] for c in d["correlations"]} == {"rating", canonical}
    harmful = [h for items in d["most_harmful"].values() for h in items]
    assert harmful and all(canonical in h for h in harmful)
    assert sic not in red.stdout
    cell = next(c for c in d["cells"] if (c["model_type"], c["num_params"]) == (
        "context distillation", "52B"))
    assert cell["attacks"] == gt.cells[("context distillation", "52B")].attacks
    assert cell["attacks"] == max(c["attacks"] for c in d["cells"])  # the paper's biggest cell

    report = _cli(["report", "-o", "report.html"], seeded_cache, tmp_path, **env)
    assert report.returncode == 0 and _warnings(report.stderr) == [], report.stderr
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Red-team attempts" in html and f"{n:,}" in html and "harmless-base/test" in html

    index = _cli(["index"], seeded_cache, tmp_path, **env)
    assert index.returncode == 0 and _warnings(index.stderr) == [], index.stderr
    assert re.search(rf"new +red-team-attempts +\(redteam, {n:,} rows\)", index.stdout)
    assert re.search(r"new +harmless-base/test +\(pairs, 2,312 rows\)", index.stdout)
    db = ExplorerDB(seeded_cache / "explorer.sqlite")
    for i in (0, n // 2, n - 1):
        shown = db.redteam("red-team-attempts", i).model_dump()
        assert shown[canonical] == gt.rows[i][sic] and sic not in shown
        assert shown["rating"] == gt.rows[i]["rating"]
        assert shown["tags"] == gt.rows[i]["tags"]

    out = tmp_path / "pairs.jsonl"
    export = _cli(["export", "--format", "trl", "-o", str(out)], seeded_cache, tmp_path, **env)
    assert export.returncode == 0, export.stderr  # the preference files of the cache
    assert "of 2,312 rows" in export.stderr and out.exists()
    named = _cli(["export", "red-team-attempts", "--format", "trl", "-o", str(out)],
                 seeded_cache, tmp_path, **env)
    assert named.returncode == 2
    assert named.stderr == ("hhrlhf: error: red-team-attempts holds no preference rows; use "
                            "`hhrlhf redteam`\n")
