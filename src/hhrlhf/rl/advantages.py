"""The pure functions of RL from a preference model, on tensors (no model, no I/O).

Shapes: a batch of responses is ``(R, T)`` right-padded with a boolean ``mask`` (True = a real
token); RLOO's groups are ``(P, k)``: ``k`` responses to each of ``P`` prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the real entries (unbiased variance, as TRL); with
    ``shift_mean=False`` the mean is added back (only the scale changes). Padding stays 0."""
    mean = masked_mean(x, mask)
    centred = x - mean
    if mask is None:
        count = x.numel()
        var = (centred ** 2).sum() / max(count - 1, 1)
    else:
        m = mask.to(x.dtype)
        var = (centred ** 2 * m).sum() / (m.sum() - 1).clamp(min=1)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation per response, (R, T) each; returns (advantages,
    returns = advantages + values). ``values[t]`` is V of the state before token t; the state
    after a response's last token is terminal (value 0)::

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    """
    m = mask.to(values.dtype)
    v = values * m
    r = rewards * m
    t_len = r.shape[1]
    adv = torch.zeros_like(r)
    last = torch.zeros(r.shape[0], dtype=r.dtype, device=r.device)
    for t in reversed(range(t_len)):
        next_v = v[:, t + 1] if t + 1 < t_len else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def leave_one_out(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO on ``(P, k)`` rewards: each response's baseline is the mean reward of the other
    ``k - 1`` responses to its prompt; returns (advantages, baselines)."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples per prompt")
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline, baseline


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from a token sampled from pi (Schulman's k1, k2,
    k3): k1 = log pi - log ref (unbiased, can be negative), k2 = (log pi - log ref)^2 / 2,
    k3 = ref/pi - 1 - log(ref/pi) (unbiased, never negative)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; known: {', '.join(KL_ESTIMATORS)}")


def to_padded(flat: torch.Tensor, owner: torch.Tensor, n_owners: int) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Flat per-token values grouped by ``owner`` (ascending, each owner's tokens in order:
    the layout of :mod:`hhrlhf.packing`) as ``(n_owners, T)`` right-padded, and its mask."""
    counts = torch.bincount(owner, minlength=n_owners)
    width = int(counts.max()) if len(owner) else 0
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(owner), device=owner.device) - starts[owner]
    out = torch.zeros(n_owners, width, dtype=flat.dtype, device=flat.device)
    mask = torch.zeros(n_owners, width, dtype=torch.bool, device=flat.device)
    out[owner, col] = flat
    mask[owner, col] = True
    return out, mask


@dataclass
class AdaptiveKL:
    """The KL coefficient: fixed (``target`` = 0), or adapted towards a target KL per
    response as in Ziegler et al. (2019): ``coef *= 1 + clip(KL / target - 1, -0.2, 0.2) *
    n / horizon`` after each batch of ``n`` responses."""

    coef: float
    target: float = 0.0
    horizon: int = 10000

    def update(self, kl: float, n: int) -> float:
        if self.target > 0 and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n / self.horizon
        return self.coef
