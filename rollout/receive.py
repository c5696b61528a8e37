"""Engine-side weight loading: these functions run inside each vLLM worker (via collective_rpc)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from omni.weightsync import BucketSpec, GroupInfo, SyncGroup, receive_buckets, receive_raw

_GROUP_ATTR = "_echoink_sync_group"


def _model(worker: Any) -> torch.nn.Module:
    return worker.model_runner.model


def _device(worker: Any) -> torch.device:
    return next(_model(worker).parameters()).device


def join_sync_group(worker: Any, info: GroupInfo, first_rank: int) -> int:
    """Join the learner's sync group as ``first_rank`` + this worker's tensor-parallel rank."""
    tp_rank = getattr(worker, "rank", 0) or 0
    rank = first_rank + int(tp_rank)
    setattr(worker, _GROUP_ATTR, SyncGroup(info, rank, device=_device(worker)))
    return rank


def load_named_weights(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Load full (unsharded) ``thinker.…`` tensors in place; returns how many arrived.

    The CPU backend repacks linear weights at start-up, so a plain ``load_weights`` cannot write
    into them afterwards; ``reload_weights`` loads checkpoint-format tensors and re-runs that
    processing. GPU workers load straight into their parameters.
    """
    from vllm.platforms import current_platform

    count = 0

    def counted() -> Iterable[tuple[str, torch.Tensor]]:
        nonlocal count
        for item in weights:
            count += 1
            yield item

    runner = worker.model_runner
    if current_platform.is_cpu() and hasattr(runner, "reload_weights"):
        runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
    else:
        _model(worker).load_weights(weights=counted())
    return count


def receive_weights(worker: Any, specs: Sequence[BucketSpec]) -> int:
    group: SyncGroup | None = getattr(worker, _GROUP_ATTR, None)
    if group is None:
        raise RuntimeError("this engine has not joined a weight-sync group (init_weight_sync first)")
    count = load_named_weights(worker, receive_buckets(group, specs))
    if _device(worker).type == "cuda":
        torch.cuda.synchronize()
    return count


def weights_digest(worker: Any, names: Sequence[str] | None = None) -> dict[str, float]:
    """A cheap fingerprint of the engine's weights (sum of each parameter), for tests and checks."""
    out = {}
    for name, param in _model(worker).named_parameters():
        if names is None or name in names:
            out[name] = float(param.detach().float().sum())
    return out


def drain(worker: Any, sizes: Sequence[int]) -> int:
    """Receive raw buffers without loading them: the bare-transport baseline of benchmarks."""
    group: SyncGroup | None = getattr(worker, _GROUP_ATTR, None)
    if group is None:
        raise RuntimeError("this engine has not joined a weight-sync group (init_weight_sync first)")
    return receive_raw(group, sizes)
