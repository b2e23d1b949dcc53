"""The RL pure functions against examples computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from hhrlhf.rl.advantages import AdaptiveKL, gae, kl_estimate, leave_one_out, to_padded, whiten
from hhrlhf.rl.losses import clipped_policy_loss, clipped_value_loss


def t(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def close(a: torch.Tensor, b: object) -> None:
    torch.testing.assert_close(a, t(b), rtol=1e-6, atol=1e-9)


def test_gae_by_hand() -> None:
    rewards = t([[0.0, 0.0, 1.0], [2.0, 3.0, 9.0]])
    values = t([[0.5, 0.4, 0.3], [1.0, 1.0, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: delta = [-0.1, -0.1, 0.7]; A2 = 0.7, A1 = -0.1 + 0.5 * 0.7, A0 = -0.1 + 0.5 * A1
    # row 1: the padding (reward 9, value 5) must not leak in: delta = [2, 2]; A = [3, 2]
    close(adv, [[0.025, 0.25, 0.7], [3.0, 2.0, 0.0]])
    close(ret, [[0.525, 0.65, 1.0], [4.0, 3.0, 0.0]])
    adv, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.95)
    # delta = [0.9*0.4 - 0.5, 0.9*0.3 - 0.4, 1 - 0.3]; A_t = delta_t + 0.855 * A_{t+1}
    assert adv[0].tolist() == pytest.approx([-0.14 + 0.855 * 0.4685, -0.13 + 0.855 * 0.7, 0.7])


def test_gae_lambda_one_is_monte_carlo_return_minus_value() -> None:
    rewards = t([[0.1, -0.2, 0.3, 2.0]])
    values = t([[0.3, 0.1, -0.4, 0.6]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([2.2, 2.1, 2.3, 2.0])
    assert adv[0].tolist() == pytest.approx([1.9, 2.0, 2.7, 1.4])


def test_leave_one_out_by_hand() -> None:
    adv, base = leave_one_out(t([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]]))
    assert base.tolist() == [[2.5, 2.0, 1.5], [2.0, 2.0, 0.0]]
    assert adv.tolist() == [[-1.5, 0.0, 1.5], [-2.0, -2.0, 4.0]]
    assert adv.sum().item() == pytest.approx(0.0)  # k/(k-1) * (r - mean) sums to 0 per prompt
    with pytest.raises(ValueError):
        leave_one_out(t([[1.0], [2.0]]))


def test_kl_estimators_by_hand() -> None:
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k9")


def test_whiten() -> None:
    x = t([[1.0, 2.0, 3.0], [4.0, 100.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    w = whiten(x, mask)
    # real entries 1, 2, 3, 4: mean 2.5, unbiased variance 5/3; padding stays 0
    s = math.sqrt(5 / 3)
    close(w, [[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    assert whiten(x, mask, shift_mean=False)[0, 0].item() == pytest.approx(-1.5 / s + 2.5)


def test_to_padded_follows_the_packed_token_order() -> None:
    flat = t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    owner = torch.tensor([0, 0, 0, 1, 2, 2])
    out, mask = to_padded(flat, owner, 3)
    assert out.tolist() == [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0]]
    assert mask.sum(1).tolist() == [3, 1, 2]


def test_clipped_losses_by_hand() -> None:
    old = t([0.0, 0.0])
    logp = t([math.log(1.5), math.log(1.5)])
    loss, frac = clipped_policy_loss(logp, old, t([1.0, -1.0]), clip=0.2)
    # A = 1: min(1.5, 1.2) = 1.2 (clipped); A = -1: min(-1.5, -1.2) = -1.5 (not clipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert frac.item() == pytest.approx(0.5)
    vloss, vfrac = clipped_value_loss(t([2.0, 1.0]), t([1.0, 1.0]), t([3.0, 3.0]), clip=0.5)
    # V=2 from 1, clipped to 1.5: errors 1 and 2.25 -> 2.25; V=1: 4 and 4 -> 4
    assert vloss.item() == pytest.approx(0.5 * (2.25 + 4.0) / 2)
    assert vfrac.item() == pytest.approx(0.5)


def test_adaptive_kl() -> None:
    ctl = AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    assert ctl.update(5.4, 100) == pytest.approx(0.1002 * (1 - 0.1 * 100 / 10000))
    assert AdaptiveKL(0.1).update(50.0, 100) == 0.1  # fixed
