"""Packed log-probs: one row [prompt, chosen, rejected] gives each response's summed log-probs
exactly as two full rows do (and as the model's own logits do), for every packable family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from policy_support import one_thread  # noqa: F401  # autouse

from hhrlhf.packing import PACKABLE, collate_full, collate_shared, packing_problem
from hhrlhf.policy.logprobs import collate_sft, response_logprobs, token_logprobs

V = 101


def _families() -> dict[str, object]:
    import transformers as T

    c = {"vocab_size": V, "num_hidden_layers": 2, "max_position_embeddings": 256}
    gqa = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
           "num_key_value_heads": 1, **c}
    return {
        "gpt2": T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2),
        "llama": T.LlamaConfig(**gqa),
        "qwen2": T.Qwen2Config(**{**gqa, "num_attention_heads": 4, "num_key_value_heads": 2}),
        "gpt_bigcode": T.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=2),
        "gptj": T.GPTJConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=2, rotary_dim=8),
        "gpt_neox": T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                    **c),
        "mistral": T.MistralConfig(sliding_window=128, **gqa),
        "qwen3": T.Qwen3Config(head_dim=16, **gqa),
        "gemma": T.GemmaConfig(head_dim=16, **gqa),
        "gemma2": T.Gemma2Config(head_dim=16, sliding_window=256, **gqa),  # logit soft-capping
        "gemma3_text": T.Gemma3TextConfig(head_dim=16, sliding_window=256, **gqa),
        "phi": T.PhiConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, **c),
        "phi3": T.Phi3Config(pad_token_id=0, **gqa),
        "stablelm": T.StableLmConfig(**gqa),
        "olmo2": T.Olmo2Config(pad_token_id=0, **gqa),
        "opt": T.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=2,
                           word_embed_proj_dim=32, **c),
        "falcon": T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2),
    }


def _rows(seed: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, V, size=p), [rng.integers(1, V, size=m) for m in ms])
            for p, ms in ((40, (9, 23)), (7, (30, 1)), (61, (5, 12)), (1, (14, 3)))]


def test_every_packable_family_is_checked() -> None:
    assert set(_families()) == PACKABLE


@pytest.mark.parametrize("family", sorted(PACKABLE))
def test_packed_logprobs_equal_full_rows(family: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(_families()[family]).eval()
    assert packing_problem(net.config, 128) is None
    rows = _rows(1)
    with torch.no_grad():
        packed, n_p = response_logprobs(net, collate_shared(rows, 0), 2)
        full, n_f = response_logprobs(net, collate_full(rows, 0), 2)
        # and the model's own forward (LM head on every position) on each full sequence
        own = torch.zeros(len(rows), 2)
        for j, (p, rs) in enumerate(rows):
            for k, r in enumerate(rs):
                x = torch.from_numpy(np.concatenate([p, r])[None].astype(np.int64))
                lp = torch.log_softmax(net(input_ids=x).logits[0].float(), -1)
                own[j, k] = lp[len(p) - 1: -1].gather(-1, x[0, len(p):, None]).sum()
    torch.testing.assert_close(n_p, n_f)
    assert n_p.tolist() == [[len(r) for r in rs] for _, rs in rows]
    torch.testing.assert_close(packed, full, rtol=0, atol=2e-4)
    torch.testing.assert_close(full, own, rtol=0, atol=2e-4)
    assert full.std() > 1e-3


def test_gradients_through_a_packed_row_equal_full_rows() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1))
    grads = []
    for collate in (collate_shared, collate_full):
        net.zero_grad()
        lp, _ = response_logprobs(net, collate(_rows(2), 0), 2)
        torch.nn.functional.logsigmoid(lp[:, 0] - lp[:, 1]).mean().neg().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()
                                if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_sft_rows_score_only_the_loss_tokens(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(_families()["llama"]).eval()
    rng = np.random.default_rng(3)
    ids = [rng.integers(1, V, size=n) for n in (12, 30, 5)]
    loss = [np.arange(len(x)) % 3 == 1 for x in ids]
    batch = collate_sft(ids, loss, 0)
    with torch.no_grad():
        lp = token_logprobs(net, batch)
        want = []
        for x, m in zip(ids, loss):
            t = torch.from_numpy(x[None].astype(np.int64))
            full = torch.log_softmax(net(input_ids=t).logits[0], -1)
            for i in np.flatnonzero(m):
                want.append(full[i - 1, x[i]])
    torch.testing.assert_close(lp, torch.stack(want), rtol=0, atol=2e-5)
