"""The DeepSpeed learner group on the CPU (gloo), real Ray actors, the tiny checkpoint."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pytest
import ray
import torch

from avqa import load_records
from learner.group import LearnerDied, LearnerGroup, combine, shard
from learner.types import Experience, LearnerSettings
from omni.inputs import load_processor
from omni.metric_table import LEARNER_METRICS

# what a CPU step without sampler log-probs reports: every learner metric of the table but the
# mismatch ones (nothing to compare with) and GPU memory
ROLLOUT_CORRECTION = {m.name for m in LEARNER_METRICS if m.name.startswith("rollout_correction/")}
MISMATCH = {m.name for m in LEARNER_METRICS if m.name.startswith("mismatch/")}
# without sampler log-probs: no mismatch and no rollout correction; no GPU: no memory; a dense
# thinker: no experts' balance loss (learner.router_aux_loss_coef, tests/test_qwen3_omni_cpu.py)
CPU_ON_POLICY = {m.name for m in LEARNER_METRICS} - ROLLOUT_CORRECTION - MISMATCH - {
    "memory/learner_peak_gb", "memory/learner_held_gb", "learner/router_balance_loss"}

END = 1634  # <|im_end|> in the tiny tokenizer (checked in the fixture)
COMPLETIONS = [
    "<think>the shape is red and the tone is low</think><answer>A</answer>",
    "<think>hmm, wait</think><answer>B</answer>",
    "<think>let me think about the sound</think><answer>C</answer>",
    "<answer>D</answer>",
]


def settings(model: Path, **overrides) -> LearnerSettings:
    base = LearnerSettings(
        model_path=model,
        num_ranks=1,
        zero_stage=2,
        micro_batch_size=2,
        lr=1e-3,
        adam_eps=1e-3,  # near-SGD first step: comparable across data-parallel layouts
        weight_decay=0.0,
        lr_schedule="constant",
        total_steps=10,
        grad_clip=100.0,
        beta=0.01,
        max_new_tokens=64,
        gradient_checkpointing=True,
    )
    return dataclasses.replace(base, **overrides)


def group(ray, s: LearnerSettings) -> LearnerGroup:
    return LearnerGroup(s, [{"num_cpus": 1}] * s.num_ranks)


@pytest.fixture(scope="module")
def experiences(tiny_checkpoint: Path, train_json: Path) -> list[Experience]:
    tokenizer = load_processor(tiny_checkpoint).tokenizer
    records = load_records(train_json)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end == END
    out = []
    for i in range(6):
        ids = tokenizer.encode(COMPLETIONS[i % 4], add_special_tokens=False) + [end]
        if i == 5:
            ids += tokenizer.encode(" ignored after the end", add_special_tokens=False)
        out.append(Experience(records[i // 2], ids, advantage=[1.0, -1.0, 0.5][i % 3]))
    return out


def test_shard_balances_and_pads(experiences) -> None:
    shards = shard(experiences[:5], 2)
    assert [len(s) for s in shards] == [3, 3]
    assert sum(e.padding for s in shards for e in s) == 1
    assert sorted(id(e) for s in shards for e in s if not e.padding) == sorted(id(e) for e in experiences[:5])


def test_shard_keeps_a_questions_completions_together(experiences) -> None:
    # six completions of three questions (two each), plus a third completion of the first question
    batch = [*experiences, experiences[0]]
    shards = shard(batch, 2, keep_prompts=True)
    assert [len(s) for s in shards] == [4, 4]
    real = [[e.record.id for e in s if not e.padding] for s in shards]
    assert sorted(x for s in real for x in s) == sorted(e.record.id for e in batch)
    for ids in real:  # each question on one rank, its completions adjacent
        assert all(ids.count(q) == len([e for e in batch if e.record.id == q]) for q in set(ids))
        assert ids == sorted(ids, key=ids.index)
    fillers = [e for s in shards for e in s if e.padding]
    assert len(fillers) == 1 and fillers[0].advantage == 0.0
    # the filler repeats a prompt its rank computes anyway
    owner = next(s for s in shards if any(e.padding for e in s))
    assert fillers[0].record.id in {e.record.id for e in owner if not e.padding}


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_update_like_one(ray_local, tiny_checkpoint, experiences, stage: int) -> None:
    one = group(ray_local, settings(tiny_checkpoint, num_ranks=1, zero_stage=stage))
    try:
        before = dict(one.named_weights())
        m1 = one.train_step(experiences)
        after1 = dict(one.named_weights())
        logps1 = one.compute_logprobs(experiences)
    finally:
        one.kill()
    two = group(ray_local, settings(tiny_checkpoint, num_ranks=2, zero_stage=stage))
    try:
        m2 = two.train_step(experiences)
        after2 = dict(two.named_weights())
        # every rank computes its share (under ZeRO-3 one rank alone would wait for the others'
        # parameter gathers until the collective timeout); results come back in input order
        logps2 = two.compute_logprobs(experiences)
        # a dead rank ends the call at once instead of leaving the other in a collective
        ray.kill(two.workers[1])
        started = time.monotonic()
        with pytest.raises(LearnerDied, match="a learner rank died during computing log-probs"):
            two.compute_logprobs(experiences)
        assert time.monotonic() - started < 30
    finally:
        two.kill()
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    # tokens after the first end-of-turn do not count
    counted = sum(e.completion_ids.index(END) + 1 for e in experiences)
    assert m1["learner/tokens"] == m2["learner/tokens"] == counted < sum(len(e.completion_ids) for e in experiences)
    assert set(m1) == set(m2) == CPU_ON_POLICY  # exactly the table's learner metrics
    assert m1["ratio/mean"] == m1["ratio/max"] == m1["ratio/min"] == 1.0  # on-policy: π_old is π
    assert [len(lp) for lp in logps1] == [len(lp) for lp in logps2] == [e.completion_ids.index(END) + 1 for e in experiences]
    for a, b in zip(logps1, logps2, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    moved = max((after1[n] - before[n]).abs().max().item() for n in before)
    diff = max((after1[n] - after2[n]).abs().max().item() for n in before)
    assert moved > 1e-4  # the step changed the weights ...
    assert diff < 1e-6  # ... and both layouts changed them the same way
    assert m1["kl"] == pytest.approx(0.0, abs=1e-9)  # policy == reference before the step


@pytest.mark.parametrize("stage", [2, 3])
def test_shared_prompts_update_like_one_copy_per_completion(ray_local, tiny_checkpoint, experiences, stage: int) -> None:
    """Gradient checkpointing, micro-batches of 4 (two questions each): the same step whether each
    micro-batch runs its questions' prompts once or once per completion, under ZeRO-2 and ZeRO-3."""
    results = []
    for share in (False, True):
        g = group(ray_local, settings(tiny_checkpoint, micro_batch_size=4, share_prompts=share, zero_stage=stage))
        try:
            before = dict(g.named_weights())
            metrics = g.train_step(experiences)
            results.append((metrics, dict(g.named_weights())))
        finally:
            g.kill()
    (m_full, after_full), (m_shared, after_shared) = results
    assert m_shared["loss"] == pytest.approx(m_full["loss"], rel=1e-5, abs=1e-7)
    assert m_shared["grad_norm"] == pytest.approx(m_full["grad_norm"], rel=1e-4)
    assert m_shared["learner/input_tokens"] < m_full["learner/input_tokens"]  # the prompts were computed fewer times
    moved = max((after_full[n] - before[n]).abs().max().item() for n in before)
    diff = max((after_full[n] - after_shared[n]).abs().max().item() for n in before)
    assert moved > 1e-4 and diff < 1e-6


