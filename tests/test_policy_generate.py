"""Sampling: shared-prefill greedy equals HF generate; N samples per prompt; the command's
JSON Lines are read by `hhrlhf pm score` and the data layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_support import (
    build_tiny,
    first_rows,
    one_thread,  # noqa: F401  # autouse
    run_cli,
)

from hhrlhf.policy import Policy
from hhrlhf.policy.encode import PolicyEncoder
from hhrlhf.policy.sample import Sampler, draw, filter_logits
from hhrlhf.records import Dialogue


@pytest.fixture(scope="module")
def tiny(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Policy, Path]:
    folder = tmp_path_factory.mktemp("gen") / "tiny"
    policy = build_tiny(first_rows(real_file, 300), folder)
    # an LM head of its own (random, untied): with tied random weights greedy decoding
    # repeats one token, which would test little
    torch.manual_seed(3)
    net = policy.net
    net.config.tie_word_embeddings = False
    net.lm_head.weight = torch.nn.Parameter(torch.randn_like(net.lm_head.weight))
    policy.save(folder)
    return policy, folder


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefill_greedy_equals_hf_generate(tiny: tuple[Policy, Path], real_file: Path,
                                                  attn: str) -> None:
    policy = Policy.load(tiny[1], attn_implementation=attn)
    rows = first_rows(real_file, 5)
    prompts, _ = PolicyEncoder(policy.tokenizer, 256).encode_prompts(
        [c.chosen_dialogue for c in rows], 200)
    assert len({len(p) for p in prompts}) > 2  # different lengths: left padding is exercised
    samples = Sampler(policy.net, policy.tokenizer).sample(prompts, n=3, max_new_tokens=24,
                                                           temperature=0, batch_size=9)
    assert [(s.prompt_index, s.sample_index) for s in samples] == [
        (i, k) for i in range(5) for k in range(3)]
    for i, p in enumerate(prompts):
        ours = [s.tokens for s in samples[3 * i: 3 * i + 3]]
        assert ours[0] == ours[1] == ours[2]
        hf = policy.net.generate(torch.from_numpy(p[None].astype(np.int64)), do_sample=False,
                                 max_new_tokens=24, eos_token_id=policy.eos_id,
                                 pad_token_id=policy.pad_id)[0, len(p):].tolist()
        assert ours[0] == hf[: len(ours[0])]  # ours may stop earlier, at "\n\nHuman:"
        assert len(set(hf)) > 3
        if samples[3 * i].stop == "length":
            assert len(ours[0]) == 24


def test_sampling_is_seeded_and_filters_tails(tiny: tuple[Policy, Path]) -> None:
    policy = tiny[0]
    prompts, _ = PolicyEncoder(policy.tokenizer, 64).encode_prompts(
        [Dialogue.parse("\n\nHuman: hi there")], 32)
    sampler = Sampler(policy.net, policy.tokenizer)
    a = sampler.sample(prompts, n=4, max_new_tokens=10, seed=5)
    b = sampler.sample(prompts, n=4, max_new_tokens=10, seed=5)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert len({tuple(s.tokens) for s in a}) > 1  # the 4 samples differ
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [[False, False, True,
                                                                         True]]
    p = logits.softmax(-1)[0]
    kept = ~torch.isinf(filter_logits(logits, 1.0, 0, float(p[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False]]


def test_generate_command_feeds_pm_score(tiny: tuple[Policy, Path], real_file: Path,
                                         tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "samples.jsonl"
    code, _, err = run_cli(["generate", "--policy", str(tiny[1]), str(real_file), "--n", "3",
                            "--max-prompts", "4", "--max-new-tokens", "12", "--seed", "1", "-o",
                            str(out)], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 12
    assert [r["sample"] for r in rows[:3]] == [0, 1, 2]
    first = first_rows(real_file, 1)[0]
    assert rows[0]["prompt_id"].endswith(":0")
    d = Dialogue.parse(rows[0]["text"])
    assert d.turns[:-1] == first.prompt and d.turns[-1].role == "assistant"
    assert rows[0]["text"].endswith(rows[0]["response"])
    # `hhrlhf pm score` reads them (a lexical PM: quick to train here)
    from hhrlhf.pm.lexical import LexicalPreferenceModel

    pm_dir = tmp_path / "pm"
    LexicalPreferenceModel.fit(first_rows(real_file, 200)).save(pm_dir)
    code, stdout, err = run_cli(["pm", "score", str(pm_dir), str(out)], capsys, monkeypatch)
    assert code == 0, err
    scores = [json.loads(x) for x in stdout.splitlines()]
    assert [s["id"] for s in scores] == [r["id"] for r in rows]
    # stdin, greedy: a typed line is a prompt
    code, stdout, err = run_cli(["generate", "--policy", str(tiny[1]), "--temperature", "0",
                                 "--max-new-tokens", "5"], capsys, monkeypatch,
                                stdin="Human: How do I bake bread?\n")
    assert code == 0, err
    row = json.loads(stdout)
    assert row["text"].startswith("\n\nHuman: How do I bake bread?\n\nAssistant:")
    # refusing to write over an input
    code, _, err = run_cli(["generate", "--policy", str(tiny[1]), str(out), "-o", str(out)], capsys,
                           monkeypatch)
    assert code == 2 and "is one of the inputs; refusing to write over it" in err


def test_a_sample_stops_at_the_next_human_turn(tiny: tuple[Policy, Path]) -> None:
    """A real Llama whose logits are pushed to the first token of " Sure" after the prompt,
    then to the Human marker: the sample stops there, the marker cut from its text (and kept going with
    stop_at_human=False)."""
    policy = tiny[0]
    tok = policy.tokenizer
    sure = tok(" Sure", add_special_tokens=False)["input_ids"]
    human = tok("\n\nHuman:", add_special_tokens=False)["input_ids"]
    assert len(human) == 1  # the tiny tokenizer's role markers are single tokens

    class Pushed(torch.nn.Module):
        def __init__(self, net: torch.nn.Module):
            super().__init__()
            self.net = net

        def forward(self, input_ids: torch.Tensor, **kw: object) -> object:
            out = self.net(input_ids=input_ids, **kw)
            target = sure[0] if input_ids.shape[1] > 1 else human[0]  # prefill, then decode
            out.logits[..., target] += 1e4
            return out

    prompts, _ = PolicyEncoder(tok, 64).encode_prompts([Dialogue.parse("\n\nHuman: hi")], 32)
    sampler = Sampler(Pushed(policy.net), tok)
    s = sampler.sample(prompts, n=2, max_new_tokens=6, temperature=0)
    assert [x.stop for x in s] == ["human", "human"]
    assert s[0].text == tok.decode([sure[0]]) and s[0].tokens == [sure[0], human[0]]
    s = sampler.sample(prompts, n=1, max_new_tokens=6, temperature=0, stop_at_human=False)
    assert s[0].stop == "length" and len(s[0].tokens) == 6


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]).repeat(40000, 1)  # a zero at the end
    got = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(got, minlength=5).double() / len(got)
    torch.testing.assert_close(freq, probs[0].double(), rtol=0, atol=0.01)
    assert freq[4] == 0


def test_finished_rows_leave_the_batch_without_changing_results(tiny: tuple[Policy, Path],
                                                                real_file: Path) -> None:
    policy = Policy.load(tiny[1])
    # an LM head that ends samples early and at different steps: every token but EOS near
    # logit 0, EOS's logit large or small depending on the hidden state
    torch.manual_seed(11)
    with torch.no_grad():
        head = policy.net.lm_head.weight
        head.normal_(std=1e-3)
        head[policy.eos_id].normal_(std=0.6)
    prompts, _ = PolicyEncoder(policy.tokenizer, 256).encode_prompts(
        [c.chosen_dialogue for c in first_rows(real_file, 4)], 200)
    batch_rows: list[int] = []
    hook = policy.net.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: batch_rows.append(int(args[0].shape[0])))
    sampler = Sampler(policy.net, policy.tokenizer)
    try:
        kept = sampler.sample(prompts, n=8, max_new_tokens=40, seed=2, batch_size=32)
        compacted_rows, batch_rows[:] = list(batch_rows), []
        sampler.compact_at = 0
        whole = sampler.sample(prompts, n=8, max_new_tokens=40, seed=2, batch_size=32)
    finally:
        hook.remove()
    assert set(batch_rows) == {4, 32}  # the prefill, then all 32 rows every step
    assert compacted_rows[0] == 4 and min(compacted_rows[1:]) < 16  # finished rows left
    stops = [s.stop for s in whole]
    assert "eos" in stops and "length" in stops
    assert len({len(s.tokens) for s in whole}) > 3
    assert [(s.tokens, s.text, s.stop) for s in kept] == [(s.tokens, s.text, s.stop)
                                                          for s in whole]


def test_prompts_cut_to_fit_are_counted_and_said(tiny: tuple[Policy, Path], real_file: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt longer than --max-prompt-length loses its start: generate says how many did,
    instead of showing the whole dialogue in `text` as if the policy had read it."""
    args = ["generate", "--policy", str(tiny[1]), str(real_file), "--max-prompts", "6",
            "--max-new-tokens", "4", "--temperature", "0"]
    code, out, err = run_cli([*args, "--max-prompt-length", "24"], capsys, monkeypatch)
    assert code == 0, err
    assert len(out.splitlines()) == 6
    import re

    def cut(err: str) -> int:
        found = re.search(r"note: (\d+) of 6 prompts were longer than the prompt length", err)
        return int(found.group(1)) if found else 0

    short = cut(err)
    assert short >= 4  # 24 tokens hold almost no dialogue
    code, _, err = run_cli([*args, "--max-prompt-length", "400", "-q"], capsys, monkeypatch)
    assert code == 0 and cut(err) < short
