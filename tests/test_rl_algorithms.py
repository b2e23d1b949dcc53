"""The trainer's own RL pieces, alone, against values computed by hand: the rollout's layout,
RLOO's and PPO's targets (reward = PM - beta * KL, the leave-one-out baseline, GAE, the
whitening) and their losses. `hhrlhf rl` calls exactly these objects (`algorithm_of`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hhrlhf.rl.algorithms import PPO, RLOO, Minibatch, sequence_kl
from hhrlhf.rl.rollout import Rollout, owners
from hhrlhf.rl.train import RLConfig, algorithm_of


def rollout(lengths: list[list[int]], old: list[float], ref: list[float], scores: list[float],
            values: list[float] | None = None) -> Rollout:
    """A rollout of ``len(lengths)`` prompts with responses of the given token counts."""
    k = len(lengths[0])
    rows = [(np.array([1, 2]), [np.arange(n) for n in ns]) for ns in lengths]
    per_row = [sum(ns) for ns in lengths]
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)
    return Rollout(rows, k, np.array(scores, dtype=np.float64),
                   np.concatenate([[0], np.cumsum(per_row)]), owners(rows, torch.device("cpu")),
                   t(old), t(ref), t([0.0] * len(old)), None if values is None else t(values),
                   ["eos"] * (len(lengths) * k))


def everything(ro: Rollout) -> Minibatch:
    rows = np.arange(len(ro.rows))
    return Minibatch(len(rows), torch.from_numpy(ro.tokens_of(rows)),
                     torch.from_numpy(ro.responses_of(rows)), ro.owner)


# two prompts, two responses each: response 0 has 2 tokens, 1 has 1, 2 has 1, 3 has 2
RO = rollout([[2, 1], [1, 2]], old=[-1.0, -2.0, -0.5, -1.5, -0.2, -0.3],
             ref=[-1.5, -2.0, -1.0, -1.0, -0.4, -0.6], scores=[1.0, 0.0, 2.0, 3.0])


def test_the_rollout_layout() -> None:
    assert RO.owner.tolist() == [0, 0, 1, 2, 3, 3]
    assert RO.tokens_of(np.array([1])).tolist() == [3, 4, 5]
    assert RO.responses_of(np.array([1])).tolist() == [2, 3]
    # summed log pi_old - log ref per response: 0.5 + 0, 0.5, -0.5, 0.2 + 0.3
    assert sequence_kl(RO).tolist() == pytest.approx([0.5, 0.5, -0.5, 0.5])


def test_rloo_reward_is_pm_minus_beta_kl_and_the_baseline_leaves_one_out() -> None:
    t = RLOO(whiten_advantages=False).targets(RO, kl_coef=0.1)
    rewards = [1.0 - 0.05, 0.0 - 0.05, 2.0 + 0.05, 3.0 - 0.05]
    assert t.rewards.tolist() == pytest.approx(rewards)
    # k = 2: each response's baseline is the other response's reward
    assert t.advantages.tolist() == pytest.approx(
        [rewards[0] - rewards[1], rewards[1] - rewards[0], rewards[2] - rewards[3],
         rewards[3] - rewards[2]])
    whitened = RLOO(whiten_advantages=True).targets(RO, kl_coef=0.1).advantages
    assert float(whitened.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(whitened.std()) == pytest.approx(1.0, abs=1e-4)  # unbiased, as TRL


def test_rloo_loss_is_the_clipped_surrogate_on_sequence_log_probs() -> None:
    algo = RLOO(clip_range=0.2, whiten_advantages=False)
    t = algo.targets(RO, kl_coef=0.0)
    adv = t.advantages
    loss, stats = algo.loss(RO, t, everything(RO), RO.old_logp.clone(), None)
    assert float(loss) == pytest.approx(float(-adv.mean()))  # ratio 1: -mean(A)
    assert stats["clip_frac"] == (0.0, 4)
    # every token's log-prob up by 0.5: sequence ratios e^1 (two tokens) or e^0.5 (one),
    # clipped at 1.2 where the advantage is positive
    lp = RO.old_logp + 0.5
    loss, stats = algo.loss(RO, t, everything(RO), lp, None)
    ratio = torch.tensor([math.e, math.e ** 0.5, math.e ** 0.5, math.e])
    want = -torch.min(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert stats["clip_frac"][0] == pytest.approx(float((adv > 0).sum()))


def test_ppo_targets_by_hand() -> None:
    ro = rollout([[2]], old=[-1.0, -1.0], ref=[-1.1, -1.2], scores=[1.0], values=[0.5, 0.25])
    algo = PPO(whiten_rewards=False, whiten_advantages=False, gamma=1.0, lam=1.0)
    t = algo.targets(ro, kl_coef=0.5)
    # per-token reward -0.5 * (old - ref) = -0.05, -0.1; the PM score at the last token
    assert t.rewards.tolist() == pytest.approx([-0.05, 0.9])
    # GAE, gamma = lambda = 1: A_1 = 0.9 - 0.25; A_0 = -0.05 + 0.25 - 0.5 + A_1
    assert t.advantages.tolist() == pytest.approx([0.35, 0.65])
    assert t.returns is not None and t.returns.tolist() == pytest.approx([0.85, 0.9])
    # a discount: gamma = 0.5, lambda = 1
    t = PPO(whiten_rewards=False, whiten_advantages=False, gamma=0.5, lam=1.0).targets(
        ro, kl_coef=0.5)
    a1 = 0.9 - 0.25
    assert t.advantages.tolist() == pytest.approx([-0.05 + 0.5 * 0.25 - 0.5 + 0.5 * a1, a1])


def test_ppo_loss_adds_the_weighted_value_loss() -> None:
    ro = rollout([[2]], old=[-1.0, -1.0], ref=[-1.1, -1.2], scores=[1.0], values=[0.5, 0.25])
    algo = PPO(whiten_rewards=False, whiten_advantages=False, gamma=1.0, lam=1.0, vf_coef=0.1)
    t = algo.targets(ro, kl_coef=0.5)
    values = torch.tensor([0.5, 0.25])
    loss, stats = algo.loss(ro, t, everything(ro), ro.old_logp.clone(), values)
    value_loss = 0.5 * ((0.5 - 0.85) ** 2 + (0.25 - 0.9) ** 2) / 2
    assert float(loss) == pytest.approx(-(0.35 + 0.65) / 2 + 0.1 * value_loss, rel=1e-5)
    assert stats["value_loss"][0] / stats["value_loss"][1] == pytest.approx(value_loss, rel=1e-5)


def test_the_trainer_builds_the_configured_algorithm() -> None:
    ppo = algorithm_of(RLConfig(policy="p", pm="m", algo="ppo", gamma=0.9, lam=0.8,
                                vf_coef=0.3, clip_range=0.1))
    assert isinstance(ppo, PPO) and (ppo.gamma, ppo.lam, ppo.vf_coef, ppo.clip_range) == (
        0.9, 0.8, 0.3, 0.1)
    assert ppo.value_head
    rloo = algorithm_of(RLConfig(policy="p", pm="m", algo="rloo", whiten_advantages=False))
    assert isinstance(rloo, RLOO) and not rloo.whiten_advantages and not rloo.value_head


@pytest.mark.parametrize("key", ["grad_accum", "group_by_length", "eval_data", "eval_every",
                                 "eval_batch_size", "holdout_folds", "max_rows",
                                 "eval_max_rows"])
def test_rl_config_has_only_the_keys_it_reads(key: str) -> None:
    """`rl --set grad_accum=4` (and the other keys RL inherited without reading) is an error,
    not a setting silently ignored."""
    from hhrlhf.errors import HHRLHFError
    from hhrlhf.runs import apply_overrides

    with pytest.raises(HHRLHFError, match=f"unknown config key {key!r}"):
        apply_overrides(RLConfig(), {key: "4"})
