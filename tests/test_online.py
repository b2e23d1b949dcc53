"""hhrlhf online: simulated annotators keep their set agreement rate and Bradley-Terry
probabilities; two tiny rounds run end to end in the official format; a loop killed (SIGKILL)
mid-round and resumed ends with the files of one never stopped; in human mode the collect app
(a real server, real HTTP, real SQLite) hands each round's quota back to the loop, across a
SIGKILL; bad settings are one line."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from policy_support import ENV, one_thread, run_cli  # noqa: F401

from hhrlhf.errors import HHRLHFError
from hhrlhf.online.annotators import SimulatedAnnotators, flip_probability
from hhrlhf.pm.base import PreferenceModel
from hhrlhf.records import Comparison, Dialogue

HHRLHF = str(Path(".venv/bin/hhrlhf").resolve())


class LengthJudge(PreferenceModel):
    """A real (tiny) judge: the final response's length in characters, divided by 10."""

    kind = "test-length"

    def score(self, dialogues: Sequence[Dialogue], batch_size: int = 32) -> np.ndarray:
        return np.asarray([len(d.turns[-1].text) / 10 for d in dialogues], dtype=np.float64)

    def save(self, path: str | Path) -> None:
        raise NotImplementedError("lives in the test only")


def pairs(n: int, a: str, b: str) -> list[Comparison]:
    row = Comparison.from_strings(f"\n\nHuman: hi\n\nAssistant: {a}",
                                  f"\n\nHuman: hi\n\nAssistant: {b}")
    return [row] * n


def test_flip_rate_gives_the_agreement() -> None:
    for a in (0.5, 0.63, 0.7, 0.77, 1.0):
        f = flip_probability(a)
        assert (1 - f) ** 2 + f**2 == pytest.approx(a)
    with pytest.raises(HHRLHFError, match="must be in"):
        flip_probability(0.4)


@pytest.mark.parametrize("agreement", [0.63, 0.77])
def test_annotators_agree_at_the_set_rate(agreement: float) -> None:
    # scores 0.5 apart: the Bradley-Terry draw itself is far from certain
    annotators = SimulatedAnnotators(LengthJudge(), temperature=1.0, agreement=agreement)
    labels = annotators.annotate(pairs(40_000, "x" * 10, "x" * 5), seed=3, annotators=2)
    agree = float((labels[:, 0] == labels[:, 1]).mean())
    assert abs(agree - agreement) < 0.01  # s.e. about 0.0024
    again = annotators.annotate(pairs(40_000, "x" * 10, "x" * 5), seed=3, annotators=2)
    assert np.array_equal(labels, again)  # seeded: reproducible


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_noise_free_labels_follow_bradley_terry(temperature: float) -> None:
    annotators = SimulatedAnnotators(LengthJudge(), temperature=temperature, agreement=1.0)
    rows = pairs(40_000, "x" * 10, "x" * 5)  # judge scores 1.0 and 0.5
    expected = 1 / (1 + math.exp(-0.5 / temperature))
    assert annotators.probabilities(rows[:1])[0] == pytest.approx(expected)
    assert abs(float(annotators.label(rows, seed=1).mean()) - expected) < 0.01
    # with noise, P(a) = (1 - f) p + f (1 - p)
    noisy = SimulatedAnnotators(LengthJudge(), temperature=temperature, agreement=0.7)
    f = noisy.flip
    assert abs(float(noisy.label(rows, seed=2).mean())
               - ((1 - f) * expected + f * (1 - expected))) < 0.01


def test_pair_selection_rules() -> None:
    """random: two distinct samples; best_vs_random: the PM's best first; active: per prompt
    the pair nearest P = 1/2, the least sure prompts first; the label cost is k pairs."""
    from hhrlhf.online.loop import select_pairs
    from hhrlhf.records import Turn

    prompts = [Dialogue((Turn("human", f"q{i}"),)) for i in range(3)]

    def turns(*lengths: int) -> list[Turn]:
        return [Turn("assistant", "x" * n) for n in lengths]

    groups = [turns(30, 30, 10, 52), turns(5, 40, 80, 20), turns(7, 7, 7, 7)]
    rng = np.random.default_rng(0)
    judge = LengthJudge()
    rand = select_pairs("random", prompts, groups, judge, 5, rng)
    assert [(len(c.chosen), len(c.rejected)) for c in rand] == [(30, 10), (5, 40)]
    best = select_pairs("best_vs_random", prompts, groups, judge, 5, rng)
    assert [len(c.chosen) for c in best] == [52, 80] and len(best) == 2
    active = select_pairs("active", prompts, groups, judge, 1, rng)
    # prompt 0's closest distinct pair is 30 vs 10 (scores 2.0 apart); prompt 1's 5 vs 20 (1.5)
    assert [(len(active[0].chosen), len(active[0].rejected))] == [(5, 20)]
    assert len(select_pairs("active", prompts, groups, judge, 5, rng)) == 2