@ray.remote(num_cpus=1, max_calls=1)  # a process of its own: DeepSpeed's process group dies with it
def _zero3_trace_invalidations(s: LearnerSettings, experiences: list[Experience]) -> int:
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    from learner.grpo import LossNorm
    from learner.worker import LearnerWorker, free_port

    worker = LearnerWorker(s, 0, 1)
    worker.setup("127.0.0.1", free_port())
    norm = LossNorm(sequences=len(experiences), tokens=100.0, length=s.max_new_tokens)
    worker.train_step(experiences, norm)  # the first step records the trace
    count = [0]
    invalidate = PartitionedParameterCoordinator._invalidate_trace

    def counted(self) -> None:
        count[0] += 1
        invalidate(self)

    PartitionedParameterCoordinator._invalidate_trace = counted
    worker.train_step(experiences, norm)
    return count[0]


@pytest.mark.parametrize("share", [False, True])
def test_zero3_keeps_its_module_trace_with_shared_prompts(ray_local, tiny_checkpoint, experiences, share: bool) -> None:
    """ZeRO-3 prefetches and keeps parameters by the module order it traced in the previous forward
    and backward; a micro-batch whose order differs throws the trace away and every parameter is
    gathered again (on an H100 the shared path was 1.6x slower than no sharing because of it)."""
    s = settings(tiny_checkpoint, micro_batch_size=4, share_prompts=share, zero_stage=3)
    assert ray.get(_zero3_trace_invalidations.remote(s, experiences)) == 0


