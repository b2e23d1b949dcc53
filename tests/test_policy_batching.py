"""The shared decode batch of `policy serve` (hhrlhf.policy.batching): streams that join and
leave at different steps, with prompts of different lengths, decode in one forward pass per
step; a stream alone gives exactly the sampler's tokens; beside others, every token is what the
policy gives that stream's own text (checked by a plain forward pass over it).

HHRLHF_TEST_DEVICE=cuda runs them on a GPU (the suite runs them on the CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_support import (
    first_rows,
    one_thread,  # noqa: F401  # autouse
    varied_policy,
)

from hhrlhf.policy import Policy
from hhrlhf.policy.batching import BatchDecoder, DecodeStream, supports
from hhrlhf.policy.encode import PolicyEncoder
from hhrlhf.policy.sample import Sampler, Step

DEVICE = os.environ.get("HHRLHF_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def policy(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Policy:
    policy = varied_policy(real_file, tmp_path_factory.mktemp("batching") / "tiny")
    policy.net.to(DEVICE)
    return policy


@pytest.fixture(scope="module")
def prompts(policy: Policy, real_file: Path) -> list[np.ndarray]:
    """Prompts of many lengths (4 to 120 tokens)."""
    dialogues = [c.chosen_dialogue for c in first_rows(real_file, 12)]
    ids, _ = PolicyEncoder(policy.tokenizer, 200).encode_prompts(dialogues, 120)
    return sorted(ids, key=len)


def _stream(sampler: Sampler, prompts: list[np.ndarray], n: int, max_new: int,
            seed: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            batch_size: int = 64) -> DecodeStream:
    return DecodeStream(prompts, n, max_new, temperature, top_p, top_k, seed, batch_size,
                        sampler.device)


def _run(decoder: BatchDecoder, joins: dict[int, list[DecodeStream]],
         cancel: dict[int, DecodeStream] | None = None, widths: list[int] | None = None
         ) -> dict[int, list[list[Step]]]:
    """Step the decoder until nothing is left; ``joins[k]``: streams added before step k;
    ``cancel[k]``: cancelled before step k. Each stream's steps (by id), until its end."""
    out: dict[int, list[list[Step]]] = {}
    ended: set[int] = set()
    k = 0
    while decoder.busy() or any(at >= k for at in joins):
        for st in joins.get(k, []):
            decoder.add(st)
        if cancel and k in cancel:
            cancel[k].cancelled = True
        for st in decoder.step():
            for item in st.outbox:
                if item is None:
                    ended.add(id(st))
                else:
                    assert isinstance(item, list)
                    out.setdefault(id(st), []).append(item)
            st.outbox = []
        if widths is not None and decoder.batch is not None:
            widths.append(decoder.batch.length)
        k += 1
        assert k < 1000
    streams = [st for sts in joins.values() for st in sts]
    assert ended == {id(st) for st in streams if not st.cancelled}
    return out


def _tokens(steps: list[list[Step]], count: int) -> list[list[int]]:
    rows: list[list[int]] = [[] for _ in range(count)]
    n = 1 + max(s.sample_index for step in steps for s in step)
    for step in steps:
        for s in step:
            rows[s.prompt_index * n + s.sample_index].append(s.token)
    return rows


def test_a_stream_alone_gives_the_samplers_tokens(policy: Policy,
                                                  prompts: list[np.ndarray]) -> None:
    """Alone in the batch, in groups of batch_size rows, one after another: the same steps
    as Sampler.stream (the same prompts, settings and seed), bit for bit."""
    sampler = Sampler(policy.net, policy.tokenizer)
    assert supports(sampler)
    chosen = prompts[::3]
    settings = {"n": 3, "max_new_tokens": 20, "temperature": 1.0, "top_p": 0.9, "top_k": 40,
                "seed": 7, "batch_size": 6}  # 2 prompts a group: 2 groups
    expected = list(sampler.stream(chosen, **settings))
    st = DecodeStream(chosen, 3, 20, 1.0, 0.9, 40, 7, 6, sampler.device)
    got = _run(BatchDecoder(sampler, max_rows=64), {0: [st]})[id(st)]
    assert got == expected