def test_pm_warm_start_begins_from_the_previous_weights(real_file: Path) -> None:
    """pm_init: warm starts the PM's solver from the previous round's weights, scratch from
    zeros. With one solver iteration the warm model is still near the previous one, the
    scratch one near zero; run to convergence (a convex fit) both reach the same model, the
    warm one in fewer iterations."""
    from hhrlhf.pm.lexical import LexicalConfig, LexicalPreferenceModel
    from hhrlhf.read import read_comparisons

    rows = [c for c in read_comparisons([real_file]) if c.chosen != c.rejected][:300]
    previous = LexicalPreferenceModel.fit(rows[:200])
    one = LexicalConfig(max_iter=1)
    warm = LexicalPreferenceModel.fit(rows, one, init=previous.weights)
    scratch = LexicalPreferenceModel.fit(rows, one)

    def dist(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b))

    assert dist(warm.weights, previous.weights) < 0.5 * dist(scratch.weights, previous.weights)
    assert dist(scratch.weights, np.zeros_like(scratch.weights)) < dist(
        warm.weights, np.zeros_like(warm.weights))
    warm_all = LexicalPreferenceModel.fit(rows, init=previous.weights)
    scratch_all = LexicalPreferenceModel.fit(rows)
    assert warm_all.info["converged"] and scratch_all.info["converged"]
    assert warm_all.info["iterations"] < scratch_all.info["iterations"]
    # both at the one optimum (lbfgs stops within its tolerance of it)
    sa, sb = warm_all.score_pairs(rows[:50]), scratch_all.score_pairs(rows[:50])
    assert np.allclose(sa[0] - sa[1], sb[0] - sb[1], atol=0.05)
    with pytest.raises(HHRLHFError, match="starting weights"):
        LexicalPreferenceModel.fit(rows, one, init=np.zeros(3))


