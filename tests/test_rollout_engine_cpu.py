"""The rollout engine on real vLLM (CPU backend) in real Ray actors, with the tiny checkpoint."""

from __future__ import annotations

import math
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from avqa import load_records
from omni.forward import completion_logprobs
from omni.inputs import (
    add_positions,
    collate,
    encode_prompt,
    load_processor,
    media_token_ids,
    prepare_prompt,
)
from omni.weightsync import GroupInfo, SyncGroup, pack_bucket, plan_buckets, send_buckets
from rollout.engine import RolloutEngine, completion_from_vllm
from rollout.pool import EnginePool
from rollout.types import EngineSettings, SamplingSettings

SAMPLING = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=1)
GREEDY = SamplingSettings(temperature=0.0, top_p=1.0, max_new_tokens=10, seed=0, ignore_eos=True)


def start_engine(ray, model: Path, index: int = 0):
    actor = ray.remote(RolloutEngine).options(num_cpus=1)
    return actor.remote(EngineSettings(model_path=model, max_model_len=1024, enforce_eager=True), index)


@pytest.fixture(scope="module")
def records(train_json: Path):
    return load_records(train_json)


@pytest.fixture(scope="module")
def engine(ray_local, tiny_checkpoint: Path):
    handle = start_engine(ray_local, tiny_checkpoint)
    yield handle
    ray_local.kill(handle)