def test_advantage_sign_moves_logprob(ray_local, tiny_checkpoint, experiences) -> None:
    g = group(ray_local, settings(tiny_checkpoint, beta=0.0, micro_batch_size=4))
    try:
        pos = Experience(experiences[0].record, experiences[0].completion_ids, advantage=1.0)
        neg = Experience(experiences[2].record, experiences[2].completion_ids, advantage=-1.0)
        before = [sum(lp) for lp in g.compute_logprobs([pos, neg])]
        metrics = g.train_step([pos, neg])
        after = [sum(lp) for lp in g.compute_logprobs([pos, neg])]
        # both completions trained (end-of-turn included), nothing else
        assert metrics["kl"] == 0.0 and metrics["learner/tokens"] == len(pos.completion_ids) + len(neg.completion_ids)
        assert after[0] > before[0] + 1e-3
        assert after[1] < before[1] - 1e-3
        # a clocked step (learner.phases, benchmarks' --breakdown): a real update, its time by phase
        clocked = g.clocked_step([pos, neg])
        phases, seconds = clocked["phases"], clocked["metrics"]["timing/learn_s"]
        assert math.isfinite(clocked["metrics"]["loss"]) and clocked["metrics"]["learner/tokens"] == metrics["learner/tokens"]
        for part in ("vision tower", "audio tower", "head", "language model, prompt or whole-sequence pass",
                     "language model, completions on the prompts' keys", "optimizer step (clipping, update, schedule)",
                     "backward (with the checkpointed layers' recompute, gradient reduction)"):
            assert phases.get(part, 0.0) > 0.0, part
        assert not any(k.startswith("reference:") for k in phases)  # beta 0: no reference forward
        # the parts add up to the step (the clock also holds the lap after learn_s was read)
        assert sum(phases.values()) == pytest.approx(seconds, rel=0.15)
    finally:
        g.kill()


def test_saved_checkpoint_reloads_with_the_same_logprobs(ray_local, tiny_checkpoint, experiences, tmp_path) -> None:
    s = settings(tiny_checkpoint)
    g = group(ray_local, s)
    try:
        g.train_step(experiences)
        g.train_step(experiences)
        expected = g.compute_logprobs(experiences[:3])
        g.save(str(tmp_path / "ckpt"), {"step": 2})
    finally:
        g.kill()
    saved = tmp_path / "ckpt"
    assert (saved / "model.safetensors").is_file() and (saved / "config.json").is_file()
    assert (saved / "tokenizer.json").is_file() and (saved / "train_state").is_dir()
    from safetensors import safe_open

    with safe_open(str(saved / "model.safetensors"), framework="pt") as fh:
        assert all(k.startswith("thinker.") for k in fh.keys())  # noqa: SIM118
    reloaded = group(ray_local, settings(saved))
    try:
        got = reloaded.compute_logprobs(experiences[:3])
        for a, b in zip(expected, got, strict=True):
            assert len(a) == len(b)
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
        state = reloaded.load_train_state(str(saved))
        assert state["step"] == 2
    finally:
        reloaded.kill()


