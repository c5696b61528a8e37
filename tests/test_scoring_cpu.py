"""Scoring a step without Ray: rewards → advantages per question id → experiences and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avqa import Record
from orchestrator.scoring import (
    RolloutFailed,
    ScoringRules,
    fill_informative,
    group_metrics,
    overlong_penalty,
    score_step,
)
from rewards import RewardSet
from rollout.types import Completion, RolloutResult

RIGHT = "<think>the tone is high</think><answer>{}</answer>"
WRONG = "no tags at all"


def record(rid: str, answer: str = "B") -> Record:
    return Record(id=rid, question="q", options=("A. a", "B. b"), answer=answer, image_path=Path("i.png"),
                  audio_path=Path("a.wav"), source_file="train.json", index=int(rid[1:]))


def completion(text: str, tokens: int = 3, finish: str = "stop") -> Completion:
    return Completion(text=text, token_ids=list(range(tokens)), logprobs=[-0.5] * tokens, finish_reason=finish)


def test_advantages_are_normalised_per_question_id_in_float64() -> None:
    records = [record("q1"), record("q2")]
    results = [
        RolloutResult("q1", completions=[completion(RIGHT.format("B")), completion(WRONG), completion(RIGHT.format("A"))]),
        RolloutResult("q2", completions=[completion(RIGHT.format("B"), 5, "length"), completion(RIGHT.format("B"))]),
    ]
    scored = score_step(1, records, results, RewardSet(), ScoringRules(skip_failed=False))
    # rewards: q1 → 2 (right + format), 0, 1 (format only); q2 → 2, 2
    r = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    expected = ((r - r.mean()) / (r.std() + 1e-4)).tolist() + [0.0, 0.0]
    assert [e.advantage for e in scored.experiences] == pytest.approx(expected, abs=1e-12)
    assert [e.record.id for e in scored.experiences] == ["q1", "q1", "q1", "q2", "q2"]
    assert scored.experiences[3].completion_ids == [0, 1, 2, 3, 4]
    assert scored.experiences[3].sampler_logprobs == [-0.5] * 5
    m = scored.metrics
    assert m["reward/total"] == pytest.approx(7 / 5)
    assert m["reward/accuracy"] == pytest.approx(3 / 5)
    assert m["reward/format"] == pytest.approx(4 / 5)
    assert m["reward/zero_advantage_groups"] == pytest.approx(0.5)
    assert m["reward/group_std"] == pytest.approx((float(r.std()) + 0.0) / 2)
    assert m["completion_length/max"] == 5 and m["completion_length/mean"] == pytest.approx(17 / 5)
    assert m["completion_length/clipped_ratio"] == pytest.approx(1 / 5)
    assert m["data/completions"] == 5 and m["rollout/failed_questions"] == 0


def test_a_question_drawn_twice_is_one_group() -> None:
    """Groups are question ids, not positions: the same question twice in a batch is one group."""
    records = [record("q1"), record("q1")]
    results = [RolloutResult("q1", completions=[completion(RIGHT.format("B")), completion(WRONG)]),
               RolloutResult("q1", completions=[completion(WRONG), completion(WRONG)])]
    scored = score_step(3, records, results, RewardSet(), ScoringRules(skip_failed=False))
    r = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert [e.advantage for e in scored.experiences] == pytest.approx(((r - r.mean()) / (r.std() + 1e-4)).tolist())
    assert scored.metrics["reward/zero_advantage_groups"] == 0.0  # by position the second would be flat


def test_a_failed_question_stops_the_step_or_is_listed() -> None:
    records = [record("q1"), record("q7")]
    results = [RolloutResult("q1", completions=[completion(WRONG), completion(RIGHT.format("B"))]),
               RolloutResult("q7", error="MediaError: broken.wav")]
    with pytest.raises(RolloutFailed, match=r"question 'q7' \(train.json, record 7\) failed in rollout: MediaError"):
        score_step(2, records, results, RewardSet(), ScoringRules(skip_failed=False))
    scored = score_step(2, records, results, RewardSet(), ScoringRules(skip_failed=True))
    assert [e.record.id for e in scored.experiences] == ["q1", "q1"]
    assert scored.failed == [{"split": "train", "stage": "rollout", "step": 2, "id": "q7", "file": "train.json",
                              "index": 7, "error": "MediaError: broken.wav"}]
    assert scored.metrics["rollout/failed_questions"] == 1
    with pytest.raises(RolloutFailed, match="every question"):
        score_step(2, records[1:], results[1:], RewardSet(), ScoringRules(skip_failed=True))


def test_group_metrics_of_flat_and_spread_groups() -> None:
    m = group_metrics(torch.tensor([1.0, 1.0, 0.0, 2.0]), ["a", "a", "b", "b"])
    assert m["reward/zero_advantage_groups"] == 0.5
    assert m["reward/group_std"] == pytest.approx((0.0 + 2**0.5) / 2)


def test_overlong_penalty_and_mask() -> None:
    rules = ScoringRules(overlong="penalty", max_new_tokens=10, overlong_buffer=4, overlong_penalty=0.5)
    assert [overlong_penalty(n, rules) for n in (3, 6, 8, 10)] == [0.0, 0.0, -0.25, -0.5]
    records = [record("q1")]
    results = [RolloutResult("q1", completions=[completion(RIGHT.format("B"), 10, "length"), completion(WRONG, 2)])]
    scored = score_step(1, records, results, RewardSet(), rules)
    r = torch.tensor([2.0 - 0.5, 0.0], dtype=torch.float64)
    assert [e.advantage for e in scored.experiences] == pytest.approx(((r - r.mean()) / (r.std() + 1e-4)).tolist())
    assert scored.metrics["reward/overlong_penalty"] == pytest.approx(-0.25)
    masked = score_step(1, records, results, RewardSet(), ScoringRules(overlong="mask", max_new_tokens=10))
    assert [e.overlong_masked for e in masked.experiences] == [True, False]  # in the baseline, out of the loss
    assert [e.in_loss for e in masked.experiences] == [False, True]
    assert masked.metrics["data/masked_overlong"] == 1 and masked.metrics["data/completions"] == 1
    assert masked.experiences[1].advantage < 0  # its group still holds the cut completion's reward


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_scoring_uses_the_named_estimator(name: str) -> None:
    from learner.advantages import advantages

    records = [record("q1"), record("q2")]
    results = [RolloutResult("q1", completions=[completion(RIGHT.format("B")), completion(WRONG)]),
               RolloutResult("q2", completions=[completion(WRONG), completion(RIGHT.format("A"))])]
    scored = score_step(1, records, results, RewardSet(), ScoringRules(advantage=name))
    r = torch.tensor([2.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    expected = advantages(name, r, ["q1", "q1", "q2", "q2"]).tolist()
    assert [e.advantage for e in scored.experiences] == pytest.approx(expected)


def test_dynamic_sampling_drops_flat_groups_and_draws_more() -> None:
    def step(*groups: tuple[str, list[str]]):
        records = [record(q) for q, _ in groups]
        results = [RolloutResult(q, completions=[completion(t) for t in texts]) for q, texts in groups]
        return score_step(1, records, results, RewardSet(), ScoringRules())

    first = step(("q1", [WRONG, WRONG]), ("q2", [RIGHT.format("B"), WRONG]), ("q3", [WRONG, WRONG]))
    draws = iter([step(("q4", [WRONG, WRONG]), ("q5", [WRONG, WRONG])), step(("q6", [WRONG, RIGHT.format("B")]))])
    asked: list[int] = []

    def draw(count: int):
        asked.append(count)
        return next(draws)

    filled = fill_informative(first, draw, want=2, max_rounds=3)
    assert asked == [1, 1]  # one question short, twice (the first draw had none with signal)
    assert sorted({e.record.id for e in filled.experiences}) == ["q2", "q6"]
    assert filled.metrics["filter/dropped_groups"] == 4 and filled.metrics["filter/extra_rollouts"] == 2
    assert filled.metrics["reward/total"] == first.metrics["reward/total"]  # the first rollout's rewards
    capped = fill_informative(first, lambda n: step(("q9", [WRONG, WRONG])), want=3, max_rounds=1)
    assert [e.record.id for e in capped.experiences] == ["q2", "q2"]
    assert capped.metrics["filter/extra_rollouts"] == 1
    nothing = fill_informative(step(("q1", [WRONG, WRONG])), lambda n: step(("q9", [WRONG, WRONG])), 1, 1)
    assert len(nothing.experiences) == 2  # no signal anywhere: the batch as it came


def test_completions_keep_what_was_scored_through_the_filters() -> None:
    """`ScoredStep.completions` (what watch/samples.py shows): each completion's text, reward
    parts, the total its advantage came from (overlong penalty included) and that advantage; the
    dynamic-sampling filter keeps them, like the step's metrics, as the first rollout had them."""
    rules = ScoringRules(overlong="penalty", max_new_tokens=10, overlong_buffer=4)
    records = [record("q1"), record("q2")]
    results = [
        RolloutResult("q1", completions=[completion(RIGHT.format("B"), 8, "length"), completion(WRONG)]),
        RolloutResult("q2", completions=[completion(RIGHT.format("B")), completion(RIGHT.format("B"))]),
    ]
    scored = score_step(1, records, results, RewardSet(), rules)
    done = scored.completions
    assert [c.text for c in done] == [RIGHT.format("B"), WRONG, RIGHT.format("B"), RIGHT.format("B")]
    assert done[0].rewards == {"accuracy": 1.0, "format": 1.0} and done[1].rewards == {"accuracy": 0.0, "format": 0.0}
    assert done[0].reward == pytest.approx(2.0 + overlong_penalty(8, rules)) and done[0].reward == pytest.approx(1.5)
    assert (done[0].tokens, done[0].finish_reason) == (8, "length")
    assert [c.advantage for c in done] == [e.advantage for e in scored.experiences]
    assert done[0].advantage > 0 > done[1].advantage
    filled = fill_informative(scored, lambda n: pytest.fail("nothing to draw"), 1, 0)
    assert [e.record.id for e in filled.experiences] == ["q1", "q1"]  # q2's equal rewards dropped
    assert filled.completions == done


