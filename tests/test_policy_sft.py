"""SFT: the assistant-only loss mask, keep-end truncation, resume after kill -9, one-line errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_support import (
    ENV,
    TINY,
    build_tiny,
    first_rows,
    one_thread,  # noqa: F401  # autouse
    run_cli,
)

from hhrlhf.policy import Policy
from hhrlhf.policy.encode import PolicyEncoder
from hhrlhf.records import Dialogue


@pytest.fixture(scope="module")
def tiny(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Policy:
    return build_tiny(first_rows(real_file, 300), tmp_path_factory.mktemp("p") / "tiny")


def test_tiny_policy_is_an_ordinary_transformers_folder(tiny: Policy, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny.save(tmp_path / "p")
    net = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    tok = AutoTokenizer.from_pretrained(tmp_path / "p")
    assert net.config.model_type == "llama"
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "\n\nHuman: Hi\n\nAssistant: Hello."
    text = "\n\nHuman: What is the capital of France?\n\nAssistant: Paris."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_the_loss_covers_assistant_tokens_only(tiny: Policy) -> None:
    enc = PolicyEncoder(tiny.tokenizer, 512)
    d = Dialogue.parse("\n\nHuman: Hi there\n\nAssistant: Hello, friend.\n\nHuman: Bye"
                       "\n\nAssistant: Goodbye!")
    rows = enc.encode_sft([d])
    ids, loss = rows.ids[0], rows.loss[0]
    tok = tiny.tokenizer
    trained = tok.decode(ids[loss])
    assert trained == " Hello, friend. Goodbye!" + tok.eos_token
    assert tok.decode(ids[~loss]) == "\n\nHuman: Hi there\n\nAssistant:\n\nHuman: Bye\n\nAssistant:"
    assert tok.decode(ids[:-1]) == d.render()  # the row is the dialogue, then EOS


def test_truncation_keeps_the_end(tiny: Policy) -> None:
    enc = PolicyEncoder(tiny.tokenizer, 40)
    long_ctx = " ".join(["word"] * 80)
    d = Dialogue.parse(f"\n\nHuman: {long_ctx}\n\nAssistant: ok\n\nHuman: why\n\nAssistant: because")
    rows = enc.encode_sft([d])
    assert len(rows.ids[0]) == 40 and rows.context_cut == 1 and rows.truncated_response == 0
    assert tiny.tokenizer.decode(rows.ids[0]).endswith(
        "ok\n\nHuman: why\n\nAssistant: because" + tiny.tokenizer.eos_token)
    # a final response longer than max_length keeps its start, counted
    d2 = Dialogue.parse(f"\n\nHuman: hi\n\nAssistant: {long_ctx}")
    rows = enc.encode_sft([d2])
    assert rows.truncated_response == 1
    assert tiny.tokenizer.decode(rows.ids[0]).startswith("\n\nAssistant: word word")


def test_sft_learns_and_evaluates(tiny: Policy, real_file: Path, tmp_path: Path) -> None:
    from hhrlhf.policy.sft import SFTConfig, train_sft

    tiny.save(tmp_path / "start")
    rows = first_rows(real_file, 120)
    cfg = SFTConfig(policy=str(tmp_path / "start"), out_dir="", max_steps=25, batch_size=8,
                    lr=3e-3, max_length=128, progress=False, warmup_ratio=0.0, holdout_folds=4,
                    threads=1)
    result = train_sft(cfg, rows)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.5
    m = result.metrics
    assert m["eval_perplexity"] == pytest.approx(np.exp(m["eval_loss"]))
    assert m["eval_loss"] < losses[0]
    assert m["train_rows"] + m["eval_rows"] == 120 - m["skipped_rows"]


def test_resume_after_sigkill_ends_with_the_same_weights(real_file: Path, tmp_path: Path
                                                          ) -> None:
    args = [sys.executable, "-m", "hhrlhf.cli", "sft", str(real_file), "--init", "tiny",
            "--max-steps", "16", "--max-rows", "120", "--batch-size", "4", "--max-length", "64",
            "--lr", "1e-3", "-q", "--set", "holdout_folds=5", "--set", "eval_every=6",
            "--set", "save_every=4", "--set", "weight_decay=0.01", "--set", "threads=1",
            *[f"--set=tiny_{k}={v}" for k, v in (("vocab_size", TINY.vocab_size),
                                                 ("hidden_size", 32), ("layers", 2),
                                                 ("heads", 2))]]
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
    again = subprocess.run(args + ["--out", str(b)], env=ENV, capture_output=True, text=True,
                           check=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    subprocess.run(args + ["--out", str(b), "--resume"], env=ENV, check=True,
                   capture_output=True)

    def strip(path: Path) -> list[dict[str, object]]:
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("per_s")} for r in rows]

    assert strip(a / "metrics.jsonl") == strip(b / "metrics.jsonl")
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a, b))
    for key in ("seconds", "train_seconds", "tokens_per_s"):
        ra.pop(key), rb.pop(key)
    assert ra == rb and ra["steps"] == 16 and "eval_loss" in ra
    pa, pb = (Policy.load(d / "model") for d in (a, b))
    for (ka, va), (kb, vb) in zip(pa.net.state_dict().items(), pb.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_one_line_errors(tiny: Policy, real_file: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    # a folder that is not a causal LM
    BertModel(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(
        tmp_path / "bert")
    # a causal LM whose chat template cannot be split into turns (it counts the messages
    # first, so a dialogue's beginning renders differently from the whole)
    tiny.save(tmp_path / "plain")
    tiny.save(tmp_path / "good")
    tok = AutoTokenizer.from_pretrained(tmp_path / "plain")
    tok.chat_template = ("{{ messages | length }}{% for m in messages %}<|{{ m['role'] }}|>"
                         "{{ m['content'] }}{% endfor %}")
    tok.save_pretrained(tmp_path / "plain")
    cases = [
        (["--policy", str(tmp_path / "bert")], "not a causal language model (bert)"),
        (["--policy", str(tmp_path / "plain")], "turns cannot be told apart"),
        (["--init", "tiny", "--set", "lr=-1"], "config lr=-1.0: must be positive"),
        (["--init", "tiny", "--set", "nope=1"], "unknown config key 'nope'"),
        (["--init", "tiny", "--set", "chat_format=chatml"],
         "config chat_format='chatml': must be one of auto, hh, template"),
        (["--policy", str(tmp_path / "bert"), "--init", "tiny"], "exactly one of policy"),
        (["--policy", str(tmp_path / "good"), "--max-length", "600"],
         "max_length 600 exceeds the 512 positions of the policy"),
    ]
    for extra, needle in cases:
        code, _, stderr = run_cli(["sft", str(real_file), "--out", str(tmp_path / "run"), "-q",
                                   *extra], capsys, monkeypatch)
        assert code == 2, stderr
        err = [x for x in stderr.splitlines() if x.startswith("hhrlhf: error")]
        assert len(err) == 1 and needle in err[0], stderr
        assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists()  # no half-made run folder



def test_the_default_data_note_only_with_the_defaults() -> None:
    """The note that SFT defaults to the helpful subsets is given only when no sources are
    named (it would be wrong beside `hhrlhf sft harmless-base/test`); the card's warning
    always."""
    from hhrlhf.policy.sft import SFTConfig, start_note

    assert "helpful subsets" in start_note(SFTConfig())
    named = start_note(SFTConfig(data=["harmless-base/test"]))
    assert "helpful subsets" not in named and "dataset card warns" in named
