"""Learner → engine weight push through the gloo transport, checked against a saved checkpoint."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from test_learner_group_cpu import settings

from avqa import load_records
from learner.group import LearnerGroup
from learner.types import Experience
from omni.inputs import load_processor
from orchestrator.weight_sync import WeightSync
from rollout.engine import RolloutEngine
from rollout.pool import EnginePool
from rollout.types import EngineSettings, SamplingSettings

GREEDY = SamplingSettings(temperature=0.0, top_p=1.0, max_new_tokens=10, seed=0, ignore_eos=True)


def engine(ray, model: Path, index: int):
    return ray.remote(RolloutEngine).options(num_cpus=1).remote(
        EngineSettings(model_path=model, max_model_len=1024, enforce_eager=True), index
    )


def test_pushed_weights_equal_the_saved_checkpoint(ray_local, tiny_checkpoint, train_json, tmp_path) -> None:
    records = load_records(train_json)[:3]
    tokenizer = load_processor(tiny_checkpoint).tokenizer
    good = tokenizer.encode("<think>x</think><answer>A</answer><|im_end|>", add_special_tokens=False)
    bad = tokenizer.encode("<answer>B</answer><|im_end|>", add_special_tokens=False)
    learner = LearnerGroup(settings(tiny_checkpoint, num_ranks=2, lr=0.05), [{"num_cpus": 1}] * 2)
    pushed = engine(ray_local, tiny_checkpoint, 0)
    fresh = None
    try:
        pool = EnginePool([pushed])
        sync = WeightSync(learner, pool, backend="gloo", bucket_bytes=256 << 10, timeout_s=120)
        before = pool.generate(records, 1, GREEDY)
        batch = [Experience(r, ids, advantage=a) for r in records for ids, a in ((good, 1.0), (bad, -1.0))]
        for _ in range(3):
            learner.train_step(batch)
        report = sync.push()
        assert report.version == 1 and report.tensors == sum(len(s.tensors) for s in sync.specs)
        assert report.bytes >= sum(s.nbytes for s in sync.specs) * 0.99 and len(sync.specs) > 1
        after = pool.generate(records, 1, GREEDY)
        learner.save(str(tmp_path / "saved"))
        fresh = engine(ray_local, tmp_path / "saved", 1)
        expected = ray_local.get(fresh.generate.remote(records, 1, GREEDY))
        tokens = lambda results: [r.completions[0].token_ids for r in results]  # noqa: E731
        logps = lambda results: [r.completions[0].logprobs for r in results]  # noqa: E731
        assert tokens(after) != tokens(before)
        assert tokens(after) == tokens(expected)
        for got, want in zip(logps(after), logps(expected), strict=True):
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    finally:
        learner.kill()
        ray_local.kill(pushed)
        if fresh is not None:
            ray_local.kill(fresh)


def sync_census(ray, actor) -> dict[str, int]:
    """The sync groups of an actor's process (a learner rank, or an engine: vLLM runs in it)."""

    def read(_self) -> dict[str, int]:
        from omni.weightsync import census

        return census()

    return ray.get(actor.__ray_call__.remote(read))


def test_a_rebuilt_sync_group_closes_the_old_one_first(ray_local, tiny_checkpoint) -> None:
    """An engine restart rebuilds the group with every engine (`WeightSync.connect`): learner rank
    0 and each engine that survived close their old group before they make the new one, so none
    holds two communicators, even for a moment, and the old group's rendezvous port is shut."""
    learner = LearnerGroup(settings(tiny_checkpoint), [{"num_cpus": 1}])
    survivor = engine(ray_local, tiny_checkpoint, 0)
    try:
        sync = WeightSync(learner, EnginePool([survivor]), backend="gloo", bucket_bytes=1 << 20, timeout_s=60)
        assert sync.push().tensors > 0
        old = sync.info
        sync.connect()  # what the trainer does after it replaced a dead engine
        assert sync.info.port != old.port
        assert sync.push().version == 2  # the new group carries the weights
        for member in (learner.workers[0], survivor):
            assert sync_census(ray_local, member) == {"open": 1, "made": 2, "closed": 1, "most_open": 1}
        with pytest.raises(ConnectionRefusedError):  # rank 0 served the old group's store
            socket.create_connection((old.host, old.port), timeout=5).close()
    finally:
        learner.kill()
        ray_local.kill(survivor)
