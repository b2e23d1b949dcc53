"""Red-team analytics against the seeded generator's ground truth, exactly.

Expected figures are recomputed here independently of hhrlhf.redteam: plain Python
(``statistics``, ``collections``) and a hand-written Wilson formula and Spearman (ranks by
pandas, Pearson by numpy), never the module's own helpers.
"""

from __future__ import annotations

import gzip
import json
import math
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
    MODEL_TYPES,
    SIZES,
    TAGGED_TYPES,
    XSS_SCRIPT,
    GroundTruth,
    make_rows,
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
    with gzip.open(gt.path, "rb") as fh:
        raw = fh.read()
    assert raw.lstrip().startswith(b"[")  # ONE JSON array, not JSON lines
    rows = json.loads(raw)
    assert len(rows) == N and rows == gt.rows
    fields = ["transcript", SCORE, "num_params", "model_type", "rating", "task_description",
              "task_description_harmlessness_score", "red_team_member_id", "is_upworker", "tags"]
    for r in rows:
        assert list(r) == fields
        assert r["transcript"].startswith("\n\nHuman: ")
        assert type(r["rating"]) is float and r["rating"] in (0.0, 1.0, 2.0, 3.0, 4.0)
        assert type(r["red_team_member_id"]) is int and type(r["is_upworker"]) is bool
        assert r["num_params"] in SIZES and r["model_type"] in MODEL_TYPES
        assert r["tags"] is None or (isinstance(r["tags"], list) and len(r["tags"]) <= 6)
    # Deterministic: the same seed gives the same rows, another seed other rows.
    assert make_rows(N, SEED)[0] == gt.rows
    assert make_rows(N, SEED + 1)[0] != gt.rows


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
    for x in ("rating", "task_description_harmlessness_score"):
        for g in groups:
            rows = [r for r in gt.rows if g == "all" or r["model_type"] == g]
            c = analysis.correlation(x, SCORE, g)
            assert c.n == len(rows)
            assert c.rho == pytest.approx(spearman([r[x] for r in rows], [r[SCORE] for r in rows]),
                                          abs=1e-12)
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
            assert im.size[0] > 300 and im.size[1] > 200
            # not a blank canvas: a plot has many colours
            assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_reads_the_cached_file(cache: Path, gt: GroundTruth) -> None:
    dest = cache / "data" / "red-team-attempts" / "red_team_attempts.jsonl.gz"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(gt.path.read_bytes())
    a = load_and_analyse("red-team-attempts", progress=False)
    assert a.attacks == N


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
