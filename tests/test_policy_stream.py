"""Streaming: Sampler.stream gives sample()'s tokens step by step; TextStream turns them into
the same text without splitting a character or leaking a stop string."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_support import (
    first_rows,
    one_thread,  # noqa: F401  # autouse
    varied_policy,
)

from hhrlhf.policy import Policy
from hhrlhf.policy.encode import PolicyEncoder
from hhrlhf.policy.model import HUMAN_MARKER
from hhrlhf.policy.sample import Sample, Sampler, Step
from hhrlhf.policy.textstream import TextStream, stream_text


@pytest.fixture(scope="module")
def policy(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Policy:
    # samples end at different steps, some by EOS, some by length
    return varied_policy(real_file, tmp_path_factory.mktemp("stream") / "tiny", seed=11)


def test_streamed_tokens_are_the_sampled_tokens(policy: Policy, real_file: Path) -> None:
    prompts, _ = PolicyEncoder(policy.tokenizer, 256).encode_prompts(
        [c.chosen_dialogue for c in first_rows(real_file, 3)], 200)
    sampler = Sampler(policy.net, policy.tokenizer)
    # batch_size 4 with n 2: two batches, and rows leave the batch (compaction) as they end
    args: dict[str, int] = {"n": 2, "max_new_tokens": 30, "seed": 7, "batch_size": 4}
    whole = sampler.sample(prompts, **args)
    tokens: dict[tuple[int, int], list[int]] = {}
    stops: dict[tuple[int, int], str] = {}
    texts: dict[tuple[int, int], str] = {}
    decoders: dict[tuple[int, int], TextStream] = {}
    steps = sampler.stream(prompts, **args)
    try:
        while True:
            for s in next(steps):
                assert isinstance(s, Step)
                key = (s.prompt_index, s.sample_index)
                assert key not in stops  # nothing after a sample's end
                tokens.setdefault(key, []).append(s.token)
                d = decoders.setdefault(key, TextStream(policy.tokenizer))
                texts[key] = texts.get(key, "") + d.push(s.token)
                if s.stop is not None:
                    stops[key] = s.stop
                    texts[key] += d.finish()
    except StopIteration as end:
        returned: list[Sample] = end.value
    assert {s.stop for s in whole} >= {"eos", "length"}
    for s in whole:
        key = (s.prompt_index, s.sample_index)
        assert tokens[key] == s.tokens
        assert stops[key] == s.stop
        assert texts[key] == s.text
    assert [(s.tokens, s.text, s.stop) for s in returned] == [(s.tokens, s.text, s.stop)
                                                              for s in whole]
    # as text, in the endpoint client's shape
    got: dict[tuple[int, int], str] = {}
    ends: dict[tuple[int, int], str] = {}
    for d in stream_text(sampler, prompts, **args):
        key = (d.prompt_index, d.sample_index)
        assert key not in ends
        got[key] = got.get(key, "") + d.text
        if d.stop is not None:
            ends[key] = d.stop
    assert [(got[(s.prompt_index, s.sample_index)], ends[(s.prompt_index, s.sample_index)])
            for s in whole] == [(s.text, s.stop) for s in whole]


def test_text_stream_holds_back_split_characters_and_stop_strings(policy: Policy) -> None:
    tok = policy.tokenizer
    text = " Caf\u00e9 \U0001F600 \u4f60\u597d, then"
    ids = tok(text + HUMAN_MARKER + " more", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the emoji is split over byte tokens
    stream = TextStream(tok)
    out = [stream.push(i) for i in ids]
    assert all("\ufffd" not in o for o in out)
    assert "".join(out) + stream.finish() == text
    assert stream.stopped == HUMAN_MARKER and stream.done
    # a stop string of the caller's, split over tokens: its start is held back, then cut
    stream = TextStream(tok, stops=[HUMAN_MARKER, "then"])
    got = [stream.push(i) for i in tok(" and then some", add_special_tokens=False)["input_ids"]]
    assert "".join(got) + stream.finish() == " and "
    assert not any("t" in g for g in got)  # "t", "th", "the" were held back
    assert stream.stopped == "then"
    # text that only looked like a stop's start is released when the stop does not follow
    stream = TextStream(tok, stops=["then"])
    got = "".join(stream.push(i) for i in tok(" the cat", add_special_tokens=False)["input_ids"])
    assert got + stream.finish() == " the cat" and stream.stopped is None
    # EOS ends the text and is not part of it
    stream = TextStream(tok)
    got = "".join(stream.push(i) for i in [*tok(" ok", add_special_tokens=False)["input_ids"],
                                           policy.eos_id, 5])
    assert got == " ok" and stream.done
