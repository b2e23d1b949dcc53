"""The clipped losses of PPO (token level) and of RLOO as TRL computes it (sequence level)."""

from __future__ import annotations

import torch

from hhrlhf.rl.advantages import masked_mean


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip: float, mask: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate ``-min(ratio * A, clip(ratio, 1 - e, 1 + e) * A)``, averaged
    over the real entries; also the fraction of entries where the clipped term was taken
    (the gradient is zero there). Per token for PPO; per sequence (summed log-probs) for RLOO."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    loss = masked_mean(-torch.min(unclipped, clipped), mask)
    frac = masked_mean((clipped < unclipped).to(logp.dtype), mask)
    return loss, frac.detach()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float, mask: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``, averaged; and the
    fraction of entries where the clipped error was the larger."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    frac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, frac.detach()
