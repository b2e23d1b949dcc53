"""DPO: the loss equals the formula on full sequences; rows with differing contexts are left
out and counted; a live reference and precomputed reference log-probs agree; DPO learns."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_support import (
    build_tiny,
    first_rows,
    one_thread,  # noqa: F401  # autouse
)

from hhrlhf.errors import HHRLHFError
from hhrlhf.policy import Policy
from hhrlhf.policy.dpo import DPOConfig, train_dpo
from hhrlhf.policy.encode import PolicyEncoder
from hhrlhf.records import Comparison


@pytest.fixture(scope="module")
def folders(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo")
    rows = first_rows(real_file, 300)
    build_tiny(rows, root / "policy")
    # a reference unlike the policy: the same tokenizer, other weights
    ref = Policy.load(root / "policy")
    torch.manual_seed(1)
    for p in ref.net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    ref.save(root / "reference")
    return {"policy": root / "policy", "reference": root / "reference"}


def _full_logprob(net: torch.nn.Module, prompt: np.ndarray, response: np.ndarray) -> float:
    x = torch.from_numpy(np.concatenate([prompt, response])[None].astype(np.int64))
    with torch.no_grad():
        lp = torch.log_softmax(net(input_ids=x).logits[0].double(), -1)
    return float(lp[len(prompt) - 1: -1].gather(-1, x[0, len(prompt):, None]).sum())


@pytest.mark.parametrize(("loss", "smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2),
                                                 ("ipo", 0.0)])
def test_first_step_loss_equals_the_formula_on_full_sequences(
        folders: dict[str, Path], real_file: Path, loss: str, smoothing: float) -> None:
    rows = first_rows(real_file, 12)
    cfg = DPOConfig(policy=str(folders["policy"]), reference=str(folders["reference"]),
                    out_dir="", max_steps=1, batch_size=len(rows), max_length=160, beta=0.3,
                    loss=loss, label_smoothing=smoothing, progress=False, threads=1,
                    kl_prompts=0)
    first = train_dpo(cfg, rows).history[0]
    pol, ref = Policy.load(folders["policy"]), Policy.load(folders["reference"])
    data = PolicyEncoder(pol.tokenizer, 160).encode_pairs(rows, cfg.skip_flags)
    assert len(data) == first["pairs"]
    losses, acc = [], []
    for p, (c, r) in zip(data.prompts, data.responses):
        rc = _full_logprob(pol.net, p, c) - _full_logprob(ref.net, p, c)
        rr = _full_logprob(pol.net, p, r) - _full_logprob(ref.net, p, r)
        if loss == "ipo":
            losses.append((rc / len(c) - rr / len(r) - 1 / (2 * 0.3)) ** 2)
        else:
            m = 0.3 * (rc - rr)
            ls = math.log1p(math.exp(-m)), math.log1p(math.exp(m))  # -logsigmoid(+-m)
            losses.append((1 - smoothing) * ls[0] + smoothing * ls[1])
        acc.append(rc > rr)
    # float32 sums over ~100 tokens per response: equal to 1e-4 (the criterion)
    assert first["loss"] == pytest.approx(np.mean(losses), abs=1e-4)
    assert first["accuracy"] == pytest.approx(np.mean(acc))


def test_live_reference_equals_precomputed(folders: dict[str, Path], real_file: Path) -> None:
    rows = first_rows(real_file, 40)
    cfg = DPOConfig(policy=str(folders["policy"]), reference=str(folders["reference"]),
                    out_dir="", max_steps=3, batch_size=8, max_length=128, lr=1e-3,
                    progress=False, threads=1, holdout_folds=4, kl_prompts=4,
                    kl_max_new_tokens=8)
    a = train_dpo(cfg, rows)
    b = train_dpo(replace(cfg, precompute_reference=False), rows)
    for ra, rb in zip(a.history, b.history):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-4), k
    assert a.metrics["shared_prompt"] and a.metrics["tokens_saved"] > 0.2
    assert "eval_kl" in a.metrics and "eval_accuracy" in a.metrics


def test_rows_whose_contexts_differ_are_left_out_and_counted(folders: dict[str, Path]) -> None:
    pol = Policy.load(folders["policy"])
    good = Comparison.from_strings("\n\nHuman: hi\n\nAssistant: hello",
                                   "\n\nHuman: hi\n\nAssistant: go away")
    bad = Comparison.from_strings("\n\nHuman: hi\n\nAssistant: a\n\nHuman: b\n\nAssistant: c",
                                  "\n\nHuman: yo\n\nAssistant: a\n\nHuman: b\n\nAssistant: d")
    same = Comparison.from_strings("\n\nHuman: hi\n\nAssistant: x", "\n\nHuman: hi\n\nAssistant: x")
    data = PolicyEncoder(pol.tokenizer, 64).encode_pairs([good, bad, same],
                                                          ["identical_responses"])
    assert len(data) == 1
    assert data.left_out == {"context_mismatch": 1, "identical_responses": 1}
    tok = pol.tokenizer
    assert tok.decode(data.prompts[0]) == "\n\nHuman: hi\n\nAssistant:"
    assert [tok.decode(r) for r in data.responses[0]] == [" hello" + tok.eos_token,
                                                          " go away" + tok.eos_token]


def test_dpo_learns_a_learnable_preference(folders: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    good = ["sure, happy to help", "of course, gladly"]
    bad = ["go away", "no, figure it out"]
    rows = [Comparison.from_strings(f"\n\nHuman: q{i % 7}\n\nAssistant: {good[i % 2]}",
                                    f"\n\nHuman: q{i % 7}\n\nAssistant: {bad[rng.integers(2)]}")
            for i in range(64)]
    cfg = DPOConfig(policy=str(folders["policy"]), out_dir="", max_steps=15, batch_size=8,
                    max_length=64, lr=3e-3, beta=0.5, progress=False, threads=1,
                    warmup_ratio=0.0, kl_prompts=0)
    result = train_dpo(cfg, rows, eval_rows=rows[:16])
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = ref
    assert result.metrics["eval_accuracy"] == 1.0
    assert result.metrics["eval_margin"] > 0.5


def test_bad_config_is_one_line(folders: dict[str, Path]) -> None:
    with pytest.raises(HHRLHFError, match="label_smoothing applies to loss=sigmoid only"):
        DPOConfig(policy="x", loss="ipo", label_smoothing=0.1).validate()
    with pytest.raises(HHRLHFError, match="needs a starting policy"):
        DPOConfig().validate()


def test_a_dpo_policy_is_a_preference_model(folders: dict[str, Path], real_file: Path,
                                            tmp_path: Path) -> None:
    from hhrlhf.pm import load

    # short rows: no context is cut, by the pair's rule or the single dialogue's
    rows = [c for c in first_rows(real_file, 200) if len(c.chosen_raw + c.rejected) < 500][:24]
    cfg = DPOConfig(policy=str(folders["policy"]), out_dir=str(tmp_path / "run"), max_steps=2,
                    batch_size=8, max_length=400, lr=1e-3, beta=0.2, progress=False,
                    threads=1, kl_prompts=0, save_every=0)
    train_dpo(cfg, rows)
    pm = load(tmp_path / "run" / "model")
    assert pm.kind == "dpo"
    chosen, rejected = pm.score_pairs(rows, batch_size=8)
    # the same rewards, one dialogue at a time (full rows, no packing)
    alone = pm.score([c.chosen_dialogue for c in rows], batch_size=4)
    np.testing.assert_allclose(alone, chosen, rtol=0, atol=1e-4)
    # = beta * (log pi - log ref) on the full sequences, pi trained, ref the start
    pol, ref = Policy.load(tmp_path / "run" / "model"), Policy.load(folders["policy"])
    data = PolicyEncoder(pol.tokenizer, 400).encode_pairs(rows[:3])
    assert data.context_cut == 0
    for i, (p, (c, r)) in enumerate(zip(data.prompts, data.responses)):
        want = 0.2 * (_full_logprob(pol.net, p, c) - _full_logprob(ref.net, p, c))
        assert chosen[i] == pytest.approx(want, abs=1e-4)
    assert np.std(chosen - rejected) > 1e-4


def test_a_family_that_cannot_pack_takes_full_rows(folders: dict[str, Path], real_file: Path,
                                                   tmp_path: Path) -> None:
    """Bloom places tokens by ALiBi (their index in the row), so it is not packable: DPO reads
    it as full rows, and the loss still equals the formula."""
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    tok = AutoTokenizer.from_pretrained(folders["policy"])
    for name, seed in (("bloom", 0), ("bloom-ref", 1)):
        torch.manual_seed(seed)
        BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=2,
                                     eos_token_id=tok.eos_token_id)).save_pretrained(
            tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rows = first_rows(real_file, 6)
    cfg = DPOConfig(policy=str(tmp_path / "bloom"), reference=str(tmp_path / "bloom-ref"),
                    out_dir="", max_steps=1, batch_size=len(rows), max_length=96, beta=0.3,
                    progress=False, threads=1, kl_prompts=0)
    result = train_dpo(cfg, rows)
    assert result.metrics["shared_prompt"] is False
    assert "bloom is not among the families" in result.metrics["shared_prompt_off"]
    pol, ref = Policy.load(tmp_path / "bloom"), Policy.load(tmp_path / "bloom-ref")
    data = PolicyEncoder(pol.tokenizer, 96).encode_pairs(rows, cfg.skip_flags)
    losses = []
    for p, (c, r) in zip(data.prompts, data.responses):
        m = 0.3 * ((_full_logprob(pol.net, p, c) - _full_logprob(ref.net, p, c))
                   - (_full_logprob(pol.net, p, r) - _full_logprob(ref.net, p, r)))
        losses.append(math.log1p(math.exp(-m)))
    assert result.history[0]["loss"] == pytest.approx(np.mean(losses), abs=1e-4)


def test_resume_takes_the_saved_configuration(tmp_path: Path, real_file: Path) -> None:
    """`hhrlhf dpo --out RUN --resume` alone continues RUN with its saved settings (no --policy
    needed); a setting that changes what the run computes is refused, one that does not is
    taken."""
    import subprocess

    from policy_support import ENV

    from hhrlhf.runs import resolve_config, write_json

    run = tmp_path / "run"
    gone = tmp_path / "gone-policy"
    write_json(run / "config.json", DPOConfig(policy=str(gone), data=[str(real_file)],
                                              out_dir=str(run), beta=0.3).to_dict())
    cfg = resolve_config(DPOConfig, None, {"out_dir": str(run), "progress": False}, resume=True)
    assert (cfg.policy, cfg.beta, cfg.progress) == (str(gone), 0.3, False)
    moved = tmp_path / "moved"
    run.rename(moved)  # a moved run resumes where it is now
    cfg = resolve_config(DPOConfig, None, {"out_dir": f"{moved}/"}, resume=True)
    assert (cfg.out_dir, cfg.policy) == (f"{moved}/", str(gone))
    moved.rename(run)
    with pytest.raises(HHRLHFError, match="these differ: beta"):
        resolve_config(DPOConfig, None, {"out_dir": str(run), "beta": 0.5}, resume=True)
    # the command checks the saved policy (gone here) instead of asking for one
    proc = subprocess.run([str(Path(".venv/bin/hhrlhf").resolve()), "dpo", "--out", str(run),
                           "--resume", "-q"], capture_output=True, text=True, env=ENV,
                          timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"hhrlhf: error: {gone}: no such backbone folder"


def test_a_policy_equal_to_its_reference_wins_no_pair(folders: dict[str, Path],
                                                      real_file: Path, tmp_path: Path) -> None:
    """A reference equal to the policy up to float rounding (weights off by ~1e-6 relative,
    as a reference pass in other kernels or precision is; on a GPU the precomputed reference
    itself is): every margin is a tie, and ties are not wins, so the reward accuracy is 0, not
    a share of the rounding noise."""
    ref = Policy.load(folders["policy"])
    torch.manual_seed(2)
    for p in ref.net.parameters():
        p.data.mul_(1 + 1e-6 * torch.randn_like(p))
    ref.save(tmp_path / "rounded")
    rows = first_rows(real_file, 16)
    cfg = DPOConfig(policy=str(folders["policy"]), reference=str(tmp_path / "rounded"),
                    out_dir="", max_steps=1, batch_size=16, max_length=160, progress=False,
                    threads=1, kl_prompts=0)
    first = train_dpo(cfg, rows).history[0]
    assert first["pairs"] > 8 and first["margin"] != 0  # the rounding noise is there
    assert first["accuracy"] == 0.0


def test_the_reference_pass_shows_progress(folders: dict[str, Path], real_file: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """DPO's reference pre-pass (about an epoch of forward passes) is not silent: a bar over
    the pairs, unless progress is off."""
    rows = first_rows(real_file, 6)
    def config(progress: bool) -> DPOConfig:
        return DPOConfig(policy=str(folders["policy"]), reference=str(folders["reference"]),
                         out_dir="", max_steps=1, batch_size=6, max_length=96, threads=1,
                         kl_prompts=0, progress=progress)

    train_dpo(config(True), rows)
    assert "reference log-probs" in capsys.readouterr().err
    train_dpo(config(False), rows)
    assert "reference log-probs" not in capsys.readouterr().err
