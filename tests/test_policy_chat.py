"""Policies in and out: a base model without a chat template (the HH text format), ChatML and
Llama-3 style templates (dialogues rendered with the model's own template): the loss mask covers
exactly the assistant replies, SFT and DPO run, samples stop at the template's end of turn, and
a trained policy loads and generates in plain transformers.

Tiny models and byte-level BPE tokenizers are built here from a few rows of the real file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from policy_support import (
    first_rows,
    one_thread,  # noqa: F401  # autouse
    run_cli,
)

from hhrlhf.errors import HHRLHFError
from hhrlhf.policy import HH_CHAT_TEMPLATE, ChatFormat, Policy
from hhrlhf.policy.encode import PolicyEncoder
from hhrlhf.records import Dialogue

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
          "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
# kind -> (special tokens, the first being the end of a reply; eos; bos; chat template)
KINDS = {
    "none": (["<|endoftext|>"], "<|endoftext|>", None, None),
    "chatml": (["<|im_end|>", "<|endoftext|>", "<|im_start|>"], "<|endoftext|>", None, CHATML),
    "llama3": (["<|eot_id|>", "<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>"], "<|end_of_text|>", "<|begin_of_text|>", LLAMA3),
}
DIALOGUE = Dialogue.parse("\n\nHuman: Hi there\n\nAssistant: Hello, friend.\n\nHuman: Bye"
                          "\n\nAssistant: Goodbye!")
MESSAGES = [{"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello, friend."},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}]


def make_policy(kind: str, texts: list[str], out: Path) -> Path:
    """A tiny causal LM folder: GPT-2 for a base model without a template, else Llama-shaped,
    with a byte-level BPE tokenizer whose special tokens are those of the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    specials, eos, bos, template = KINDS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos,
                                   model_max_length=1 << 30)
    fast.chat_template = template
    torch.manual_seed(0)
    if kind == "none":
        net = GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_embd=32, n_layer=2, n_head=2,
                                         n_positions=256, eos_token_id=fast.eos_token_id,
                                         bos_token_id=fast.eos_token_id))
    else:
        net = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
            eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id))
    net.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rows(real_file: Path) -> list:
    return first_rows(real_file, 60)