def test_missing_sampler_logprobs_are_counted_and_never_read_as_zero(ray_local, tiny_checkpoint, experiences) -> None:
    """Sampler log-probs equal to the policy's, then the same batch with holes (a NaN, a -inf, a
    list three entries short): the holes are counted, left out of the mismatch metrics, and get
    importance weight 1, so the step is the one with complete log-probs. Read as log μ = 0 they
    would give a mismatch of |log π| and weights π < 1. The policy's own log-probs of the sampling
    distribution stand for vLLM's; no top-p, as the completions are written by hand and some of
    their tokens lie outside the random model's top-p set (mismatch/outside_support)."""
    g = group(ray_local, settings(tiny_checkpoint, off_policy=True, lr=0.0, micro_batch_size=4, top_p=1.0))
    try:
        batch = experiences[:4] + experiences[5:6]  # the last has tokens after its end-of-turn
        policy = g.compute_logprobs(batch, sampling=True)
        full = [Experience(e.record, e.completion_ids, e.advantage, lp) for e, lp in zip(batch, policy, strict=True)]
        holes = [list(lp) for lp in policy]
        holes[0][2] = math.nan
        holes[1][1] = -math.inf
        holes[2] = holes[2][:-3]
        assert len(holes[4]) < len(batch[4].completion_ids)  # short by the untrained tail only: not missing
        gappy = [Experience(e.record, e.completion_ids, e.advantage, lp) for e, lp in zip(batch, holes, strict=True)]
        complete = g.train_step(full)  # lr 0: the weights stay, both steps see the same policy
        with_holes = g.train_step(gappy)
    finally:
        g.kill()
    assert set(complete) == set(with_holes) == CPU_ON_POLICY | ROLLOUT_CORRECTION | MISMATCH
    assert complete["mismatch/missing_logprobs"] == complete["mismatch/outside_support"] == 0.0
    assert with_holes["mismatch/missing_logprobs"] == 5.0
    for m in (complete, with_holes):
        assert m["mismatch/logprob_abs_error"] < 1e-5 and m["mismatch/token_prob_error"] < 1e-6
    assert with_holes["loss"] == pytest.approx(complete["loss"], rel=1e-5, abs=1e-7)
    assert with_holes["grad_norm"] == pytest.approx(complete["grad_norm"], rel=1e-5)


def test_a_step_on_what_vllm_sampled_compares_one_distribution(ray_local, tiny_checkpoint, train_json) -> None:
    """vLLM samples at temperature 0.7 with top-k 50 and top-p 0.9 and returns the log-probs of that
    distribution; a learner with the same sampling settings and lr 0 compares its own of the same
    distribution with them: mismatch at float noise, no sampled token outside its kept set, the
    importance weights 1 and the off-policy ratio against the sampler 1 (no token clipped). The
    learner's tempered log-probs alone (the loss's) would differ from vLLM's by 0.1 to 3."""
    from rollout.engine import RolloutEngine
    from rollout.types import EngineSettings, SamplingSettings

    sampling = SamplingSettings(temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=12, seed=1)
    records = load_records(train_json)[:2]
    engine = ray_local.remote(RolloutEngine).options(num_cpus=1).remote(
        EngineSettings(model_path=tiny_checkpoint, max_model_len=1024, enforce_eager=True), 0
    )
    try:
        results = ray_local.get(engine.generate.remote(records, 3, sampling))
    finally:
        ray_local.kill(engine)
    batch = [
        Experience(record, c.token_ids, advantage, c.logprobs)
        for record, result in zip(records, results, strict=True)
        for c, advantage in zip(result.completions, (1.0, -1.0, 0.5), strict=True)
    ]
    s = settings(
        tiny_checkpoint, lr=0.0, micro_batch_size=3, off_policy=True, policy_loss="ppo_clip", clip_eps=(0.2, 0.2),
        rollout_correction="tis", temperature=0.7, top_k=50, top_p=0.9,
    )
    g = group(ray_local, s)
    try:
        m = g.train_step(batch)
    finally:
        g.kill()
    assert m["mismatch/missing_logprobs"] == m["mismatch/outside_support"] == 0.0
    assert m["mismatch/logprob_abs_error"] < 1e-5 and m["mismatch/token_prob_error"] < 1e-5, m
    assert abs(m["rollout_correction/kl"]) < 1e-8 and m["rollout_correction/ess"] == pytest.approx(1.0, abs=1e-6)
    assert m["ratio/min"] == pytest.approx(1.0, abs=1e-4) and m["ratio/max"] == pytest.approx(1.0, abs=1e-4)
    assert m["clip_fraction"] == 0.0