# the sampling distributions compared: the model's own softmax; the temperature with top-k 50 (the
# reference preset's top-k), with top-p, with both
DISTRIBUTIONS = {
    "T1": SAMPLING,
    "T0.7-k50": replace(SAMPLING, temperature=0.7, top_k=50),
    "T0.7-p0.9": replace(SAMPLING, temperature=0.7, top_p=0.9),
    "T0.7-k50-p0.9": replace(SAMPLING, temperature=0.7, top_k=50, top_p=0.9),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_prompt_ids_and_logprobs_match_the_learner_side(ray_local, engine, tiny_checkpoint, records, name: str) -> None:
    """vLLM's log-prob of each sampled token equals the learner's under the same sampling
    distribution (omni.sampling: the media bias, the temperature, top-k, top-p), to float32 noise."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    sampling = DISTRIBUTIONS[name]
    batch_records = records[:3]
    results = ray_local.get(engine.generate.remote(batch_records, 4, sampling))
    processor = load_processor(tiny_checkpoint)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    model.eval()
    prompts, completions, vllm_logps = [], [], []
    for record, result in zip(batch_records, results, strict=True):
        assert result.ok and result.record_id == record.id and len(result.completions) == 4
        features = add_positions(model, encode_prompt(processor, prepare_prompt(record, processor)))
        # image and audio placeholders expanded the same way on both sides, token for token
        assert result.prompt_token_ids == features.input_ids.tolist()
        for completion in result.completions:
            assert len(completion.token_ids) == len(completion.logprobs) > 0
            prompts.append(features)
            completions.append(completion.token_ids)
            vllm_logps.append(completion.logprobs)
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    batch = collate(prompts, completions, pad_id=processor.tokenizer.pad_token_id, eos_ids=eos)
    dist = sampling.distribution(media_token_ids(processor.tokenizer))  # the engine's logit bias too
    truncated: list[torch.Tensor] = []
    outside: list[torch.Tensor] = []
    with torch.no_grad():
        tempered = completion_logprobs(model, batch, distribution=dist, sampling=truncated, outside=outside)

    def gaps(learner: torch.Tensor) -> list[float]:
        out = []
        for row, ref in enumerate(vllm_logps):
            n = int(batch.completion_mask[row].sum())
            out.extend((learner[row, :n] - torch.tensor(ref[:n])).abs().tolist())
        return out

    diffs = gaps(truncated[0])
    # Both sides run the same float32 weights on the CPU; only kernels and summation order differ
    # (vLLM's fused qkv/gate-up and CPU attention vs transformers' sdpa on a left-padded batch).
    # That is rounding: measured here at ~1e-6 at most (float32 eps 1.2e-7 grown through two
    # layers and a 1.7k-way log-softmax). The bound leaves a 100x margin; any real mismatch
    # (a shifted position, another token, other media, another temperature or truncation) moves
    # log-probs by 1e-2 or more: the media bias alone by 7e-3, top-p 0.9 by 0.1, top-k 50 by 2.8
    # (measured on this checkpoint).
    assert max(diffs) < 1e-4, f"{name}: max |Δ log p| = {max(diffs):.2e}"
    assert np.mean(diffs) < 1e-5
    assert not outside[0].any(), "every token vLLM sampled lies in the learner's kept set"
    # the loss's view (the temperature alone: no bias, no truncation) is another distribution, and
    # this comparison tells the two apart at every token
    assert min(gaps(tempered)) > 1e-3, f"{name}: the tempered log-probs match vLLM's"
    without_bias: list[torch.Tensor] = []
    with torch.no_grad():
        completion_logprobs(model, batch, distribution=sampling.distribution(), sampling=without_bias)
    assert max(gaps(without_bias[0])) > 1e-3, "the media placeholders' bias is part of the distribution"


@pytest.mark.parametrize("flat", [False, True])
def test_a_completion_has_one_logprob_per_token_and_nan_where_vllm_gave_none(flat: bool) -> None:
    """vLLM's own output types with the gaps it can leave: an entry without the sampled token, a
    non-finite value, an empty position, fewer entries than tokens. Each gap is NaN (unknown),
    never 0 (certain), and the list is as long as the tokens."""
    from vllm.logprobs import FlatLogprobs, Logprob
    from vllm.outputs import CompletionOutput

    positions = [{11: Logprob(-0.5)}, {99: Logprob(-1.0)}, {13: Logprob(-math.inf)}, None, {15: Logprob(-2.0)}]
    logprobs = FlatLogprobs() if flat else []
    for position in positions:
        logprobs.append(position)  # FlatLogprobs keeps an empty position where a list keeps None
    output = CompletionOutput(
        index=0, text="abc", token_ids=[11, 12, 13, 14, 15, 16, 17], cumulative_logprob=None,
        logprobs=logprobs, finish_reason="length",
    )
    completion = completion_from_vllm(output)
    assert len(completion.logprobs) == len(completion.token_ids) == 7
    assert completion.logprobs[0] == -0.5 and completion.logprobs[4] == -2.0
    assert all(math.isnan(completion.logprobs[i]) for i in (1, 2, 3, 5, 6))
    no_logprobs = CompletionOutput(index=0, text="", token_ids=[1, 2], cumulative_logprob=None, logprobs=None)
    assert [math.isnan(v) for v in completion_from_vllm(no_logprobs).logprobs] == [True, True]


def test_broken_media_fails_one_question_and_the_engine_serves_on(
    ray_local, engine, records, tmp_path: Path
) -> None:
    root = tmp_path / "broken"
    shutil.copytree(records[0].image_path.parent.parent, root)
    (root / "audios" / records[1].audio_path.name).unlink()
    (root / "images" / records[2].image_path.name).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    broken = load_records(root / "omni_rl_format_train.json", check_media=False)
    results = ray_local.get(engine.generate.remote(broken[:4], 2, SAMPLING))
    assert [r.ok for r in results] == [True, False, False, True]
    assert "no such file" in results[1].error and records[1].audio_path.name in results[1].error
    assert "cannot decode image" in results[2].error and records[2].image_path.name in results[2].error
    again = ray_local.get(engine.generate.remote(records[:2], 3, SAMPLING))
    assert [len(r.completions) for r in again] == [3, 3]


def test_a_prompt_vllm_refuses_fails_alone(ray_local, engine, records) -> None:
    """vLLM rejects a whole batch for one prompt longer than max_model_len (1024 here); the
    engine serves the rest and names the reason for that one."""
    import dataclasses

    long = dataclasses.replace(records[1], question=records[1].question + " and so on" * 400)
    results = ray_local.get(engine.generate.remote([records[0], long, records[2]], 2, SAMPLING))
    assert [r.ok for r in results] == [True, False, True]
    assert "vLLM refused the prompt" in results[1].error and "1024" in results[1].error, results[1].error
    assert [len(r.completions) for r in results] == [2, 0, 2]


def test_per_request_seeds_replay_a_batch_on_the_cpu(ray_local, engine, records) -> None:
    """A batch larger than one step's token budget (every record × 8, ~86k prompt tokens) with
    per-request seeds: the same salt replays the same completions, another salt draws new ones.
    (With vLLM's chunked prefill on, a CPU engine fails such a batch: see llm_kwargs.)"""

    def draw(salt: int) -> list[list[list[int]]]:
        results = ray_local.get(engine.generate.remote(records, 8, SAMPLING, salt=salt))
        assert all(r.ok for r in results), [r.error for r in results if not r.ok][:1]
        return [[c.token_ids for c in r.completions] for r in results]

    first = draw(salt=11)
    assert draw(salt=11) == first
    assert draw(salt=12) != first


def test_pool_of_two_engines_keeps_order_and_groups(ray_local, engine, tiny_checkpoint, records) -> None:
    second = start_engine(ray_local, tiny_checkpoint, index=1)
    try:
        pool = EnginePool([engine, second])
        assert pool.assign(5) == [0, 1, 0, 1, 0]
        batch = records[:7]
        results = pool.generate(batch, 3, SAMPLING)
        assert [r.record_id for r in results] == [r.id for r in batch]
        assert all(r.ok and len(r.completions) == 3 for r in results)
        assert pool.load == [0, 0]
        infos = pool.broadcast("info")
        assert {i["index"] for i in infos} == {0, 1} and len({i["pid"] for i in infos}) == 2
    finally:
        ray_local.kill(second)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pushed_weights_change_generation_like_the_same_weights_from_disk(
    ray_local, tiny_checkpoint, records, tmp_path: Path
) -> None:
    """Push perturbed weights through the gloo transport; a fresh engine on a saved copy of the
    same weights must then produce the same greedy tokens."""
    weights = load_file(str(tiny_checkpoint / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    changed = {name: t + 0.05 * torch.randn(t.shape, generator=g) for name, t in weights.items()}
    copy = tmp_path / "perturbed"
    shutil.copytree(tiny_checkpoint, copy)
    save_file(changed, str(copy / "model.safetensors"), metadata={"format": "pt"})

    pushed = start_engine(ray_local, tiny_checkpoint, index=2)
    fresh = start_engine(ray_local, copy, index=3)
    try:
        batch = records[:3]
        before = ray_local.get(pushed.generate.remote(batch, 1, GREEDY))
        info = GroupInfo(host="127.0.0.1", port=free_port(), world_size=2, backend="gloo", timeout_s=60)
        joined = pushed.init_weight_sync.remote(info, 1)
        sender = SyncGroup(info, 0)
        assert ray_local.get(joined) == [1]
        names = sorted(changed)
        specs = plan_buckets(((n, changed[n].shape, changed[n].dtype) for n in names), bucket_bytes=256 << 10)
        assert len(specs) > 1
        received = pushed.receive_weights.remote(specs, 1)
        send_buckets(sender, (pack_bucket(s, [changed[t.name] for t in s.tensors]) for s in specs))
        assert ray_local.get(received) == len(names)
        after = ray_local.get(pushed.generate.remote(batch, 1, GREEDY))
        expected = ray_local.get(fresh.generate.remote(batch, 1, GREEDY))
        tokens = lambda results: [r.completions[0].token_ids for r in results]  # noqa: E731
        assert tokens(after) != tokens(before)
        assert tokens(after) == tokens(expected)
        assert ray_local.get(pushed.info.remote())["weight_version"] == 1
    finally:
        ray_local.kill(pushed)
        ray_local.kill(fresh)


def test_a_question_drawn_twice_in_a_step_gets_distinct_completions(ray_local, engine, records) -> None:
    from collections import Counter

    from orchestrator.sampler import request_salts

    seen: Counter[str] = Counter()
    salts = request_salts(5, [records[0].id, records[1].id, records[0].id], seen)
    assert salts == [5, 5, "5.1"] and request_salts(5, [records[0].id], seen) == ["5.2"]  # a later draw too
    twice = [records[0], records[0]]
    same = ray_local.get(engine.generate.remote(twice, 4, SAMPLING, salt=5))
    assert [c.token_ids for c in same[0].completions] == [c.token_ids for c in same[1].completions]  # one seed: copies
    distinct = ray_local.get(engine.generate.remote(twice, 4, SAMPLING, salt=salts[::2]))
    assert [c.token_ids for c in distinct[0].completions] == [c.token_ids for c in same[0].completions]  # first: as before
    assert [c.token_ids for c in distinct[1].completions] != [c.token_ids for c in distinct[0].completions]
