"""The within-a-node weight hand-over (colocated placement) on the CPU: buckets in Ray's shared-
memory object store between real Ray actors, and pushed into a real vLLM CPU engine."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from avqa import load_records
from omni.fixtures.tiny import TinySizes, build_tiny_checkpoint
from omni.handoff import (
    Channel,
    ShmHandle,
    Stager,
    open_bucket,
    receive_over,
    send_over,
    spec_digest,
)
from omni.names import head_is_tied, without_tied_head
from omni.weightsync import BucketSpec, plan_buckets
from rollout import receive
from rollout.engine import RolloutEngine
from rollout.types import EngineSettings, SamplingSettings

GREEDY = SamplingSettings(temperature=0.0, top_p=1.0, max_new_tokens=10, seed=0, ignore_eos=True)


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype a push carries, odd sizes (not multiples of the 64-byte alignment), an empty
    tensor, and one large enough (155 kB) that Ray keeps it in shared memory, not inline."""
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.index": torch.randint(-(2**40), 2**40, (2, 3, 1), generator=g, dtype=torch.int64),
        "d.mask": torch.rand(13, generator=g) > 0.5,
        "e.empty": torch.zeros(0, 4),
        "f.large": torch.randn(300, 129, generator=g),
        "g.scalar": torch.tensor(2.5, dtype=torch.bfloat16),
    }


