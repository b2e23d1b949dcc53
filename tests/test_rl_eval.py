"""`hhrlhf rl eval RUN`: the reward-vs-sqrt(KL) fit, win rates and Elo under the trained and a
held-out PM, red-team openings before/after, outputs and one-line errors.

The run folder is built for real: a tiny policy (BPE + Llama) from the real file as the initial
policy, a copy of it (or a perturbed copy) as the final policy, two lexical PMs trained on
different halves of real rows, and a metrics.jsonl with known reward and KL values (the input
data of the evaluation)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_support import (
    ENV,
    build_tiny,
    first_rows,
    one_thread,  # noqa: F401  # autouse
)
from redteam_gen import write_redteam_file

from hhrlhf.cli import main
from hhrlhf.errors import HHRLHFError
from hhrlhf.pm.lexical import LexicalConfig, LexicalPreferenceModel
from hhrlhf.policy import Policy
from hhrlhf.rl.evaluation import compare_scores, elo, fit_line, read_curve, read_run

HHRLHF = str(Path(sys.executable).parent / "hhrlhf")
CMD = ["rl", "eval"]

# (step, kl, reward): reward grows like sqrt(KL), with noise; one negative KL estimate
KLS = [-0.002, 0.01, 0.03, 0.05, 0.09, 0.14, 0.2, 0.27, 0.35, 0.44]
REWARDS = [0.11, 0.29, 0.41, 0.52, 0.69, 0.85, 0.97, 1.12, 1.29, 1.41]


@pytest.fixture(scope="module")
def parts(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rleval")
    rows = first_rows(real_file, 1200)
    initial = root / "initial"
    policy = build_tiny(rows[:300], initial)
    # an untied random LM head: with tied random weights greedy decoding repeats one token
    torch.manual_seed(3)
    policy.net.config.tie_word_embeddings = False
    policy.net.lm_head.weight = torch.nn.Parameter(torch.randn_like(policy.net.lm_head.weight))
    policy.save(initial)
    # the "final" policy: the same network with its LM head moved
    torch.manual_seed(4)
    with torch.no_grad():
        policy.net.lm_head.weight.add_(torch.randn_like(policy.net.lm_head.weight))
    perturbed = root / "perturbed"
    policy.save(perturbed)
    config = LexicalConfig(n_features=2**12)
    pm, heldout = root / "pm", root / "pm-heldout"
    LexicalPreferenceModel.fit(rows[:600], config).save(pm)
    LexicalPreferenceModel.fit(rows[600:], config).save(heldout)
    redteam = root / "redteam.json.gz"
    write_redteam_file(redteam, n=100, seed=1)
    return {"root": root, "real_file": real_file, "initial": initial, "perturbed": perturbed, "pm": pm,
            "heldout": heldout, "redteam": redteam}


def make_run(folder: Path, parts: dict[str, Path], final: str = "initial") -> Path:
    """An RL run folder as `hhrlhf rl` writes it, with ``final`` as its model/."""
    folder.mkdir(parents=True)
    shutil.copytree(parts[final], folder / "model")
    (folder / "config.json").write_text(json.dumps({
        "policy": str(parts["initial"]), "pm": str(parts["pm"]), "algo": "rloo",
        "data": [str(parts["real_file"])], "seed": 0, "max_new_tokens": 8, "max_length": 104,
        "temperature": 1.0, "top_p": 1.0, "top_k": 0}))
    with open(folder / "metrics.jsonl", "w") as fh:
        for step, (kl, reward) in enumerate(zip(KLS, REWARDS), start=1):
            fh.write(json.dumps({"step": step, "reward_mean": reward, "kl": kl,
                                 "entropy": 2.0, "response_len": 8.0}) + "\n")
            if step == 5:  # an evaluation record, and a step logged again (a resumed run)
                fh.write(json.dumps({"step": step, "eval_reward": 0.3}) + "\n")
                fh.write(json.dumps({"step": step, "reward_mean": reward, "kl": kl}) + "\n")
    return folder


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main([*CMD, *args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_equals_numpy_polyfit_on_sqrt_kl(parts: dict[str, Path], tmp_path: Path) -> None:
    run = read_run(make_run(tmp_path / "run", parts))
    curve = read_curve(run)
    assert [p.step for p in curve] == list(range(1, 11))  # eval row skipped, repeat kept once
    x = np.sqrt(np.maximum(KLS, 0))
    fit = fit_line([p.sqrt_kl for p in curve], [p.reward for p in curve])
    assert fit is not None and fit.points == 10
    slope, intercept = np.polyfit(x, REWARDS, 1)
    assert fit.slope == pytest.approx(slope, rel=1e-10)
    assert fit.intercept == pytest.approx(intercept, rel=1e-10)
    assert fit.r2 == pytest.approx(np.corrcoef(x, REWARDS)[0, 1] ** 2, rel=1e-10)
    assert fit_line([0.3, 0.3], [1.0, 2.0]) is None  # no spread in x: no line
    flat = fit_line([0.0, 1.0], [2.0, 2.0])
    assert flat is not None and flat.slope == 0 and flat.r2 is None


def test_elo_and_win_rate_formulas() -> None:
    assert elo(0.5) == 0
    assert elo(0.75) == pytest.approx(400 * math.log10(3))
    assert elo(0.25) == pytest.approx(-400 * math.log10(3))
    assert elo(1.0) == math.inf and elo(0.0) == -math.inf
    final = np.array([1.0, 0.0, 2.0, -1.0, 0.5])
    initial = np.array([0.0, 0.0, 0.0, 0.0, 0.5])
    r = compare_scores("trained", "pm", final, initial, bootstrap=500, seed=1)
    # diffs 1, 0, 2, -1, 0: two wins, two ties (half a win each), one loss
    assert (r.wins, r.ties, r.losses) == (2, 2, 1) and r.win_rate == pytest.approx(0.6)
    assert r.elo == pytest.approx(400 * math.log10(0.6 / 0.4))
    assert r.win_interval.low <= r.win_rate <= r.win_interval.high
    assert r.elo_interval.low == pytest.approx(elo(r.win_interval.low))
    want = float(np.mean(1 / (1 + np.exp(-(final - initial)))))
    assert r.probability == pytest.approx(want)
    assert r.probability_interval.low <= want <= r.probability_interval.high
    every = compare_scores("trained", "pm", final + 5, initial, bootstrap=0)
    assert every.win_rate == 1 and every.elo == math.inf  # won every prompt: no finite Elo
    # ... and the table says so in words, not as "+inf"
    from hhrlhf.rl.evaluation import _elo, _signed

    assert _elo(every.elo) == "all won" and _signed(math.inf) == "unbounded"
    assert _elo(-math.inf) == "all lost" and _elo(r.elo) == f"{r.elo:+.1f}"
    assert r.mean_change == pytest.approx(0.4)


def test_identical_policy_greedy_gives_half(parts: dict[str, Path], tmp_path: Path,
                                            real_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", parts, final="initial")
    code, out, err = run_cli([str(run), "--prompts", str(real_file), "--max-prompts", "6",
                              "--heldout-pm", str(parts["heldout"]), "--redteam",
                              str(parts["redteam"]), "--max-redteam", "5", "--temperature", "0",
                              "--json"], capsys)
    assert code == 0, err
    assert "note: --prompts names data the run was trained on" in err
    doc = json.loads(out)
    assert doc["win_rate"]["prompts"] == 6 and doc["redteam"]["prompts"] == 5
    # from the run's config: max_new_tokens, and max_length less that for the prompt
    assert doc["sampling"]["max_new_tokens"] == 8 and doc["sampling"]["max_prompt_length"] == 96
    for section in ("win_rate", "redteam"):
        assert [p["pm"] for p in doc[section]["pms"]] == ["trained", "held-out"]
        for p in doc[section]["pms"]:
            assert p["win_rate"] == 0.5 and p["elo"] == 0 and p["ties"] == p["prompts"]
            assert p["probability"] == 0.5
            assert p["mean_change"] == 0 and p["mean_initial"] == p["mean_final"]
    assert doc["win_rate"]["divergence"] == 0
    assert "--samples needs prompts" in one_line_error([str(run), "--samples", "x.jsonl"], capsys)
    clash = str(tmp_path / "same.png")
    assert "different files" in one_line_error([str(run), "--plot", clash, "--output", clash],
                                               capsys)


def test_changed_policy_win_rates_table_plot_and_json(parts: dict[str, Path], tmp_path: Path,
                                                      real_file: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", parts, final="perturbed")
    plot, out_json, samples = tmp_path / "curve.png", tmp_path / "eval.json", tmp_path / "s.jsonl"
    args = [str(run), "--prompts", str(real_file), "--max-prompts", "8", "--heldout-pm",
            str(parts["heldout"]), "--redteam", str(parts["redteam"]), "--max-redteam", "6",
            "--temperature", "1", "--seed", "2", "--plot", str(plot), "--output", str(out_json), "--samples",
            str(samples)]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "reward = " in out and "sqrt(KL)" in out and "held-out" in out
    assert "Red-team opening turns (6)" in out
    doc = json.loads(out_json.read_text())
    pms = doc["win_rate"]["pms"]
    for p in pms + doc["redteam"]["pms"]:
        assert 0 <= p["win_interval"]["low"] <= p["win_rate"] <= p["win_interval"]["high"] <= 1
        if 0 < p["win_rate"] < 1:
            assert p["elo"] == pytest.approx(
                400 * math.log10(p["win_rate"] / (1 - p["win_rate"])))
        else:  # one policy won every prompt: an infinite Elo, written as null in the JSON
            assert p["elo"] is None
        assert p["wins"] + p["ties"] + p["losses"] == p["prompts"]
    assert sum(p["ties"] for p in pms) < sum(p["prompts"] for p in pms)  # the policy changed
    assert doc["win_rate"]["divergence"] == pytest.approx(pms[0]["win_rate"] - pms[1]["win_rate"])
    # every prompt's responses and scores: the win rate counts the final response's wins (ties
    # half), the probability is the mean sigmoid of the score differences
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["section"] for r in rows] == ["heldout"] * 8 + ["redteam"] * 6
    assert all(r["prompt"].startswith("\n\nHuman:") for r in rows)
    for section, key in (("heldout", "win_rate"), ("redteam", "redteam")):
        for p in doc[key]["pms"]:
            diffs = np.array([r["scores"][p["pm"]]["final"] - r["scores"][p["pm"]]["initial"]
                              for r in rows if r["section"] == section])
            assert p["win_rate"] == pytest.approx(np.mean((diffs > 0) + 0.5 * (diffs == 0)))
            assert p["probability"] == pytest.approx(np.mean(1 / (1 + np.exp(-diffs))),
                                                     rel=1e-6)
    fit = doc["reward_vs_sqrt_kl"]["fit"]
    assert fit["slope"] == pytest.approx(np.polyfit(np.sqrt(np.maximum(KLS, 0)), REWARDS, 1)[0])
    assert doc["reward_vs_sqrt_kl"]["kl_clipped"] == 1
    from PIL import Image

    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] >= 1200
    # the same seed samples the same responses: a second run writes the same numbers, and may
    # replace its own outputs
    code, _, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out_json.read_text())["win_rate"] == doc["win_rate"]


def test_checkpoints_over_training(parts: dict[str, Path], tmp_path: Path, real_file: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", parts, final="perturbed")
    for step, policy in ((3, "initial"), (6, "perturbed")):  # as `hhrlhf rl` keeps them
        shutil.copytree(parts[policy], run / "checkpoints" / f"step-{step:08d}" / "model")
    (run / "checkpoints" / ".tmp-step-00000009").mkdir()  # a killed save: not a checkpoint
    plot = tmp_path / "curve.png"
    code, out, err = run_cli([str(run), "--prompts", str(real_file), "--max-prompts", "5",
                              "--heldout-pm", str(parts["heldout"]), "--temperature", "0",
                              "--checkpoints", "--plot", str(plot), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    steps = doc["over_training"]
    assert [w["step"] for w in steps] == [3, 6, 10]  # two checkpoints, then the final policy
    assert steps[0]["kl"] == KLS[2] and steps[2]["kl"] == KLS[9]
    assert all(p["win_rate"] == 0.5 and p["ties"] == 5 for p in steps[0]["pms"])  # unchanged
    assert steps[1]["pms"] == steps[2]["pms"] == doc["win_rate"]["pms"]  # the same weights
    from PIL import Image

    with Image.open(plot) as im:
        assert im.size[0] >= 2000  # the second panel: win rates over training
    bare = make_run(tmp_path / "bare", parts)
    assert "kept no checkpoints" in one_line_error(
        [str(bare), "--prompts", str(real_file), "--checkpoints"], capsys)
    assert "give --prompts" in one_line_error([str(run), "--checkpoints"], capsys)


def test_curve_only_without_prompts(parts: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", parts)
    shutil.rmtree(run / "model")  # not needed for the curve
    code, out, err = run_cli([str(run), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["reward_vs_sqrt_kl"]["points"]) == 10 and doc["win_rate"]["pms"] == []


def one_line_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == ""
    lines = [line for line in err.strip().splitlines() if not line.startswith("hhrlhf: note:")]
    assert len(lines) == 1 and lines[0].startswith("hhrlhf: error: "), err
    return lines[0]


def test_one_line_errors(parts: dict[str, Path], tmp_path: Path, real_file: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    assert "no such run folder" in one_line_error([str(tmp_path / "nope")], capsys)
    # a policy folder has a config.json, but not an RL run's
    assert "not an RL run" in one_line_error([str(parts["initial"])], capsys)
    (tmp_path / "empty").mkdir()
    assert "no config.json" in one_line_error([str(tmp_path / "empty")], capsys)
    run = make_run(tmp_path / "run", parts)
    prompts = ["--prompts", str(real_file), "--max-prompts", "2", "--max-new-tokens", "2"]
    # a missing PM, before any sampling
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "pm": str(tmp_path / "gone")}))
    assert "no such model folder" in one_line_error([str(run), *prompts], capsys)
    assert "no such model folder" in one_line_error(
        [str(run), *prompts, "--pm", str(parts["pm"]), "--heldout-pm", str(tmp_path / "x")],
        capsys)
    (run / "config.json").write_text(json.dumps(cfg))
    # a preference file given as red-team data
    assert "no red-team transcripts" in one_line_error(
        [str(run), "--redteam", str(real_file)], capsys)
    assert "needs prompts" in one_line_error([str(run), "--heldout-pm", str(parts["pm"])],
                                             capsys)
    # never over the run's files or a file hhrlhf rl eval did not write
    assert "refusing" in one_line_error([str(run), "--output", str(run / "metrics.jsonl")],
                                        capsys)
    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine\n")
    assert "not written by `hhrlhf rl eval`" in one_line_error([str(run), "--output", str(foreign)],
                                                                capsys)
    assert foreign.read_text() == "mine\n"
    assert "not written by `hhrlhf rl eval`" in one_line_error([str(run), "--plot", str(foreign)],
                                                                capsys)
    assert "folder to write in does not exist" in one_line_error(
        [str(run), *prompts, "--plot", str(tmp_path / "no" / "p.png")], capsys)
    # a broken metrics line is named by file and line
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write("{not json\n")
    msg = one_line_error([str(run)], capsys)
    assert f"metrics.jsonl:{len(KLS) + 3}:" in msg
    # no final policy
    shutil.rmtree(run / "model")
    (run / "metrics.jsonl").write_text("")
    assert "no final policy" in one_line_error([str(run), *prompts], capsys)


def test_command_line_subprocess(parts: dict[str, Path], tmp_path: Path) -> None:
    """Through the installed `hhrlhf` script: exit 2 and one line for a folder that is not a run."""
    proc = subprocess.run([HHRLHF, *CMD, str(parts["initial"])], capture_output=True, text=True,
                          env=ENV, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not an RL run" in proc.stderr
    run = make_run(tmp_path / "run", parts)
    proc = subprocess.run([HHRLHF, *CMD, str(run)], capture_output=True, text=True, env=ENV,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "10 logged steps" in proc.stdout


def test_read_run_override(parts: dict[str, Path], tmp_path: Path) -> None:
    run = read_run(make_run(tmp_path / "run", parts), pm="elsewhere")
    assert run.pm == "elsewhere" and run.initial == str(parts["initial"])
    with pytest.raises(HHRLHFError):
        read_run(tmp_path / "run" / "model")  # a policy folder
    assert Policy.load(run.final).net is not None
