"""The GRPO family (issue 16): each choice against a float64 formula written out here, with its
edge cases (a group of one, all rewards equal, all tokens masked, a one-token completion)."""

from __future__ import annotations

import math

import pytest
import torch

from learner.advantages import ADVANTAGES, advantages
from learner.correction import SamplerLogprobs, rollout_weights
from learner.group import combine, split_by_question
from learner.grpo import LossNorm, aggregate, policy_loss
from learner.types import LearnerSettings

F = torch.float64
IDS = ["a", "a", "a", "b", "b"]
R = torch.tensor([1.0, 0.0, 2.0, 3.0, 5.0], dtype=F)


def by_group(values: list[float]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for g, v in zip(IDS, values, strict=True):
        out.setdefault(g, []).append(v)
    return out


def test_advantage_formulas() -> None:
    groups = by_group(R.tolist())
    mean = {g: sum(v) / len(v) for g, v in groups.items()}
    std = {g: math.sqrt(sum((x - mean[g]) ** 2 for x in v) / (len(v) - 1)) for g, v in groups.items()}
    r = R.tolist()
    grpo = [(x - mean[g]) / (std[g] + 1e-4) for x, g in zip(r, IDS, strict=True)]
    dr = [x - mean[g] for x, g in zip(r, IDS, strict=True)]
    loo = [x - (sum(groups[g]) - x) / (len(groups[g]) - 1) for x, g in zip(r, IDS, strict=True)]
    m = sum(dr) / len(dr)
    s = math.sqrt(sum((x - m) ** 2 for x in dr) / (len(dr) - 1))
    pp = [(x - m) / (s + 1e-4) for x in dr]
    for name, expected in (("grpo", grpo), ("dr_grpo", dr), ("rloo", loo), ("reinforce_pp", pp)):
        assert advantages(name, R, IDS).tolist() == pytest.approx(expected, abs=1e-12), name


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_advantage_edge_cases(name: str) -> None:
    flat = torch.full((4,), 0.5, dtype=F)
    assert advantages(name, flat, ["x", "x", "y", "y"]).tolist() == [0.0] * 4  # no signal: every advantage 0
    with pytest.raises(ValueError, match="fewer than 2"):
        advantages(name, torch.tensor([1.0, 0.0, 1.0], dtype=F), ["x", "x", "lonely"])
    with pytest.raises(ValueError, match="unknown advantage"):
        advantages("nope", flat, ["x"] * 4)


def batch() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4, dtype=F)).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(3, 4, dtype=F)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=F)  # row 1: a one-token completion
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=F)
    return logp, old, mask, adv


def test_ppo_clip_with_clip_higher() -> None:
    logp, old, mask, adv = batch()
    low, high = 0.1, 0.3
    loss, metrics = policy_loss(logp, old, None, adv, mask, beta=0.0, clip_eps=(low, high), loss="ppo_clip")
    ratio = torch.exp(logp.detach() - old)
    term = torch.minimum(ratio * adv[:, None], ratio.clamp(1 - low, 1 + high) * adv[:, None])
    expected = (-(term * mask).sum(1) / mask.sum(1)).mean()
    assert float(loss) == pytest.approx(float(expected), abs=1e-12)
    clipped = ((ratio.clamp(1 - low, 1 + high) * adv[:, None] < ratio * adv[:, None]) * mask).sum() / mask.sum()
    assert metrics["clip_fraction"] == pytest.approx(float(clipped))


def test_gspo_value_and_gradient() -> None:
    logp, old, mask, adv = batch()
    eps = (0.2, 0.2)
    loss, metrics = policy_loss(logp, old, None, adv, mask, beta=0.0, clip_eps=eps, loss="gspo")
    loss.backward()
    s = torch.exp(((logp.detach() - old) * mask).sum(1) / mask.sum(1))  # the sequence ratio
    term = torch.minimum(s * adv, s.clamp(0.8, 1.2) * adv)
    assert float(loss) == pytest.approx(float(-term.mean()), abs=1e-12)
    # d/d log π_t: −s·A/|y|/B where the sequence is not clipped, 0 where it is
    active = (s * adv <= s.clamp(0.8, 1.2) * adv).to(F)
    expected = -(active * s * adv / mask.sum(1) / 3)[:, None] * mask
    assert torch.allclose(logp.grad, expected, atol=1e-12)
    assert metrics["ratio/max"] == pytest.approx(float(s.max()))


