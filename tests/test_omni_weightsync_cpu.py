"""Bucket packing/unpacking and the gloo transport of the weight-sync protocol."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from omni.names import to_learner_name, to_vllm_name
from omni.weightsync import (
    GroupInfo,
    SyncGroup,
    engine_ranks,
    pack_bucket,
    plan_buckets,
    receive_buckets,
    send_buckets,
    unpack_bucket,
)


def named_tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(50, 16, generator=g)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(16, generator=g).to(torch.bfloat16)),
        ("model.norm.weight", torch.randn(7, generator=g).half()),
        ("big", torch.randn(300, 10, generator=g)),  # larger than a bucket: travels alone
        ("counter", torch.arange(5)),
        ("flag", torch.tensor([True, False, True])),
        ("scalar", torch.tensor(3.5)),
    ]


def test_plan_pack_unpack_roundtrip() -> None:
    tensors = named_tensors()
    specs = plan_buckets(((n, t.shape, t.dtype) for n, t in tensors), bucket_bytes=4096)
    assert [s.name for b in specs for s in b.tensors] == [n for n, _ in tensors]
    assert any(len(b.tensors) == 1 and b.tensors[0].name == "big" for b in specs)
    assert all(b.nbytes <= 4096 or len(b.tensors) == 1 for b in specs)
    assert all(ts.offset % 64 == 0 for b in specs for ts in b.tensors)
    lookup = dict(tensors)
    for bucket in specs:
        flat = pack_bucket(bucket, [lookup[ts.name] for ts in bucket.tensors])
        assert flat.dtype == torch.uint8 and flat.numel() == bucket.nbytes
        for name, view in unpack_bucket(bucket, flat):
            assert view.dtype == lookup[name].dtype and torch.equal(view, lookup[name])
    with pytest.raises(ValueError, match="expected float32"):
        pack_bucket(specs[0], [torch.zeros(3)] + [lookup[t.name] for t in specs[0].tensors[1:]])
    with pytest.raises(ValueError, match="uint8 bytes"):
        unpack_bucket(specs[0], torch.zeros(specs[0].nbytes + 1, dtype=torch.uint8))


def test_names_map_both_ways() -> None:
    assert to_vllm_name("model.layers.0.mlp.up_proj.weight") == "thinker.model.layers.0.mlp.up_proj.weight"
    assert to_vllm_name("module.lm_head.weight") == "thinker.lm_head.weight"
    assert to_vllm_name("thinker.visual.blocks.0.norm1.weight") == "thinker.visual.blocks.0.norm1.weight"
    assert to_learner_name("thinker.audio_tower.conv1.weight") == "audio_tower.conv1.weight"
    with pytest.raises(ValueError, match="not a thinker weight"):
        to_learner_name("talker.model.norm.weight")
    assert engine_ranks(0, 1) == [1] and engine_ranks(2, 2) == [5, 6]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_group_streams_buckets_to_two_receivers() -> None:
    tensors = named_tensors()
    specs = plan_buckets(((n, t.shape, t.dtype) for n, t in tensors), bucket_bytes=2048)
    info = GroupInfo(host="127.0.0.1", port=free_port(), world_size=3, backend="gloo", timeout_s=30)
    received: dict[int, list[tuple[str, torch.Tensor]]] = {}
    errors: list[BaseException] = []

    def receiver(rank: int) -> None:
        try:
            group = SyncGroup(info, rank)
            received[rank] = [(n, t.clone()) for n, t in receive_buckets(group, specs)]
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=receiver, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    sender = SyncGroup(info, 0)
    lookup = dict(tensors)
    sent = send_buckets(sender, (pack_bucket(b, [lookup[ts.name] for ts in b.tensors]) for b in specs))
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sent == sum(b.nbytes for b in specs)
    for rank in (1, 2):
        assert [n for n, _ in received[rank]] == [n for n, _ in tensors]
        for name, tensor in received[rank]:
            assert torch.equal(tensor, lookup[name])


def test_a_missing_peer_times_out_loudly() -> None:
    info = GroupInfo(host="127.0.0.1", port=free_port(), world_size=2, backend="gloo", timeout_s=2)
    with pytest.raises(Exception, match="(?i)timed? ?out|timeout"):
        group = SyncGroup(info, 0)
        send_buckets(group, [torch.zeros(8, dtype=torch.uint8)])
