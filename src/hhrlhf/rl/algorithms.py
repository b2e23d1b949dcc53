"""The two RL algorithms of ``hhrlhf rl``, each a small object: from a frozen
:class:`~hhrlhf.rl.rollout.Rollout` and the KL coefficient, its :class:`Targets` (rewards,
advantages, returns); from the policy's new log-probs (and values) on a minibatch of the
rollout's rows, its loss. No model, no optimizer, no I/O: each is tested alone on tensors.

RLOO (as TRL 1.16's ``RLOOTrainer``): reward ``R_i = PM_i - kl_coef * KL_i`` with ``KL_i`` the
sequence's summed per-token ``log pi_old - log ref``; advantage ``R_i - mean of the other
k - 1 rewards of its prompt`` (whitened over the batch when ``whiten_advantages``); the loss is
the clipped surrogate on the sequence's summed log-prob ratio.

PPO (Ziegler et al. 2019, as the HH paper used it): per-token reward ``-kl_coef * (log pi_old -
log ref)`` at every token, plus the PM score (whitened over the batch when ``whiten_rewards``)
at the last token; GAE(gamma, lambda) on the value head's values; advantages whitened; the
clipped policy loss per token plus ``vf_coef`` times the clipped value loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from hhrlhf.rl.advantages import gae, leave_one_out, to_padded, whiten
from hhrlhf.rl.losses import clipped_policy_loss, clipped_value_loss
from hhrlhf.rl.rollout import Rollout

Stats = dict[str, tuple[float, float]]  # name -> (sum, count), logged as sum / count


@dataclass(frozen=True)
class Targets:
    """What the update trains towards, computed once per rollout."""

    seq_kl: torch.Tensor  # (P * k,) summed per-token log pi_old - log ref of each response
    rewards: torch.Tensor  # RLOO: (P * k,) per response; PPO: (T,) per token, flat
    advantages: torch.Tensor  # RLOO: (P * k,); PPO: (T,)
    returns: torch.Tensor | None = None  # PPO: (T,) value targets


@dataclass(frozen=True)
class Minibatch:
    """A minibatch of the rollout's rows: where its tokens and responses sit in the rollout
    (``tokens``, ``responses``) and, per token of the minibatch, its response within the
    minibatch (``owner``)."""

    rows: int
    tokens: torch.Tensor  # (t,) positions in the rollout's flat tokens
    responses: torch.Tensor  # (rows * k,) response indices in the rollout
    owner: torch.Tensor  # (t,) 0 .. rows * k - 1


class Algorithm(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def value_head(self) -> bool: ...  # whether the policy needs a value head

    def targets(self, ro: Rollout, kl_coef: float) -> Targets: ...

    def loss(self, ro: Rollout, t: Targets, mb: Minibatch, logp: torch.Tensor,
             values: torch.Tensor | None) -> tuple[torch.Tensor, Stats]: ...


def sequence_kl(ro: Rollout) -> torch.Tensor:
    """(P * k,) each response's summed per-token ``log pi_old - log ref`` (the k1 estimate of
    the Ziegler et al. / TRL penalty: unbiased, and negative for some samples)."""
    tok_kl = ro.old_logp - ro.ref_logp
    return torch.zeros(ro.responses, dtype=tok_kl.dtype, device=tok_kl.device).index_add_(
        0, ro.owner, tok_kl)


def _scores(ro: Rollout) -> torch.Tensor:
    return torch.as_tensor(ro.scores, dtype=torch.float32, device=ro.old_logp.device)


@dataclass(frozen=True)
class RLOO:
    clip_range: float = 0.2
    whiten_advantages: bool = True
    name: str = "rloo"
    value_head: bool = False

    def targets(self, ro: Rollout, kl_coef: float) -> Targets:
        seq_kl = sequence_kl(ro)
        rewards = _scores(ro) - kl_coef * seq_kl
        adv, _ = leave_one_out(rewards.view(-1, ro.k))
        adv = adv.reshape(-1)
        if self.whiten_advantages and len(adv) > 1:
            adv = whiten(adv)
        return Targets(seq_kl, rewards, adv)

    def loss(self, ro: Rollout, t: Targets, mb: Minibatch, logp: torch.Tensor,
             values: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
        n = mb.rows * ro.k
        seq_lp = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(
            0, mb.owner, logp)
        seq_old = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(
            0, mb.owner, ro.old_logp[mb.tokens])
        pg, clip_frac = clipped_policy_loss(seq_lp, seq_old, t.advantages[mb.responses],
                                            self.clip_range)
        return pg, {"policy_loss": (float(pg.detach()) * mb.rows, mb.rows),
                    "clip_frac": (float(clip_frac) * n, n)}


@dataclass(frozen=True)
class PPO:
    clip_range: float = 0.2
    whiten_advantages: bool = True
    whiten_rewards: bool = True
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    vf_clip: float = 0.2
    name: str = "ppo"
    value_head: bool = True

    def targets(self, ro: Rollout, kl_coef: float) -> Targets:
        assert ro.old_values is not None, "PPO reads the value head's values"
        seq_kl = sequence_kl(ro)
        scores = _scores(ro)
        if self.whiten_rewards and len(scores) > 1:
            scores = whiten(scores)
        n = ro.responses
        tok_r, mask = to_padded(-kl_coef * (ro.old_logp - ro.ref_logp), ro.owner, n)
        last = mask.sum(1) - 1
        tok_r[torch.arange(n, device=tok_r.device), last] += scores
        values, _ = to_padded(ro.old_values, ro.owner, n)
        adv, ret = gae(tok_r, values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            adv = whiten(adv, mask)
        return Targets(seq_kl, tok_r[mask], adv[mask], ret[mask])

    def loss(self, ro: Rollout, t: Targets, mb: Minibatch, logp: torch.Tensor,
             values: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
        assert values is not None and t.returns is not None and ro.old_values is not None
        tok = mb.tokens
        pg, clip_frac = clipped_policy_loss(logp, ro.old_logp[tok], t.advantages[tok],
                                            self.clip_range)
        vloss, vclip = clipped_value_loss(values, ro.old_values[tok], t.returns[tok],
                                          self.vf_clip)
        n = len(tok)
        return pg + self.vf_coef * vloss, {
            "policy_loss": (float(pg.detach()) * mb.rows, mb.rows),
            "value_loss": (float(vloss.detach()) * n, n),
            "value_clip_frac": (float(vclip) * n, n),
            "clip_frac": (float(clip_frac) * n, n)}
