"""One RL step's rollout: sample ``k`` responses per prompt, score them with the PM, and read
them once with the policy (and its value head) and with the frozen reference, without
gradients. The result is a frozen :class:`Rollout`: everything an algorithm's advantages and
loss need, and nothing they may change.

Layout (packed order): row ``j`` is prompt ``j`` with its ``k`` responses, ``[prompt, r1..rk]``
(:mod:`hhrlhf.packing`); per-token tensors are flat over rows, responses and tokens in that
order (``tok_start[j]`` is row ``j``'s first token); per-response arrays are ``(P * k,)``,
response ``m`` of prompt ``j`` at ``j * k + m``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hhrlhf.records import Dialogue, response_turn

Row = tuple[np.ndarray, list[np.ndarray]]  # (prompt ids, the k responses' ids)


@dataclass(frozen=True)
class Rollout:
    """A step's samples and the no-grad readings of them."""

    rows: list[Row]
    k: int  # responses per prompt
    scores: np.ndarray  # (P * k,) PM score per response
    tok_start: np.ndarray  # (P + 1,) row j's tokens are tok_start[j]:tok_start[j + 1]
    owner: torch.Tensor  # (T,) the response (j * k + m) each flat token belongs to
    old_logp: torch.Tensor  # (T,) log-prob of each token under the policy that sampled it
    ref_logp: torch.Tensor  # (T,) ... under the reference
    entropy: torch.Tensor  # (T,) entropy of the policy's distribution at each token
    old_values: torch.Tensor | None  # (T,) value of the state before each token (PPO)
    stops: list[str]  # (P * k,) why each sample ended: "eos", "human" or "length"

    @property
    def responses(self) -> int:
        return len(self.rows) * self.k

    def tokens_of(self, rows: np.ndarray) -> np.ndarray:
        """The flat token positions of ``rows`` (sorted row indices), in packed order."""
        return np.concatenate([np.arange(self.tok_start[i], self.tok_start[i + 1])
                               for i in rows])

    def responses_of(self, rows: np.ndarray) -> np.ndarray:
        """The response indices of ``rows``, in packed order."""
        return np.concatenate([np.arange(i * self.k, (i + 1) * self.k) for i in rows])

    def response_lengths(self) -> np.ndarray:
        return np.array([len(r) for _, rs in self.rows for r in rs])


def token_outputs(net: Any, batch: dict[str, torch.Tensor], value_head: Any = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per flat response token: log-prob, entropy of the policy's distribution there, and the
    value of the state before it (PPO). The vocabulary projection runs at response positions
    only (:mod:`hhrlhf.policy.logprobs`)."""
    from hhrlhf.policy.logprobs import hidden_states, project

    h = hidden_states(net, batch)[batch["tok_row"], batch["tok_pred"]]
    logits = project(net, h).float()
    logsm = torch.log_softmax(logits, dim=-1)
    lp = logsm.gather(-1, batch["tok_target"][:, None])[:, 0]
    entropy = -(logsm.exp() * logsm).sum(-1)
    values = value_head(h).float()[:, 0] if value_head is not None else None
    return lp, entropy, values


def read_without_grad(net: Any, rows: Sequence[Row], collate: Callable[..., dict[str, Any]],
                      pad_id: int, batch_size: int, device: torch.device, autocast: Any,
                      value_head: Any = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`token_outputs` of ``rows``, ``batch_size`` packed rows per forward pass, in eval
    mode and without gradients; the results on ``device``."""
    lps, ents, vals = [], [], []
    was = net.training
    net.eval()
    at = next(net.parameters()).device
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {key: v.to(at) for key, v in collate(rows[i: i + batch_size],
                                                           pad_id).items()}
            with autocast():
                lp, ent, val = token_outputs(net, batch, value_head)
            lps.append(lp.to(device))
            ents.append(ent.to(device))
            if val is not None:
                vals.append(val.to(device))
    net.train(was)
    return torch.cat(lps), torch.cat(ents), (torch.cat(vals) if vals else None)


def response_dialogue(prompt: Dialogue, text: str) -> Dialogue:
    """The prompt dialogue with the sampled response as its final Assistant turn."""
    return Dialogue(prompt.turns + (response_turn(text),), prompt.preamble)


def score_samples(pm: Any, prompts: list[Dialogue], texts: list[str], k: int) -> np.ndarray:
    """PM scores of ``k`` responses per prompt (flat, prompt by prompt): by the PM's
    ``score_groups`` where it has one (a neural decoder PM packs a prompt's k responses in one
    row), else dialogue by dialogue."""
    groups = getattr(pm, "score_groups", None)
    if groups is not None:
        turns = [[response_turn(t) for t in texts[j * k: (j + 1) * k]]
                 for j in range(len(prompts))]
        return np.asarray(groups(prompts, turns), dtype=np.float64).reshape(-1)
    dialogues = [response_dialogue(prompts[j // k], t) for j, t in enumerate(texts)]
    return np.asarray(pm.score(dialogues), dtype=np.float64)


def owners(rows: Sequence[Row], device: torch.device) -> torch.Tensor:
    """(T,) the response index of each flat token of ``rows``."""
    counts = [len(r) for _, rs in rows for r in rs]
    return torch.repeat_interleave(torch.arange(len(counts), device=device),
                                   torch.tensor(counts, device=device))