# -- the loop ---------------------------------------------------------------------------------
def loop_args(real_file: Path, out: Path, quiet: bool = True) -> list[str]:
    sets = {"max_rows": 240, "rounds": 2, "pairs_per_round": 8, "bon_prompts": 16, "bon_n": 4,
            "eval_prompts": 12, "tiny_vocab_size": 600, "tiny_hidden_size": 32,
            "max_new_tokens": 12, "max_prompt_length": 96, "max_length": 128, "epochs": 3,
            "save_every": 2, "bootstrap": 100, "threads": 1}
    args = [str(real_file), "--out", str(out)] + (["-q"] if quiet else [])
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def preference_rows(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def whole(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny rounds, never stopped (a real subprocess, as the killed one is)."""
    out = tmp_path_factory.mktemp("online") / "whole"
    proc = subprocess.run([HHRLHF, "online", *loop_args(real_file, out)], env=ENV,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


def test_two_rounds_end_to_end(whole: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    for r in range(3):
        assert (whole / f"round-{r:02d}" / "result.json").is_file()
        assert (whole / f"round-{r:02d}" / "pm" / "hhrlhf_pm.json").is_file()
        assert (whole / f"round-{r:02d}" / "policy" / "model" / "config.json").is_file()
    total = 0
    for r in (1, 2):
        folder = whole / f"round-{r:02d}"
        rows = preference_rows(folder / "comparisons.jsonl.gz")
        assert len(rows) == 8 and all(set(row) == {"chosen", "rejected"} for row in rows)
        for row in rows:  # the official format: the same prompt, one final Assistant turn each
            c = Comparison.from_strings(row["chosen"], row["rejected"])
            assert "context_mismatch" not in c.flags and c.chosen != c.rejected
        result = json.loads((folder / "result.json").read_text())
        total += result["labels"]
        assert result["labels"] == 8 and result["labels_total"] == total
        for key in ("vs_round0", "vs_previous"):
            v = result[key]
            assert v["prompts"] == 12 and v["win_interval"]["low"] <= v["win_rate"] \
                <= v["win_interval"]["high"]
        assert 0 <= result["pm"]["accuracy"] <= 1 and "accuracy_top_decile" in result["pm"]
        assert [p["n"] for p in result["bon_curve"]] == [1, 2, 4]
        info = json.loads((folder / "pm" / "hhrlhf_pm.json").read_text())["info"]
        assert info["labels"] == total and info["init"] == "scratch"
    code, out, err = run_cli(["online", "report", str(whole)], capsys, monkeypatch)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["round", "labels"]
    # the rounds' table, then each policy step's reward against sqrt(KL), then the PNG
    assert len(lines) == 1 + 3 + 2 + 2 + 1
    assert lines[4] == "policy step, PM reward against sqrt(KL):"
    for r, line in zip((1, 2), lines[6:8]):
        curve = json.loads((whole / f"round-{r:02d}" / "result.json").read_text())["bon_curve"]
        words = line.split()
        assert words[:3] == [str(r), "best-of-n", "3"]
        assert float(words[3]) == pytest.approx(math.sqrt(curve[-1]["kl"]), abs=1e-3)
    assert (whole / "online.png").stat().st_size > 10_000


def test_kill9_mid_round_resumes_to_the_same_files(whole: Path, real_file: Path,
                                                   tmp_path: Path) -> None:
    """Killed (SIGKILL) inside round 1's policy step, after a checkpoint, and resumed: the
    rounds' preference files and results equal those of the loop never stopped."""
    cut = tmp_path / "cut"
    proc = subprocess.Popen([HHRLHF, "online", *loop_args(real_file, cut)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = cut / "round-01" / "policy" / "checkpoints"
    deadline = time.time() + 400
    while not any(checkpoints.glob("step-*")) and proc.poll() is None and \
            time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cut / "round-01" / "result.json").exists(), "round 1 ended before the kill"
    proc2 = subprocess.run([HHRLHF, "online", "--out", str(cut), "--resume", "-q"], env=ENV,
                           capture_output=True, text=True, timeout=600, check=False)
    assert proc2.returncode == 0, proc2.stderr
    for r in (1, 2):
        name = f"round-{r:02d}"
        assert preference_rows(cut / name / "comparisons.jsonl.gz") == \
            preference_rows(whole / name / "comparisons.jsonl.gz")
        assert preference_rows(cut / name / "distill.jsonl.gz") == \
            preference_rows(whole / name / "distill.jsonl.gz")
    for r in (0, 1, 2):
        name = f"round-{r:02d}/result.json"
        assert json.loads((cut / name).read_text()) == json.loads((whole / name).read_text())


def test_rloo_round_with_active_pairs(real_file: Path, tmp_path: Path) -> None:
    """One round of RLOO against the PM, its pairs chosen actively: labels at the set cost,
    the policy step's reward against sqrt(KL) recorded."""
    from hhrlhf.online.loop import OnlineConfig, run_online
    from hhrlhf.runs import apply_overrides

    config = OnlineConfig(data=[str(real_file)], max_rows=240, rounds=1, pairs_per_round=6,
                          pairs="active", method="rloo", bon_prompts=8, rl_samples=2,
                          eval_prompts=8, tiny_vocab_size=600, tiny_hidden_size=32,
                          max_new_tokens=12, max_prompt_length=96, max_length=128,
                          batch_size=4, bootstrap=50, progress=False, out_dir=str(tmp_path / "r"))
    config = apply_overrides(config, {"save_every": "0"})
    result = run_online(config)[-1]
    assert result["labels"] == 6 and result["collect"]["pairs"] == "active"
    assert result["collect"]["prompts_sampled"] > 6 * 4 - 1  # active_pool prompts per label
    assert len(result["rl_curve"]) == 2 and {"kl", "reward", "step"} <= set(result["rl_curve"][0])
    assert result["rl_fit"] is None or result["rl_fit"]["points"] == 2


def test_dpo_round_records_reward_vs_sqrt_kl(real_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A DPO round measures its policy step's two ends: the previous policy at KL 0 and the
    DPO policy at its KL to it, each scored by the round's PM; the report prints and draws it."""
    from hhrlhf.online.loop import OnlineConfig, run_online, sample_turns
    from hhrlhf.pm.base import load
    from hhrlhf.runs import apply_overrides

    out = tmp_path / "d"
    config = OnlineConfig(data=[str(real_file)], max_rows=160, rounds=1, pairs_per_round=8,
                          method="dpo", lr=3e-3, epochs=4, eval_prompts=8, tiny_vocab_size=600,
                          tiny_hidden_size=32, max_new_tokens=12, max_prompt_length=96,
                          max_length=128, batch_size=4, bootstrap=50, progress=False,
                          out_dir=str(out))
    config = apply_overrides(config, {"save_every": "0"})
    result = run_online(config)[-1]
    start, end = result["dpo_curve"]
    steps = json.loads((out / "round-01" / "policy" / "result.json").read_text())["steps"]
    assert (start["step"], start["kl"]) == (0, 0.0) and end["step"] == steps > 0
    assert end["kl"] > 0  # sampled from the new policy: the policy moved
    assert result["dpo_fit"]["points"] == 2
    # the start is the previous policy's answers scored by the round's PM
    loop_prompts = run_online.__globals__["Loop"](config.validate(), out).folds.eval_prompts
    turns = sample_turns(out / "round-00" / "policy" / "model", loop_prompts, 1, config,
                         config.seed * 1_000_003 + 101 + 10)
    pm = load(out / "round-01" / "pm")
    assert start["reward"] == pytest.approx(float(np.mean(pm.score(
        [Dialogue(p.turns + (t[0],), p.preamble) for p, t in zip(loop_prompts, turns)]))))
    code, text, err = run_cli(["online", "report", str(out)], capsys, monkeypatch)
    assert code == 0, err
    line = text.splitlines()[-2].split()
    assert line[:3] == ["1", "dpo", "2"]
    assert float(line[3]) == pytest.approx(math.sqrt(end["kl"]), abs=1e-3)


@pytest.mark.parametrize(("setting", "message"), [
    ("pairs=best", "config pairs='best': must be one of random, best_vs_random, active"),
    ("annotator_agreement=0.4", "config annotator_agreement=0.4: must be in [0.5, 1]"),
    ("labels=collect pairs=active", "config pairs='active': applies to simulated labels only"),
    ("labels=collect collect_task=redteam",
     "config collect_task='redteam': must be one of helpful, harmless"),
    ("pm_init=cold", "config pm_init='cold': must be one of scratch, warm"),
    ("rounds=0", "config rounds=0: must be at least 1"),
    ("annotator_temperature=0", "config annotator_temperature=0.0: must be positive"),
    ("pairs_per_roundz=3", "unknown config key 'pairs_per_roundz'; did you mean"),
])
def test_bad_settings_are_one_line(setting: str, message: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sets = [a for s in setting.split() for a in ("--set", s)]
    code, _, err = run_cli(["online", "harmless-base/test", "--out", str(tmp_path / "x"),
                            *sets], capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_unusable_collect_db_is_one_line_before_round_0(real_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    code, _, err = run_cli(["online", str(real_file), "--out", str(tmp_path / "x"), "--set",
                            "labels=collect", "--set", f"collect_db={folder}"], capsys,
                           monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"config collect_db='{folder}'" in err and "is a directory" in err
    assert not (tmp_path / "x").exists()


def test_resume_without_a_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(["online", "--out", str(tmp_path), "--resume"], capsys, monkeypatch)
    assert code == 2 and "no run to resume here" in err and len(err.strip().splitlines()) == 1


def test_resume_may_change_rounds_only(whole: Path, real_file: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(whole, copy)
    code, _, err = run_cli(["online", "--out", str(copy), "--resume", "--set", "pairs=active"],
                           capsys, monkeypatch)
    assert code == 2 and "these differ: pairs" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["online", str(real_file), "--out", str(copy)], capsys,
                           monkeypatch)
    assert code == 2 and "holds an online run already" in err
    # every round done: going on "for 2 rounds" reads them back and trains nothing
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    code, out, err = run_cli(["online", "--out", str(copy), "--resume", "-q", "--rounds", "2"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert len(out.splitlines()) == 1 + 3 + 1
    after = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    changed = [p.name for p in after if before.get(p) != after[p]]
    assert changed == ["config.json"], changed


# -- human mode: people through the collect app ------------------------------------------------
def wait_for(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.1)


def server_down(base: str, timeout: float = 60) -> bool:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            httpx.get(base + "/healthz", timeout=2)
        except httpx.TransportError:
            return True
        time.sleep(0.2)
    return False


def final_pair(row: dict[str, str]) -> tuple[str, str, str]:
    c = Comparison.from_strings(row["chosen"], row["rejected"])
    assert "context_mismatch" not in c.flags
    return c.prompt[-1].text, c.chosen, c.rejected


def test_human_mode_rounds_come_from_people(real_file: Path, tmp_path: Path) -> None:
    """labels=collect: the round's policy is deployed in the collect app (a real `hhrlhf
    collect serve` child of the loop, real HTTP, real SQLite), an annotator invited once
    works through the HTTP API, and the round ends with exactly the comparisons made for it
    (not one made before the loop), trains on them and goes on to its evaluation. The loop is
    killed with SIGKILL while it waits (its server goes with it) and resumed: the server is
    back at the same address, the invite's session still works, what was collected counts."""
    from collect_support import annotator, converse, join, judged_turn, wait_up
    from web_support import free_port

    from hhrlhf.collect.store import open_store

    db, out, port = tmp_path / "feedback.sqlite", tmp_path / "human", free_port()
    base = f"http://127.0.0.1:{port}"
    store = open_store(db)
    converse(store, annotator(store, "before"), "helpful", ["Made before the loop"])
    ada_id, token = store.add_annotator("ada")  # invited once, before the loop
    store.close()
    sets = {"labels": "collect", "collect_db": db, "collect_port": port, "pairs_per_round": 2,
            "collect_poll": 0.2, "collect_overlap": 0, "pm_init": "warm", "rounds": 1,
            "max_rows": 160, "eval_prompts": 8, "bon_prompts": 8}
    args = loop_args(real_file, out, quiet=False)
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    log1, log2 = tmp_path / "loop1.log", tmp_path / "loop2.log"
    with open(log1, "wb") as f:
        proc = subprocess.Popen([HHRLHF, "online", *args], env=ENV, stdout=f, stderr=f)
    try:
        wait_for(out / "round-01" / "deploy.json", proc, log1)
        wait_up(base)
        client, csrf = join(base, f"/join/{token}")
        assert client.post("/consent", data={"csrf": csrf}).status_code == 303
        client.headers["x-csrf-token"] = csrf
        cid, first = judged_turn(client, None, 0, "How do I brew tea?", "right")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert "online: round 1: 0/2 comparisons" in log1.read_text()
    assert not (out / "round-01" / "comparisons.jsonl.gz").exists()
    assert server_down(base), "the collect server outlived the killed loop"
    with open(log2, "wb") as f:
        proc = subprocess.Popen([HHRLHF, "online", "--out", str(out), "--resume"], env=ENV,
                                stdout=f, stderr=f)
    try:
        wait_up(base)
        _, second = judged_turn(client, cid, 2, "And with milk?", "left")
        assert proc.wait(timeout=400) == 0, log2.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    said = log2.read_text()
    # resumed, it counts what was collected before the kill
    assert "online: round 1: 1/2 comparisons" in said and "round 1: 2/2 comparisons" in said
    assert server_down(base, timeout=1), "the collect server outlived its round"
    folder = out / "round-01"
    rows = preference_rows(folder / "comparisons.jsonl.gz")
    assert [final_pair(row) for row in rows] == [
        ("How do I brew tea?", first["right"], first["left"]),
        ("And with milk?", second["left"], second["right"])]
    side = [json.loads(line) for line in
            (folder / "comparisons.side.jsonl").read_text().splitlines()]
    assert [s["index"] for s in side] == [0, 1] and {s["annotator_id"] for s in side} == {ada_id}
    deploy = json.loads((folder / "deploy.json").read_text())
    assert Path(deploy["policy"]) == (out / "round-00" / "policy" / "model").resolve()
    result = json.loads((folder / "result.json").read_text())
    assert result["labels"] == 2 and result["labels_total"] == 2
    assert result["collect"]["source"] == "collect" and result["collect"]["annotators"] == 1
    assert result["vs_round0"]["prompts"] == 8
    # the PM: fitted on the round's labels (never the row made before the loop), warm
    info = json.loads((folder / "pm" / "hhrlhf_pm.json").read_text())["info"]
    assert info["labels"] == 2 and info["init"] == "round-00"
    assert (folder / "policy" / "model" / "config.json").is_file()
