"""Log-probs of response tokens, with the vocabulary projection only where a response token is
predicted.

A batch is packed (:func:`hhrlhf.packing.collate_shared`: one row ``[prompt, r1..rN]``, 4D
mask, restarted positions), full (:func:`hhrlhf.packing.collate_full`) or SFT rows
(:func:`collate_sft`); all three carry the flat response-token index ``tok_row``,
``tok_pred``, ``tok_target``, ``tok_owner``. The decoder runs without its LM head; the head
(and a family's final logit soft-capping) runs on the gathered hidden states only: a response
of 100 tokens after a prompt of 400 projects 100 positions onto the vocabulary, not 500.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hhrlhf.packing import backbone_mask


def collate_sft(ids: Sequence[np.ndarray], loss: Sequence[np.ndarray], pad_id: int
                ) -> dict[str, torch.Tensor]:
    """Right-padded rows; the loss tokens flat as in the packed layouts (owner = row)."""
    width = max(len(x) for x in ids)
    b = len(ids)
    arr = np.full((b, width), pad_id, dtype=np.int64)
    att = np.zeros((b, width), dtype=np.int64)
    rows, cols = [], []
    for j, (x, m) in enumerate(zip(ids, loss)):
        arr[j, : len(x)] = x
        att[j, : len(x)] = 1
        t = np.flatnonzero(m)
        t = t[t > 0]  # the first token of a row has nothing before it to predict it
        rows.append(np.full(len(t), j))
        cols.append(t)
    row = np.concatenate(rows).astype(np.int64)
    col = np.concatenate(cols).astype(np.int64)
    return {"input_ids": torch.from_numpy(arr), "attention_mask": torch.from_numpy(att),
            "tok_row": torch.from_numpy(row), "tok_pred": torch.from_numpy(col - 1),
            "tok_target": torch.from_numpy(arr[row, col]), "tok_owner": torch.from_numpy(row)}


def hidden_states(net: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's final hidden states (B, T, d), LM head not applied."""
    base = net.base_model
    if "mask" in batch:
        dtype = next(net.parameters()).dtype
        out = base(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=backbone_mask(batch["mask"], net.config, dtype),
                   use_cache=False)
    else:
        out = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False)
    return out.last_hidden_state  # type: ignore[no-any-return]


def project(net: Any, h: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states, as the model's own forward computes them."""
    logits = net.get_output_embeddings()(h)
    cap = getattr(net.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits  # type: ignore[no-any-return]


def token_logprobs(net: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(token | what precedes it in its own sequence), one per flat response token."""
    h = hidden_states(net, batch)
    h = h[batch["tok_row"], batch["tok_pred"]]
    logits = project(net, h).float()
    return torch.log_softmax(logits, dim=-1).gather(  # type: ignore[no-any-return]
        -1, batch["tok_target"][:, None])[:, 0]


def response_logprobs(net: Any, batch: dict[str, torch.Tensor], n: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts) per response, each (B, N)."""
    return per_response(token_logprobs(net, batch), batch, n)


class LogprobNet(torch.nn.Module):
    """The module training wraps (DDP/FSDP): ``forward(batch)`` -> :func:`token_logprobs`."""

    def __init__(self, net: Any):
        super().__init__()
        self.net = net

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_logprobs(self.net, batch)


def per_response(lp: torch.Tensor, batch: dict[str, torch.Tensor], n: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token log-probs summed per response: (sums, token counts), each (B, N)."""
    b = batch["starts"].shape[0]
    owner = batch["tok_owner"]
    sums = torch.zeros(b * n, dtype=lp.dtype, device=lp.device).index_add_(0, owner, lp)
    counts = torch.zeros(b * n, dtype=lp.dtype, device=lp.device).index_add_(
        0, owner, torch.ones_like(lp))
    return sums.view(b, n), counts.view(b, n)
