"""GRPO math against float64 references written here from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from learner.grpo import (
    group_advantages,
    group_advantages_by_id,
    kl_k1,
    kl_k2,
    kl_k3,
    policy_loss,
)


def ref_advantages(rewards: list[float], g: int, eps: float = 1e-4) -> list[float]:
    out = []
    for start in range(0, len(rewards), g):
        block = rewards[start : start + g]
        mean = sum(block) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in block) / (g - 1))
        out += [(r - mean) / (std + eps) for r in block]
    return out


def test_group_advantages_match_formula() -> None:
    torch.manual_seed(0)
    rewards = torch.randint(0, 3, (32,)).float()
    rewards[:4] = 1.0  # one group with no spread: advantages exactly 0
    got = group_advantages(rewards, 4)
    expected = torch.tensor(ref_advantages(rewards.tolist(), 4), dtype=torch.float64)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert torch.all(got[:4] == 0)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, 1)
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(rewards, 5)


def test_group_advantages_by_id_any_order() -> None:
    torch.manual_seed(1)
    rewards = torch.rand(12)
    ids = ["q1", "q2", "q3"] * 4  # interleaved groups
    got = group_advantages_by_id(rewards, ids)
    for q in ("q1", "q2", "q3"):
        idx = [i for i, g in enumerate(ids) if g == q]
        expected = ref_advantages([rewards[i].item() for i in idx], len(idx))
        assert torch.allclose(got[idx].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    # groups keyed by id, never by text: two ids with the same rewards stay apart
    with pytest.raises(ValueError, match="fewer than 2"):
        group_advantages_by_id(torch.rand(3), ["a", "a", "b"])


def test_kl_estimators() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5, -30.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5, -1.0], dtype=torch.float64)
    for i in range(4):
        d = max(-10.0, min(10.0, ref[i].item() - logp[i].item()))
        assert kl_k3(logp, ref)[i].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-12)
        assert kl_k1(logp, ref)[i].item() == pytest.approx(logp[i].item() - ref[i].item())
        assert kl_k2(logp, ref)[i].item() == pytest.approx(0.5 * (logp[i].item() - ref[i].item()) ** 2)
    assert kl_k3(logp, ref)[3].item() == pytest.approx(math.exp(10) - 11)  # clamped at +10


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    ref = logp + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float64
    )
    return logp, ref, adv, mask


def ref_loss(logp, old, ref, adv, mask, beta, clip=None, agg="seq-mean-token-mean"):
    rows = []
    all_tokens = []
    width = len(logp[0])
    for b in range(len(logp)):
        terms = []
        for t in range(width):
            if mask[b][t] == 0:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            surr = ratio * adv[b]
            if clip is not None:
                surr = min(surr, max(1 - clip, min(1 + clip, ratio)) * adv[b])
            d = max(-10, min(10, ref[b][t] - logp[b][t]))
            terms.append(-(surr - beta * (math.exp(d) - d - 1)))
        rows.append(terms)
        all_tokens += terms
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if agg == "token-mean":
        return sum(all_tokens) / len(all_tokens)
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    return sum(sum(r) / width for r in rows) / len(rows)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("clip", [None, 0.2])
def test_policy_loss_matches_formula(agg: str, clip: float | None) -> None:
    logp, ref, adv, mask = batch()
    old = logp + 0.2 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss, metrics = policy_loss(logp, old, ref, adv, mask, beta=0.04, clip_eps=clip, agg=agg)
    expected = ref_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.04, clip, agg)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert 0.0 <= metrics["clip_fraction"] <= 1.0
    if clip is None:
        assert metrics["clip_fraction"] == 0.0
    else:
        assert metrics["clip_fraction"] > 0.0


def test_reference_loss_on_policy_and_its_gradient() -> None:
    """old_logp = logp.detach(): ratio is 1, the loss is −A + β·KL and the gradient is −A·∇logp + β·∇KL."""
    logp, ref, adv, mask = batch(1)
    logp = logp.clone().requires_grad_(True)
    loss, metrics = policy_loss(logp, logp.detach(), ref, adv, mask, beta=0.001)
    expected = ref_loss(logp.tolist(), logp.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.001)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["ratio/mean"] == 1.0
    loss.backward()
    lengths = mask.sum(1, keepdim=True)
    d = (ref - logp.detach()).clamp(-10, 10)
    dkl = -(torch.exp(d) - 1)  # ∂/∂logp of exp(d) − d − 1
    expected_grad = (-adv.unsqueeze(1) + 0.001 * dkl) * mask / lengths / 4
    assert torch.allclose(logp.grad, expected_grad, atol=1e-12)
    kl_expected = ((torch.exp(d) - d - 1) * mask).sum() / mask.sum()
    assert metrics["kl"] == pytest.approx(kl_expected.item(), rel=1e-9)


def test_beta_zero_and_no_reference() -> None:
    logp, ref, adv, mask = batch(2)
    with_ref, m1 = policy_loss(logp, logp, ref, adv, mask, beta=0.0)
    without, m2 = policy_loss(logp, logp, None, adv, mask, beta=0.1)
    assert with_ref.item() == pytest.approx(without.item()) and m1["kl"] == m2["kl"] == 0.0


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_parts_of_a_batch_sum_to_the_whole(agg: str) -> None:
    """What a rank's micro-batches contribute adds up to the full-batch loss (data parallelism)."""
    from learner.grpo import LossNorm

    logp, ref, adv, mask = batch(4)
    whole, _ = policy_loss(logp, logp, ref, adv, mask, beta=0.01, agg=agg)
    norm = LossNorm(sequences=4, tokens=float(mask.sum()), length=6)
    parts = [
        policy_loss(logp[i:j], logp[i:j], ref[i:j], adv[i:j], mask[i:j], beta=0.01, agg=agg, norm=norm)[0]
        for i, j in [(0, 1), (1, 3), (3, 4)]
    ]
    assert sum(p.item() for p in parts) == pytest.approx(whole.item(), rel=1e-12)


def test_importance_weights_scale_the_policy_term() -> None:
    logp, ref, adv, mask = batch(5)
    logp = logp.clone().requires_grad_(True)
    weights = torch.full_like(logp, 0.5)
    weighted, _ = policy_loss(logp, logp.detach(), None, adv, mask, beta=0.0, is_weights=weights)
    plain, _ = policy_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    assert weighted.item() == pytest.approx(0.5 * plain.item(), rel=1e-12)