def test_streams_that_join_and_leave_share_each_forward_pass(
        policy: Policy, prompts: list[np.ndarray]) -> None:
    """Four streams (greedy, so that each token can be checked on its own) join at different
    steps; one is cancelled. Each forward pass decodes every stream in flight; every token is
    the argmax of the policy's logits over that stream's own prompt and tokens so far, computed
    alone (to rounding: a token within 1e-4 of the top logit passes); the batch's width shrinks
    when the long prompt's stream has left."""
    sampler = Sampler(policy.net, policy.tokenizer)
    # greedy; top_k (no effect on a greedy pick) tells the rows apart as the decoder groups
    # rows that sample alike: rows of one setting are not contiguous in the batch
    a = _stream(sampler, [prompts[0], prompts[5]], 2, 12, 1, temperature=0.0)
    long = _stream(sampler, [prompts[-1]], 1, 6, 2, temperature=0.0, top_k=5)  # ends early
    b = _stream(sampler, [prompts[2]], 3, 25, 3, temperature=0.0)
    gone = _stream(sampler, [prompts[4]], 1, 40, 4, temperature=0.0, top_k=7)
    late = _stream(sampler, [prompts[1]], 2, 10, 5, temperature=0.0, top_k=5)
    decoder = BatchDecoder(sampler, max_rows=64)
    widths: list[int] = []
    rows_per_pass: list[int] = []
    hook = policy.net.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: rows_per_pass.append(int(args[0].shape[0])))
    try:
        got = _run(decoder, {0: [a, long], 3: [b, gone], 14: [late]}, cancel={8: gone},
                   widths=widths)
    finally:
        hook.remove()
    assert id(gone) in got and len(got[id(gone)]) < 40  # cancelled mid-way
    # one pass per step for all: a's 2x2, long's 1 and b's 3 rows decoded together
    assert max(rows_per_pass) >= 8
    assert decoder.forward_passes < 12 + 25  # streams one after another would take more
    # the width follows the rows in flight: down once the longest prompt's stream has gone
    assert max(widths) >= len(prompts[-1]) > min(widths[10:])
    for st, count in ((a, 4), (long, 1), (b, 3), (late, 2)):
        rows = _tokens(got[id(st)], count)
        for r, tokens in enumerate(rows):
            prompt = st.prompts[r // st.n]
            assert 0 < len(tokens) <= st.max_new_tokens
            ids = torch.tensor([[*prompt.tolist(), *tokens]], device=DEVICE)
            with torch.no_grad():
                logits = policy.net(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
            top = logits.max(-1).values
            picked = logits.gather(-1, torch.tensor(tokens, device=DEVICE)[:, None])[:, 0]
            assert torch.all(picked >= top - 1e-4 * (1 + top.abs())), (st.prompts, r)


def test_rows_wait_for_room(policy: Policy, prompts: list[np.ndarray]) -> None:
    """max_rows bounds the batch: a stream that does not fit waits until rows leave; one
    group is admitted into an empty batch whatever its size."""
    sampler = Sampler(policy.net, policy.tokenizer)
    big = _stream(sampler, [prompts[3]], 6, 5, 1)
    second = _stream(sampler, [prompts[4]], 2, 5, 2)
    rows: list[int] = []
    hook = policy.net.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: rows.append(int(args[0].shape[0])))
    try:
        got = _run(BatchDecoder(sampler, max_rows=4), {0: [big, second]})
    finally:
        hook.remove()
    assert set(got) == {id(big), id(second)}
    assert max(rows) <= 6  # never 6 + 2 rows: the second waited


def test_a_burst_is_prefilled_in_waves(policy: Policy, prompts: list[np.ndarray]) -> None:
    """Streams arriving together are prefilled together up to prefill_tokens (padded), the
    rest at the next steps: with room for one prompt a pass, three streams take three
    prefills and the first gets its first token a step before the last."""
    sampler = Sampler(policy.net, policy.tokenizer)
    shapes: list[tuple[int, int]] = []
    hook = policy.net.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: shapes.append(tuple(args[0].shape)))
    try:
        for budget, prefills in ((1, 3), (10_000, 1)):
            shapes.clear()
            streams = [_stream(sampler, [prompts[k]], 2, 4, k) for k in (3, 6, 9)]
            decoder = BatchDecoder(sampler, prefill_tokens=budget)
            for st in streams:
                decoder.add(st)
            first: dict[int, int] = {}
            k = 0
            while decoder.busy():
                for st in decoder.step():
                    first.setdefault(id(st), k)
                    st.outbox = []
                k += 1
            assert sum(width > 1 for _, width in shapes) == prefills, budget
            assert [first[id(st)] for st in streams] == ([0, 1, 2] if prefills == 3
                                                         else [0, 0, 0])
    finally:
        hook.remove()