def plan(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[BucketSpec]:
    return plan_buckets(((n, t.shape, t.dtype) for n, t in tensors.items()), bucket_bytes)


@ray.remote(num_cpus=0.25)
class Sender:
    """A learner rank as far as the hand-over goes: holds weights, stages buckets of them."""

    def __init__(self, tensors: dict[str, torch.Tensor], in_flight: int) -> None:
        self.tensors = tensors
        self.stager = Stager("cpu", in_flight=in_flight)

    def push(self, specs: list[BucketSpec], channel: Channel) -> dict[str, int]:
        buckets = ([self.tensors[t.name] for t in spec.tensors] for spec in specs)
        sent = send_over(self.stager, channel, specs, buckets)
        return {"bytes": sent, "peak": self.stager.peak_held, "held": len(self.stager.held)}


@ray.remote(num_cpus=0.25)
class Receiver:
    """An engine worker as far as the hand-over goes: turns handles into named tensors."""

    def receive(self, specs: list[BucketSpec], channel: Channel, delay_s: float = 0.0) -> dict[str, Any]:
        out: dict[str, torch.Tensor] = {}
        stores = []
        for name, view in receive_over(specs, channel):
            out[name] = view.clone()
            if view.numel():
                stores.append(view.untyped_storage().data_ptr())
            time.sleep(delay_s)  # a slow loader: the sender must wait, not run ahead
        return {"tensors": out, "stores": stores}


def test_round_trip_between_two_actors_is_exact_and_bounded(ray_local) -> None:
    tensors = mixed_tensors()
    specs = plan(tensors, bucket_bytes=1024)
    assert len(specs) >= 3  # several buckets; the large tensor goes alone
    sender = Sender.remote(tensors, in_flight=2)
    receiver = Receiver.remote()
    channel = Channel.create(timeout_s=60)
    try:
        got = receiver.receive.remote(specs, channel, delay_s=0.2)
        report = ray.get(sender.push.remote(specs, channel))
        result = ray.get(got)
        assert report == {"bytes": sum(s.nbytes for s in specs), "peak": 2, "held": 0}
        assert list(result["tensors"]) == list(tensors)
        for name, tensor in tensors.items():
            assert result["tensors"][name].dtype == tensor.dtype, name
            assert result["tensors"][name].shape == tensor.shape, name
            assert torch.equal(result["tensors"][name], tensor), name
        # views into one buffer per bucket, not a copy per tensor
        assert len(set(result["stores"])) == sum(1 for s in specs if s.nbytes)
    finally:
        channel.close()
        ray.kill(sender)
        ray.kill(receiver)


@ray.remote(num_cpus=0.25)
def _where(spec: BucketSpec, handle: ShmHandle) -> tuple[bool, bool, torch.Tensor]:
    array = ray.get(handle.ref)
    ((_, view),) = open_bucket(spec, handle)
    start = array.ctypes.data
    return not array.flags.writeable, start <= view.data_ptr() < start + array.nbytes, view.clone()


def test_store_objects_are_read_in_place(ray_local) -> None:
    tensors = {"big": torch.arange(50_000, dtype=torch.float32)}  # 200 kB: kept in shared memory
    spec = plan(tensors, bucket_bytes=1 << 20)[0]
    handle = Stager("cpu").stage(0, spec, [tensors["big"]])
    assert isinstance(handle, ShmHandle)
    read_only, inside, seen = ray.get(_where.remote(spec, handle))
    # another process maps the store's object (read-only) and the tensor is a view of it
    assert read_only and inside and torch.equal(seen, tensors["big"])


def test_a_slot_is_not_overwritten_before_release(ray_local) -> None:
    tensors = mixed_tensors()
    specs = plan(tensors, bucket_bytes=1024)
    stager = Stager("cpu", in_flight=2)

    def stage(i: int) -> ShmHandle:
        return stager.stage(i, specs[i], [tensors[t.name] for t in specs[i].tensors])

    stage(0)
    stage(1)
    with pytest.raises(RuntimeError, match=r"bucket 2: its slot 0 still holds bucket 0"):
        stage(2)
    stager.release([0])
    assert stager.held == [1]
    stage(2)
    assert stager.held == [1, 2] and stager.peak_held == 2
    with pytest.raises(ValueError, match="in_flight"):
        Stager("cpu", in_flight=0)


def test_mismatched_specs_are_refused_before_reading(ray_local) -> None:
    tensors = mixed_tensors()
    specs = plan(tensors, bucket_bytes=1024)
    stager = Stager("cpu", in_flight=len(specs))
    handles = [
        stager.stage(i, spec, [tensors[t.name] for t in spec.tensors]) for i, spec in enumerate(specs)
    ]
    opened = [len(open_bucket(s, h)) for s, h in zip(specs, handles, strict=True)]
    assert opened == [len(s.tensors) for s in specs]
    # same sizes, another name: the engine would load bytes under the wrong parameter
    other = plan({("a.other" if n == "a.weight" else n): t for n, t in tensors.items()}, 1024)
    assert other[0].nbytes == specs[0].nbytes and spec_digest(other[0]) != spec_digest(specs[0])
    with pytest.raises(ValueError, match=r"bucket 0 \(first tensor a.other\): staged for another layout"):
        open_bucket(other[0], handles[0])
    # a bucket of another size
    with pytest.raises(ValueError, match=rf"bucket 1 .*holds {specs[1].nbytes} bytes, spec expects {specs[0].nbytes}"):
        open_bucket(specs[0], handles[1])
    # staging checks shapes and dtypes against the spec, naming the tensor
    wrong = [tensors[t.name] for t in specs[0].tensors]
    wrong[0] = wrong[0].double()
    with pytest.raises(ValueError, match=rf"{specs[0].tensors[0].name}: expected float32"):
        Stager("cpu").stage(0, specs[0], wrong)


def test_a_count_mismatch_fails_naming_the_bucket(ray_local) -> None:
    tensors = mixed_tensors()
    specs = plan(tensors, bucket_bytes=1024)
    last = len(specs) - 1
    sender = Sender.remote(tensors, in_flight=1)
    receiver = Receiver.remote()
    try:
        channel = Channel.create(timeout_s=3)
        try:  # the engine expects one bucket more than the learner sends
            got = receiver.receive.remote(specs, channel)
            ray.get(sender.push.remote(specs[:-1], channel))
            with pytest.raises(TimeoutError, match=rf"no handle of bucket {last} within 3 s"):
                ray.get(got)
        finally:
            channel.close()
        channel = Channel.create(timeout_s=3)
        try:  # the learner sends one bucket more than the engine takes
            got = receiver.receive.remote(specs[:-1], channel)
            with pytest.raises(TimeoutError, match=rf"no release of bucket {last} within 3 s"):
                ray.get(sender.push.remote(specs, channel))
            assert len(ray.get(got)["tensors"]) == sum(len(s.tensors) for s in specs[:-1])
        finally:
            channel.close()
    finally:
        ray.kill(sender)
        ray.kill(receiver)


# --------------------------------------------------------------------------- into vLLM


@ray.remote(num_cpus=1)
class HandoffEngine(RolloutEngine):
    """The method rollout/engine.py gets for colocated placement (what this test needs of it)."""

    def receive_handoff(self, specs: list[BucketSpec], channel: Channel, version: int) -> int:
        counts = self.llm.collective_rpc(receive.receive_handoff, args=(specs, channel))
        self._reset_caches()
        self.weight_version = version
        return int(counts[0])

    def digest(self, names: list[str]) -> dict[str, float]:
        return self.llm.collective_rpc(receive.weights_digest, args=(names,))[0]


def settings(model: Path) -> EngineSettings:
    return EngineSettings(model_path=model, max_model_len=1024, enforce_eager=True)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_handed_over_weights_generate_like_the_same_weights_from_disk(
    ray_local, tiny_checkpoint: Path, train_json: Path, tmp_path: Path, tied: bool
) -> None:
    """Perturbed weights go through the object store into a live engine; a fresh engine on a saved
    copy of the same weights must give the same greedy tokens. Tied: the learner's state dict names
    the head too; it is left out and the embeddings alone carry it."""
    base = tiny_checkpoint
    if tied:
        base = build_tiny_checkpoint(tmp_path / "tied", seed=0, sizes=TinySizes(tie_word_embeddings=True))
    assert head_is_tied(base) is tied
    weights = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    changed = {name: t + 0.05 * torch.randn(t.shape, generator=g) for name, t in weights.items()}
    copy = tmp_path / "perturbed"
    shutil.copytree(base, copy)
    save_file(changed, str(copy / "model.safetensors"), metadata={"format": "pt"})
    state = dict(changed)
    if tied:
        assert "thinker.lm_head.weight" not in weights  # the tiny checkpoint stores the matrix once
        state["thinker.lm_head.weight"] = state["thinker.model.embed_tokens.weight"]
    named = without_tied_head(sorted(state.items()), tied=tied)
    assert len(named) == len(changed)
    specs = plan(dict(named), bucket_bytes=256 << 10)
    assert len(specs) > 2

    records = load_records(train_json)[:3]
    sender = Sender.remote(dict(named), in_flight=2)
    pushed = HandoffEngine.remote(settings(base), 4)
    fresh = None
    try:
        before = ray_local.get(pushed.generate.remote(records, 1, GREEDY))
        channel = Channel.create(timeout_s=120)
        try:
            loaded = pushed.receive_handoff.remote(specs, channel, 1)
            report = ray_local.get(sender.push.remote(specs, channel))
            assert ray_local.get(loaded) == len(named)
            assert report["peak"] == 2 and report["held"] == 0
        finally:
            channel.close()
        after = ray_local.get(pushed.generate.remote(records, 1, GREEDY))
        fresh = ray_local.remote(RolloutEngine).options(num_cpus=1).remote(settings(copy), 5)
        expected = ray_local.get(fresh.generate.remote(records, 1, GREEDY))
        tokens = lambda results: [r.completions[0].token_ids for r in results]  # noqa: E731
        assert tokens(after) != tokens(before)
        assert tokens(after) == tokens(expected)
        for got, want in zip(after, expected, strict=True):
            diff = max(abs(a - b) for a, b in zip(got.completions[0].logprobs, want.completions[0].logprobs, strict=True))
            assert diff < 1e-5
        digest = ray_local.get(pushed.digest.remote(["language_model.model.embed_tokens.weight"]))
        want_sum = float(changed["thinker.model.embed_tokens.weight"].sum())
        assert abs(digest["language_model.model.embed_tokens.weight"] - want_sum) < 1e-2
    finally:
        ray_local.kill(sender)
        ray_local.kill(pushed)
        if fresh is not None:
            ray_local.kill(fresh)