def test_no_signal_has_one_tolerance_for_the_metric_and_the_filter() -> None:
    # {accuracy: 1, format: 0.1}: three format-only completions score 0.1 each, whose mean is not
    # exactly 0.1 in floats, so (r - mean) / (std + eps) is about -1e-13 and not 0
    rewards = RewardSet(weights={"accuracy": 1.0, "format": 0.1})
    flat_q = RolloutResult("q1", completions=[completion(RIGHT.format("A"))] * 3)  # 0.1 each
    spread_q = RolloutResult("q2", completions=[completion(RIGHT.format("B")), completion(RIGHT.format("A")),
                                                completion(WRONG)])  # 1.1, 0.1, 0
    totals = torch.tensor([0.1, 0.1, 0.1], dtype=torch.float64)
    assert float(((totals - totals.mean()) / (totals.std() + 1e-4))[0]) != 0.0  # what the tolerance is for
    scored = score_step(1, [record("q1"), record("q2")], [flat_q, spread_q], rewards, ScoringRules())
    assert scored.flat == {"q1"}
    assert [e.advantage for e in scored.experiences[:3]] == [0.0, 0.0, 0.0]
    assert all(e.advantage != 0.0 for e in scored.experiences[3:])
    assert scored.metrics["reward/zero_advantage_groups"] == 0.5
    kept = fill_informative(scored, lambda n: pytest.fail("no draw needed"), want=1, max_rounds=0)
    assert kept.metrics["filter/dropped_groups"] == 1.0  # the filter drops what the metric counts
    assert {e.record.id for e in kept.experiences} == {"q2"}
