"""Engine-side weight loading: these functions run inside each vLLM worker (via collective_rpc)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from omni.handoff import Channel, receive_over
from omni.names import EMBED_TOKENS, LM_HEAD, THINKER_PREFIX
from omni.weightsync import BucketSpec, GroupInfo, SyncGroup, receive_buckets, receive_raw

_GROUP_ATTR = "_echoink_sync_group"
_IPC_CACHE_ATTR = "_echoink_ipc_buffers"  # CUDA IPC buffers opened once, kept across pushes


def _model(worker: Any) -> torch.nn.Module:
    return worker.model_runner.model


def _device(worker: Any) -> torch.device:
    return next(_model(worker).parameters()).device


def join_sync_group(worker: Any, info: GroupInfo, first_rank: int) -> int:
    """Join the learner's sync group as ``first_rank`` + this worker's tensor-parallel rank; a
    group joined before (an engine that survived another's restart) is closed first, so the
    worker never holds two communicators."""
    leave_sync_group(worker)
    tp_rank = getattr(worker, "rank", 0) or 0
    rank = first_rank + int(tp_rank)
    setattr(worker, _GROUP_ATTR, SyncGroup(info, rank, device=_device(worker)))
    return rank


def leave_sync_group(worker: Any) -> None:
    """Close this worker's sync group, if it has one."""
    group: SyncGroup | None = getattr(worker, _GROUP_ATTR, None)
    if group is not None:
        setattr(worker, _GROUP_ATTR, None)
        group.close()


def head_shares_embeddings(worker: Any) -> bool:
    """Whether this engine's LM head is its input-embedding matrix (a tied checkpoint)."""
    language_model = getattr(_model(worker), "language_model", None)
    if language_model is None:
        return False
    head = getattr(getattr(language_model, "lm_head", None), "weight", None)
    embed = getattr(getattr(getattr(language_model, "model", None), "embed_tokens", None), "weight", None)
    return head is not None and head is embed


def load_named_weights(worker: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Load full (unsharded) ``thinker.…`` tensors in place; returns how many arrived.

    The CPU backend repacks linear weights at start-up, so a plain ``load_weights`` cannot write
    into them afterwards; ``reload_weights`` loads checkpoint-format tensors and re-runs that
    processing. GPU workers load straight into their parameters.

    A tied head arrives as the embeddings alone (``omni.names.without_tied_head``). On GPUs that
    is all it needs: the head is the same storage. The CPU backend also keeps a repacked copy of
    the head for its logits GEMM, rebuilt only when the head itself is reloaded (seen on vLLM
    0.32 CPU: without it the engine kept sampling from the old head), so there the embeddings
    are fed in a second time under the head's name. That extra tensor is not counted.
    """
    from vllm.platforms import current_platform

    count = 0
    pushed: list[str] = []
    runner = worker.model_runner
    cpu_reload = current_platform.is_cpu() and hasattr(runner, "reload_weights")
    refeed_head = cpu_reload and head_shares_embeddings(worker)

    def counted() -> Iterable[tuple[str, torch.Tensor]]:
        nonlocal count
        for name, tensor in weights:
            count += 1
            pushed.append(name)
            yield name, tensor
            if refeed_head and name == THINKER_PREFIX + EMBED_TOKENS:
                yield THINKER_PREFIX + LM_HEAD, tensor

    if cpu_reload:
        runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        repack_reloaded_experts(_model(worker), pushed)
    else:
        _model(worker).load_weights(weights=counted())
    return count


# a language-model layer's experts: ``thinker.model.layers.3.mlp.experts.gate_up_proj`` (pushed, fused),
# ``….experts.7.down_proj.weight`` (per expert), ``language_model.model.layers.3.mlp.experts.routed_experts``
# (vLLM's module)
_EXPERTS = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.mlp\.experts(?:\.(?:\d+\.)?(gate_up_proj|gate_proj|up_proj|down_proj)|\.|$)")
_GATE_UP = {"gate_up_proj", "gate_proj", "up_proj"}


def repack_reloaded_experts(model: torch.nn.Module, names: Iterable[str]) -> int:
    """Repack the mixture-of-experts layers (a Qwen3-Omni thinker's) whose experts a CPU reload
    rewrote; returns how many.

    vLLM's CPU experts kernel repacks the expert weights into its grouped-GEMM layout once, at the
    first load. A reload writes the new values into the same tensors unpacked and skips that step
    (vLLM 0.32: ``UnquantizedFusedMoEMethod._setup_kernel`` calls the kernel's
    ``process_weights_after_loading`` only on its first call), so the engine would multiply by
    weights in the wrong layout: seen as a gap between vLLM's and the learner's log-probs that
    grew with every push. A layer is repacked when the push carried its experts, both their
    gate/up and their down projections (a push with only one of them is refused: the other would
    be repacked a second time).
    """
    kinds: dict[int, set[str]] = {}
    for name in names:
        found = _EXPERTS.search(name)
        if found and found.group(2):
            kinds.setdefault(int(found.group(1)), set()).add("gate_up" if found.group(2) in _GATE_UP else "down")
    partial = sorted(layer for layer, got in kinds.items() if got != {"gate_up", "down"})
    if partial:
        raise RuntimeError(f"a push carried only part of the experts of language-model layer(s) {partial}: "
                           "send each layer's gate/up and down projections together")
    repacked = 0
    for name, module in model.named_modules():
        kernel = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None), "fused_experts", None)
        found = _EXPERTS.search(name)
        if kernel is not None and found and int(found.group(1)) in kinds and hasattr(module, "w13_weight"):
            kernel.process_weights_after_loading(module)
            repacked += 1
    return repacked


def receive_weights(worker: Any, specs: Sequence[BucketSpec]) -> int:
    group: SyncGroup | None = getattr(worker, _GROUP_ATTR, None)
    if group is None:
        raise RuntimeError("this engine has not joined a weight-sync group (init_weight_sync first)")
    count = load_named_weights(worker, receive_buckets(group, specs))
    if _device(worker).type == "cuda":
        torch.cuda.synchronize()
    return count


def receive_handoff(worker: Any, specs: Sequence[BucketSpec], channel: Channel) -> int:
    """Load one push handed over inside the node (colocated placement, ``omni.handoff``): shared
    memory of Ray's object store on CPUs, CUDA IPC buffers on GPUs. Returns how many tensors
    arrived; the caller checks that count and resets the engine's caches, as after a broadcast.

    All buckets go through one ``load_named_weights`` call (a layer split over two CPU reloads
    would keep unloaded parts). Each bucket is checked against its spec before it is read and
    released to the sender as soon as the loader has taken it. Opened CUDA IPC buffers stay
    cached on the worker: the sender reuses them, so later pushes open nothing.
    """
    cache: dict[Any, Any] | None = getattr(worker, _IPC_CACHE_ATTR, None)
    if cache is None:
        cache = {}
        setattr(worker, _IPC_CACHE_ATTR, cache)
    count = load_named_weights(worker, receive_over(specs, channel, cache))
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