@pytest.fixture(scope="module")
def folders(rows: list, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    texts = [c.chosen_raw for c in rows] + [m["content"] for m in MESSAGES]
    return {kind: make_policy(kind, texts, root / kind) for kind in KINDS}


@pytest.mark.parametrize(("kind", "trained", "whole"), [
    ("none", " Hello, friend. Goodbye!<|endoftext|>", DIALOGUE.render() + "<|endoftext|>"),
    ("chatml", "Hello, friend.<|im_end|>Goodbye!<|im_end|>", None),
    ("llama3", "Hello, friend.<|eot_id|>Goodbye!<|eot_id|>", None),
])
def test_the_loss_covers_exactly_the_assistant_replies(folders: dict[str, Path], kind: str,
                                                       trained: str, whole: str | None) -> None:
    policy = Policy.load(folders[kind])
    tok = policy.tokenizer
    if whole is None:  # the template's own rendering; nothing written after the final reply
        whole = tok.apply_chat_template(MESSAGES, tokenize=False).rstrip("\n")
    rows = PolicyEncoder(tok, 200).encode_sft([DIALOGUE])
    ids, loss = rows.ids[0], rows.loss[0]
    assert tok.decode(ids[loss]) == trained
    assert tok.decode(ids) == whole
    # a prompt ends with the generation prompt, and prompt + reply is the rendering
    prompts, _ = PolicyEncoder(tok, 200).encode_prompts([DIALOGUE], 150)
    head = tok.apply_chat_template(MESSAGES[:3], tokenize=False, add_generation_prompt=True)
    assert tok.decode(prompts[0]) == head


def test_a_base_model_trains_in_the_hh_format_and_loads_in_plain_transformers(
        folders: dict[str, Path], real_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 without a chat template: one note, the HH text format, and the run's policy has
    the HH template, so plain transformers prompts it with apply_chat_template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    code, _, err = run_cli(["sft", str(real_file), "--policy", str(folders["none"]), "--out",
                            str(out), "-q", "--max-steps", "2", "--batch-size", "4",
                            "--max-length", "96", "--set", "max_rows=8"], capsys, monkeypatch)
    assert code == 0, err
    notes = [x for x in err.splitlines() if "no chat template" in x]
    want = (f"hhrlhf: note: {folders['none']} has no chat template; using the HH text format "
            '("\\n\\nHuman: ... \\n\\nAssistant: ...")')
    assert notes == [want]
    net = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.chat_template == HH_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    assert tok.decode(ids[0]) == "\n\nHuman: How do I bake bread?\n\nAssistant:"
    new = net.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert new.shape[1] > ids.shape[1]


@pytest.mark.parametrize("kind", ["chatml", "llama3"])
def test_sft_runs_and_samples_stop_at_the_end_of_turn(folders: dict[str, Path], rows: list,
                                                     kind: str, tmp_path: Path) -> None:
    from hhrlhf.policy.sample import Sampler
    from hhrlhf.policy.sft import SFTConfig, train_sft

    result = train_sft(SFTConfig(policy=str(folders[kind]), out_dir=str(tmp_path / "run"),
                                 max_steps=2, batch_size=4, max_length=96, progress=False,
                                 threads=1), rows[:8])
    assert np.isfinite(result.metrics["train_loss"])
    saved = Policy.load(tmp_path / "run" / "model")
    assert saved.tokenizer.chat_template == KINDS[kind][3]  # the model's own template kept
    end = saved.tokenizer.convert_tokens_to_ids(KINDS[kind][0][0])
    assert ChatFormat(saved.tokenizer).end_ids == [end] and end != saved.eos_id
    # a flat output layer: every token equally likely, so the end of turn comes up by chance
    with torch.no_grad():
        saved.net.lm_head.weight.zero_()
    prompts, _ = PolicyEncoder(saved.tokenizer, 96).encode_prompts([DIALOGUE], 60)
    samples = Sampler(saved.net, saved.tokenizer).sample(prompts, n=32, max_new_tokens=30,
                                                         seed=3)
    stopped = [s for s in samples if s.stop == "eos"]
    assert any(s.tokens[-1] == end for s in stopped)
    for s in samples:
        inner = s.tokens[:-1] if s.stop == "eos" else s.tokens
        assert end not in inner and saved.eos_id not in inner
        assert s.stop == "eos" or len(s.tokens) == 30
        assert s.text.startswith(" ")  # read as an HH response, as bon, rl and PMs read it


def test_dpo_runs_on_a_chatml_policy(folders: dict[str, Path], rows: list) -> None:
    from hhrlhf.policy.dpo import DPOConfig, train_dpo

    policy = Policy.load(folders["chatml"])
    end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pairs = PolicyEncoder(policy.tokenizer, 128).encode_pairs(rows[:8], ["identical_responses"])
    ends = [r[-1] == end for rs in pairs.responses for r in rs]  # but a response cut short
    assert any(ends) and sum(ends) >= len(ends) - 2 * pairs.truncated_response
    header = policy.tokenizer.encode("<|im_start|>assistant\n")
    assert all(list(p[-len(header):]) == header for p in pairs.prompts)
    result = train_dpo(DPOConfig(policy=str(folders["chatml"]), out_dir="", max_steps=2,
                                 batch_size=4, max_length=128, progress=False, threads=1,
                                 kl_prompts=0), rows[:8])
    first = result.history[0]
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-5)  # the policy is its reference
    assert result.metrics["train_pairs"] == len(pairs)


def test_hh_format_on_a_template_model_and_unsplittable_templates(
        folders: dict[str, Path], rows: list, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from hhrlhf.policy.sft import SFTConfig, train_sft

    # chat_format=hh: the HH text, and the HH template saved with the run's policy
    policy = Policy.load(folders["chatml"], chat_format="hh")
    assert policy.tokenizer.chat_template == HH_CHAT_TEMPLATE
    assert ChatFormat(policy.tokenizer).hh
    train_sft(SFTConfig(policy=str(folders["chatml"]), chat_format="hh", max_steps=1,
                        batch_size=2, max_length=64, progress=False, threads=1,
                        out_dir=str(tmp_path / "run")), rows[:2])
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "model").chat_template == \
        HH_CHAT_TEMPLATE
    with pytest.raises(HHRLHFError, match="has no chat template"):
        Policy.load(folders["none"], chat_format="template")
    # a template whose rendering of a dialogue's start is not the start of the whole: refused
    tok = AutoTokenizer.from_pretrained(folders["chatml"])
    tok.chat_template = "{{ messages | length }}" + CHATML
    with pytest.raises(HHRLHFError, match="turns cannot be told apart"):
        ChatFormat(tok, "folder")


def test_rl_runs_on_a_llama3_policy(folders: dict[str, Path], rows: list) -> None:
    """RL samples under the template and its PM reads HH dialogues: each sample one Assistant
    turn after the prompt, with the HH separator."""
    from test_rl_train import VowelShare

    from hhrlhf.rl.train import RLConfig, train_rl

    seen: list[Dialogue] = []

    class Recording(VowelShare):
        def score(self, dialogues: Any, batch_size: int = 32) -> np.ndarray:
            seen.extend(dialogues)
            return super().score(dialogues, batch_size)

    prompts = [Dialogue(c.prompt, c.chosen_dialogue.preamble) for c in rows[:4]]
    config = RLConfig(policy=str(folders["llama3"]), pm="(in memory)", batch_size=2,
                      samples_per_prompt=2, max_new_tokens=6, max_length=128, max_steps=1,
                      out_dir="", progress=False)
    result = train_rl(config, pm=Recording(), prompts=prompts)
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert len(seen) == 4
    for d in seen:
        assert d.turns[-1].role == "assistant" and d.turns[-1].sep == " "
        assert d.turns[:-1] in [p.turns for p in prompts]
