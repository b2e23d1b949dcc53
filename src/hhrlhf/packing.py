"""Shared-prompt packing: one row ``[prompt, r1, ..., rN]`` computes a prompt once for N responses.

Used by the preference model (a pair: N = 2, read at each response's final token), by DPO
(the policy's and the reference's log-probs of chosen and rejected) and by RL (N samples of one
prompt). The row carries a block-causal attention mask: every token attends causally to the
prompt and to earlier tokens of its own response, never to another response. Position ids
restart each response where the prompt ends, so each response is computed exactly as the full
sequence ``prompt + response`` would be - for the families whose attention takes a packed row's
4D mask and position ids as given (:data:`PACKABLE`, each one checked in the tests); the
others must be fed full rows (:func:`packing_problem` says why).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# Decoder families whose attention takes a packed row's 4D mask and position ids as given, so
# that a packed [prompt, r1, ..., rN] row computes each response exactly as its full row
# (checked per family in tests/test_pm_train.py and tests/test_packing.py). Others place tokens
# by their index in the row instead: ALiBi biases (bloom, mpt, falcon with alibi) or a local
# window inside the layer (gpt_neo); packing would change their outputs, so they, and families
# not checked yet, take full rows.
PACKABLE = frozenset({
    "gpt2", "gpt_bigcode", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma",
    "gemma2", "gemma3_text", "phi", "phi3", "stablelm", "olmo2", "opt", "falcon",
})


def packing_problem(config: Any, max_length: int) -> str | None:
    """Why a packed row would change this decoder's outputs (so it takes full rows), or None
    when a packed row is exact."""
    mt = config.model_type
    if mt not in PACKABLE:
        return f"{mt} is not among the families checked to take a packed row's mask as given"
    if getattr(config, "alibi", False):
        return f"{mt} with ALiBi places tokens by their index in the row"
    attn = getattr(config, "_attn_implementation", "sdpa")
    if attn not in ("sdpa", "eager"):
        return f"attention {attn} takes no custom 4D mask"
    # A sliding window is not applied to a custom 4D mask. It never bites in the full rows when
    # it spans max_length tokens, and then the packed row (no window) computes the same.
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    used = getattr(config, "use_sliding_window", True) is not False and (
        types is None or any("sliding" in str(t) for t in types))
    if window and used and int(window) < max_length:
        return f"its sliding window ({window} tokens) is shorter than max_length {max_length}"
    return None


PAD_SEGMENT = -1


def collate_shared(rows: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]], pad_id: int
                   ) -> dict[str, torch.Tensor]:
    """Batch of packed rows, one per ``(prompt ids, [response ids, ...])``; right-padded.

    Every row must hold the same number N of responses, each of at least one token, and a
    prompt of at least one token (the position that predicts a response's first token).

    Returns ``input_ids`` and ``position_ids`` (B, T); ``mask`` (B, 1, T, T) bool, True =
    attend; ``segment`` (B, T): 0 prompt, k for response k (1-based), -1 padding;
    ``prompt_len`` (B,); ``starts`` and ``ends`` (B, N): row index of each response's first
    and last token. Padding attends to earlier padding only (a query with nothing to attend to
    gives NaN in softmax); nothing real attends to it.
    """
    n = len(rows[0][1])
    if any(len(r) != n for _, r in rows):
        raise ValueError("every packed row needs the same number of responses")
    lens = [len(p) + sum(len(x) for x in r) for p, r in rows]
    width = max(lens)
    b = len(rows)
    ids = np.full((b, width), pad_id, dtype=np.int64)
    pos = np.zeros((b, width), dtype=np.int64)
    seg = np.full((b, width), PAD_SEGMENT, dtype=np.int64)
    starts = np.zeros((b, n), dtype=np.int64)
    ends = np.zeros((b, n), dtype=np.int64)
    prompt_len = np.zeros(b, dtype=np.int64)
    for j, (prompt, responses) in enumerate(rows):
        s = len(prompt)
        ids[j, :s] = prompt
        pos[j, :s] = np.arange(s)
        seg[j, :s] = 0
        prompt_len[j] = s
        at = s
        for k, r in enumerate(responses):
            m = len(r)
            ids[j, at : at + m] = r
            pos[j, at : at + m] = np.arange(s, s + m)
            seg[j, at : at + m] = k + 1
            starts[j, k], ends[j, k] = at, at + m - 1
            at += m
    tokens = _response_tokens(ids, starts, ends, packed=True, prompt_len=prompt_len)
    seg_t = torch.from_numpy(seg)
    q, k_ = seg_t[:, :, None], seg_t[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril_()
    allowed = causal & (((k_ == 0) & (q != PAD_SEGMENT)) | (k_ == q))
    allowed |= torch.eye(width, dtype=torch.bool)
    return {"input_ids": torch.from_numpy(ids), "position_ids": torch.from_numpy(pos),
            "mask": allowed[:, None], "segment": seg_t, "prompt_len": torch.from_numpy(prompt_len),
            "starts": torch.from_numpy(starts), "ends": torch.from_numpy(ends), **tokens}


def collate_full(rows: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]], pad_id: int
                 ) -> dict[str, torch.Tensor]:
    """The same responses unpacked: row ``k * B + j`` is ``prompt_j + response_jk`` alone
    (right-padded, 2D ``attention_mask``), with ``starts``/``ends`` (B, N) indexing rows of that
    layout: response k of row j starts at ``starts[j, k]`` in full row ``k * B + j``."""
    n = len(rows[0][1])
    seqs = [np.concatenate([p, r[k]]) for k in range(n) for p, r in rows]
    width = max(len(s) for s in seqs)
    b = len(rows)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    att = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        att[i, : len(s)] = 1
    starts = np.array([[len(p)] * n for p, _ in rows], dtype=np.int64).reshape(b, n)
    ends = np.array([[len(p) + len(r[k]) - 1 for k in range(n)] for p, r in rows],
                    dtype=np.int64).reshape(b, n)
    tokens = _response_tokens(ids, starts, ends, packed=False)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(att),
            "starts": torch.from_numpy(starts), "ends": torch.from_numpy(ends), **tokens}


def _response_tokens(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, packed: bool,
                     prompt_len: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Every response token, flat: ``tok_row``/``tok_pred`` index the hidden state that
    predicts it (the token before it in its own sequence: for a packed response's first token,
    the prompt's last), ``tok_target`` is the token, ``tok_owner`` = j * N + k (row j,
    response k). The vocabulary projection then runs at these positions only."""
    b, n = starts.shape
    rows, preds, owners = [], [], []
    for j in range(b):
        for k in range(n):
            t = np.arange(starts[j, k], ends[j, k] + 1)
            p = t - 1
            if packed:
                assert prompt_len is not None
                p[0] = prompt_len[j] - 1
            rows.append(np.full(len(t), j if packed else k * b + j))
            preds.append(p)
            owners.append(np.full(len(t), j * n + k))
    row = np.concatenate(rows)
    pred = np.concatenate(preds)
    target = ids[row, pred + 1] if not packed else ids[row, np.concatenate(
        [np.arange(starts[j, k], ends[j, k] + 1) for j in range(b) for k in range(n)])]
    return {"tok_row": torch.from_numpy(row.astype(np.int64)),
            "tok_pred": torch.from_numpy(pred.astype(np.int64)),
            "tok_target": torch.from_numpy(np.asarray(target, dtype=np.int64)),
            "tok_owner": torch.from_numpy(np.concatenate(owners).astype(np.int64))}


def backbone_mask(mask: torch.Tensor, config: Any, dtype: torch.dtype) -> torch.Tensor:
    """A boolean 4D mask as a backbone's attention takes it (eager: additive floats)."""
    if getattr(config, "_attn_implementation", "sdpa") != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, torch.finfo(dtype).min)