def test_reference_loss_refuses_a_clip_and_clips_need_one() -> None:
    logp, old, mask, adv = batch()
    with pytest.raises(ValueError, match="has no clip"):
        policy_loss(logp, old, None, adv, mask, beta=0.0, clip_eps=0.2, loss="reference")
    with pytest.raises(ValueError, match="needs a clip"):
        policy_loss(logp, old, None, adv, mask, beta=0.0, loss="gspo")


def test_seq_mean_token_sum_parts_sum_to_the_whole_and_all_masked_is_zero() -> None:
    per_token = torch.randn(4, 5, dtype=F)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=F)
    norm = LossNorm(sequences=4, tokens=float(mask.sum()), length=5)
    whole = aggregate(per_token, mask, "seq-mean-token-sum", norm)
    assert float(whole) == pytest.approx(float((per_token * mask).sum() / 4))
    parts = aggregate(per_token[:2], mask[:2], "seq-mean-token-sum", norm) + aggregate(per_token[2:], mask[2:], "seq-mean-token-sum", norm)
    assert float(parts) == pytest.approx(float(whole), abs=1e-12)
    zero = torch.zeros(2, 3, dtype=F)
    for agg in ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert float(aggregate(torch.randn(2, 3, dtype=F), zero, agg)) == 0.0


def test_rollout_correction_weights() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.2, 0.2, 0.9]], dtype=torch.float32))
    mu = torch.log(torch.tensor([[0.1, 0.5, 0.4], [0.2, 0.4, 0.9]], dtype=torch.float32))  # π/μ: 5, 1, 1.25 | 1, .5, 1
    mask = torch.ones(2, 3)
    known = torch.tensor([[True, True, True], [True, False, True]])
    sampled = SamplerLogprobs(logprobs=mu, known=known, missing=~known)
    s = LearnerSettings(model_path="x", is_clip=2.0, correction_low=0.6, correction_high=1.5)
    tis = rollout_weights(logp, sampled, mask, "tis", s)
    assert torch.allclose(tis, torch.tensor([[2.0, 1.0, 1.25], [1.0, 1.0, 1.0]]), atol=1e-6)  # unknown → 1
    tok = rollout_weights(logp, sampled, mask, "token_mask", s)
    assert tok.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    seq = rollout_weights(logp, sampled, mask, "seq_mask", s)  # row 0: exp(mean log r) = (5·1·1.25)^(1/3) = 1.84
    assert seq.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert rollout_weights(logp, sampled, mask, "none", s) is None


def test_effective_sample_size_combines_over_ranks() -> None:
    w = [[2.0, 1.0], [1.0, 0.0, 1.0]]
    parts = [{"learner/tokens": len(r), "_weight_sum": sum(r), "_weight_sq_sum": sum(x * x for x in r)} for r in w]
    flat = [x for r in w for x in r]
    expected = sum(flat) ** 2 / (len(flat) * sum(x * x for x in flat))
    assert combine(parts)["rollout_correction/ess"] == pytest.approx(expected)


def test_mini_batches_hold_whole_questions() -> None:
    from pathlib import Path

    from avqa import Record
    from learner.types import Experience

    def exp(rid: str) -> Experience:
        rec = Record(id=rid, question="q", options=("A. a",), answer="A", image_path=Path("i"), audio_path=Path("a"))
        return Experience(rec, [1], 0.0)

    batch_ = [exp(q) for q in "aaabbccd"]
    parts = split_by_question(batch_, 2)
    assert sorted(len(p) for p in parts) == [4, 4]
    for p in parts:
        for q in {e.record.id for e in p}:
            assert sum(e.record.id == q for e in p) == sum(e.record.id == q for e in batch_)
    with pytest.raises(ValueError, match="5 mini-batches for 4 questions"):
        split_by_question(batch_, 5)


def test_token_entropy_in_chunks_equals_the_formula() -> None:
    from omni import forward

    torch.manual_seed(1)
    logits = torch.randn(2, 300, 7, dtype=torch.float32)
    p = torch.softmax(logits.double(), dim=-1)
    expected = -(p * torch.log(p)).sum(-1)
    got = forward._entropy(logits, grad=False)
    assert got.shape == (2, 300) and torch.allclose(got.double(), expected, atol=1e-5)
    z = logits.clone().requires_grad_(True)
    forward._entropy(z, grad=True).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
