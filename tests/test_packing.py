"""Shared-prompt packing with N responses: each response's hidden states equal its full row's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hhrlhf.packing import backbone_mask, collate_full, collate_shared


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_three_responses_packed_equal_their_full_rows(family: str, attn: str) -> None:
    from transformers import AutoModel, GPT2Config, LlamaConfig

    cfg = (GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2) if family == "gpt2" else
           LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1))
    torch.manual_seed(0)
    net = AutoModel.from_config(cfg, attn_implementation=attn).eval()
    rng = np.random.default_rng(0)
    rows = [(rng.integers(1, 97, size=p), [rng.integers(1, 97, size=m) for m in ms])
            for p, ms in ((5, (3, 7, 1)), (9, (4, 2, 6)), (1, (1, 1, 8)))]
    packed = collate_shared(rows, pad_id=0)
    full = collate_full(rows, pad_id=0)
    assert packed["input_ids"].shape[1] == max(len(p) + sum(map(len, r)) for p, r in rows)
    with torch.no_grad():
        hp = net(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                 attention_mask=backbone_mask(packed["mask"], net.config, torch.float32)
                 ).last_hidden_state
        hf = net(input_ids=full["input_ids"], attention_mask=full["attention_mask"]
                 ).last_hidden_state
    b = len(rows)
    for j, (p, responses) in enumerate(rows):
        for k, r in enumerate(responses):
            a, e = int(packed["starts"][j, k]), int(packed["ends"][j, k])
            fa, fe = int(full["starts"][j, k]), int(full["ends"][j, k])
            assert e - a == fe - fa == len(r) - 1
            torch.testing.assert_close(hp[j, a : e + 1], hf[k * b + j, fa : fe + 1],
                                       rtol=0, atol=2e-5)
            # the prompt, computed once, equals each full row's prompt
            torch.testing.assert_close(hp[j, : len(p)], hf[k * b + j, : len(p)], rtol=0,
                                       atol=2e-5)
    # a response never attends to another
    m = packed["mask"][0, 0]
    s0, e0 = packed["starts"][0, 0], packed["ends"][0, 0]
    s1 = packed["starts"][0, 1]
    assert not m[s1, s0 : e0 + 1].any() and m[s1, :5].all()


def test_rows_need_the_same_number_of_responses() -> None:
    with pytest.raises(ValueError, match="same number"):
        collate_shared([(np.ones(2), [np.ones(1)]), (np.ones(2), [np.ones(1), np.ones(1)])], 0)