def test_combine_follows_the_metric_table() -> None:
    """Two ranks' parts: sums add, per-token values are weighted by each rank's tokens, mismatch
    values by the tokens that had a sampler log-prob, extremes and rank 0's values are taken."""
    rank0 = {"loss": 0.5, "learner/tokens": 10.0, "kl": 10 * 0.2, "ratio/mean": 10 * 1.0, "ratio/max": 1.5,
             "ratio/min": 0.9, "grad_norm": 3.0, "lr": 1e-6, "timing/learn_s": 2.0, "learner/step_skipped": 0.0,
             "mismatch/logprob_abs_error": 8 * 0.01, "mismatch/missing_logprobs": 2.0, "_sampled_tokens": 8.0}
    rank1 = {"loss": 0.25, "learner/tokens": 30.0, "kl": 30 * 0.4, "ratio/mean": 30 * 1.2, "ratio/max": 1.2,
             "ratio/min": 0.7, "grad_norm": 99.0, "lr": 1e-6, "timing/learn_s": 3.0, "learner/step_skipped": 1.0,
             "mismatch/logprob_abs_error": 30 * 0.03, "mismatch/missing_logprobs": 0.0, "_sampled_tokens": 30.0}
    out = combine([rank0, rank1])
    assert out["loss"] == 0.75 and out["learner/tokens"] == 40.0
    assert out["kl"] == pytest.approx((10 * 0.2 + 30 * 0.4) / 40)
    assert out["ratio/mean"] == pytest.approx((10 + 36) / 40)
    assert (out["ratio/max"], out["ratio/min"]) == (1.5, 0.7)
    assert out["grad_norm"] == 3.0 and out["timing/learn_s"] == 3.0 and out["learner/step_skipped"] == 1.0
    assert out["mismatch/logprob_abs_error"] == pytest.approx((0.08 + 0.9) / 38)
    assert out["mismatch/missing_logprobs"] == 2.0
    assert "mismatch/token_prob_error" not in out and "memory/learner_peak_gb" not in out  # nobody reported them
    assert not any(name.startswith("_") for name in out)  # helper counts are no metrics
    with pytest.raises(ValueError, match=r"does not list: \['tokens'\]"):
        combine([{**rank0, "tokens": 10.0}])  # an old or misspelt name is not dropped silently


def test_freeze_prefixes_holds_named_parameters_and_refuses_typos(tiny_checkpoint) -> None:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from learner.model import freeze_prefixes

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(tiny_checkpoint)
    head = model.lm_head.weight.numel()
    assert freeze_prefixes(model, ("lm_head",)) == head
    assert not model.lm_head.weight.requires_grad
    assert model.model.embed_tokens.weight.requires_grad
    frozen = freeze_prefixes(model, ("model.embed_tokens.",))
    assert frozen == model.model.embed_tokens.weight.numel()
    with pytest.raises(ValueError, match="'model.embed' matches no parameter"):
        freeze_prefixes(model, ("model.embed",))  # prefixes match whole name parts, not characters


def test_the_memory_levers_update_like_the_plain_learner(ray_local, tiny_checkpoint, experiences) -> None:
    # learner.offload_optimizer (DeepSpeed's CPU Adam on the host partitions, compiled on first use),
    # learner.reference_device cpu (the reference's log-probs of every micro-batch first, in one
    # visit) and learner.fused_head (the head in chunks, no logits kept) change where bytes live, not
    # the step: the same metrics, weights and reference log-probs
    runs = {}
    levers = {"offload_optimizer": True, "reference_device": "cpu", "fused_head": True}
    for name, extra in (("plain", {}), ("levers", levers)):
        learner = group(ray_local, settings(tiny_checkpoint, micro_batch_size=2, **extra))
        try:
            before = dict(learner.named_weights())
            first = learner.train_step(experiences)
            second = learner.train_step(experiences)  # now the reference differs from the policy
            runs[name] = (before, first, second, dict(learner.named_weights()),
                          learner.compute_logprobs(experiences, reference=True))
        finally:
            learner.kill()
    (before, p1, p2, plain, ref_plain), (_, l1, l2, levers, ref_levers) = runs["plain"], runs["levers"]
    assert p2["kl"] > 1e-9 and l2["kl"] == pytest.approx(p2["kl"], rel=1e-4)  # against the same reference
    for key in ("loss", "grad_norm", "logprob_mean"):
        assert l1[key] == pytest.approx(p1[key], rel=1e-5, abs=1e-7) and l2[key] == pytest.approx(p2[key], rel=1e-4, abs=1e-7)
    moved = max((plain[n] - before[n]).abs().max().item() for n in before)
    diff = max((plain[n] - levers[n]).abs().max().item() for n in before)
    assert moved > 1e-4 and diff < 1e-5 * max(1.0, moved * 100)
    for a, b in zip(ref_plain, ref_levers, strict=True):  # the reference is the starting model in both
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)
