"""A learner rank's models: the thinker (of the checkpoint's family, `omni.family`), whole (ZeRO-2) or partitioned over the ranks
as it is built (ZeRO-3), with the checkpoint's weights or weights drawn from the seed; the
trainable one wrapped in a DeepSpeed engine with its optimizer and learning-rate schedule, the
frozen reference beside it; and DeepSpeed's config, a pure function of the settings.

Every function here runs inside a rank's process after ``deepspeed.init_distributed`` (the
ZeRO-3 builds and gathers are collectives: every rank calls them in the same order).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from pathlib import Path
from typing import Any

import torch

from learner.schedule import lr_multiplier
from learner.types import LearnerSettings
from omni.family import family_of
from omni.names import require_safetensors, to_learner_name, to_vllm_name
from omni.tower_attention import set_tower_attention


def resolve_dtype(dtype: str, cuda: bool) -> torch.dtype:
    """The weights' dtype: ``auto`` is bfloat16 on GPUs and float32 on CPUs."""
    if dtype == "auto":
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, dtype)


def deepspeed_config(settings: LearnerSettings, *, dtype: torch.dtype, cuda: bool) -> dict[str, Any]:
    """DeepSpeed's config for the trainable engine (ZeRO stage, buckets, AdamW, clipping)."""
    s = settings
    zero: dict[str, Any] = {
        "stage": s.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": cuda,
        "reduce_bucket_size": int(5e8),
    }
    if s.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=int(5e8),
            stage3_param_persistence_threshold=int(1e6),
            stage3_max_live_parameters=int(1e9),
            stage3_max_reuse_distance=int(1e9),
        )
    else:
        zero["allgather_bucket_size"] = int(5e8)
    if s.offload_optimizer:  # ZeRO-Offload: the update runs on the host (DeepSpeed's CPU Adam)
        # not pinned: torch's pinned allocator rounds each block up to a power of two, so the 3B's
        # 18.8 GB fp32 partitions took 32 GB each and the 128 GB host ran out (measured, RESULTS 10)
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    bf16: dict[str, Any] = {"enabled": dtype == torch.bfloat16}
    if s.optimizer_dtype == "bfloat16":  # master weights, gradients and moments in bf16 (8 bytes a parameter less)
        bf16.update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    return {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": 1,
        # backward() only accumulates; step() is the boundary: one call of train_step is one
        # optimizer step whatever the number of micro-batches
        "managed_gradient_accumulation": False,
        "gradient_clipping": s.grad_clip,
        "zero_optimization": zero,
        "bf16": bf16,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": s.lr,
                "betas": list(s.betas),
                "eps": s.adam_eps,
                "weight_decay": s.weight_decay,
                # torch's AdamW on the GPU; under ZeRO-Offload DeepSpeed's CPU Adam (vectorised, threaded:
                # torch's on host tensors is several times slower), compiled on first use
                "torch_adam": not s.offload_optimizer,
                "adam_w_mode": True,
                # torch's fused kernel: its multi-tensor (foreach) AdamW makes a temporary the size
                # of the moments at each update (17.5 GiB on the 3B layout, RESULTS.md section 11)
                **({"fused": True} if s.fused_optimizer and cuda and not s.offload_optimizer else {}),
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_thinker(settings: LearnerSettings, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The whole (unpartitioned) thinker: the checkpoint's weights, or with ``random_init``
    transformers' initialisation drawn from ``settings.seed`` on ``device``.

    One function for every path that draws random weights — ZeRO-2 ranks, ZeRO-3's rank 0 (which
    scatters them into the partitions) and the bare forward/backward of
    benchmarks/bench_learner.py — so that they all start from the same values for a seed.
    """
    from transformers import AutoConfig

    Thinker = family_of(settings.model_path).thinker_type()  # noqa: N806 (a class)
    if not settings.random_init:
        model = Thinker.from_pretrained(
            str(settings.model_path),
            dtype=dtype,
            attn_implementation=settings.attn_implementation,
            local_files_only=True,
            use_safetensors=True,  # never unpickle weights
        )
        return set_tower_attention(model, settings.tower_attention)
    config = AutoConfig.from_pretrained(str(settings.model_path), local_files_only=True)
    thinker_config = getattr(config, "thinker_config", config)
    # the same seed for the policy and the reference (they start equal, as from a checkpoint);
    # built on the device: initialising billions of weights on the host's CPU takes minutes, and
    # the device's generator is what every path draws from
    torch.manual_seed(settings.seed)
    with torch.device(device):
        model = Thinker._from_config(thinker_config, attn_implementation=settings.attn_implementation, dtype=dtype)
    return set_tower_attention(model, settings.tower_attention)


def scatter_zero3(model: torch.nn.Module, whole: torch.nn.Module | None, rank: int) -> None:
    """Fill ``model``'s ZeRO-3 partitions with the values of rank 0's unpartitioned ``whole``
    (None on the other ranks): every rank joins each parameter's gather, rank 0 overwrites the full
    tensor and every rank keeps its shard of it. Buffers (rotary frequencies) are not partitioned:
    each rank's construction computed them from the config."""
    import deepspeed

    if rank == 0 and whole is None:
        raise ValueError("scatter_zero3: rank 0 needs the whole model")
    source = dict(whole.named_parameters()) if rank == 0 and whole is not None else {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                if name not in source:
                    raise KeyError(f"scatter_zero3: the whole model has no parameter {name}")
                param.data.copy_(source[name].data)


def load_weights_zero3(model: torch.nn.Module, model_path: Path, rank: int) -> None:
    """Fill partitioned parameters from the checkpoint at ``model_path``: rank 0 reads, every rank
    takes its shard."""
    import deepspeed
    from safetensors import safe_open

    files = require_safetensors(model_path)
    location: dict[str, Path] = {}
    if rank == 0:
        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if name.startswith("thinker."):
                        location[to_learner_name(name)] = path
    handles: dict[Path, Any] = {}

    def read(name: str) -> torch.Tensor:
        path = location[name]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(to_vllm_name(name))

    try:
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.data.copy_(checkpoint_tensor(name, location, read, model_path))
    finally:
        handles.clear()


def checkpoint_tensor(
    name: str, present: Container[str], read: Callable[[str], torch.Tensor], where: Path
) -> torch.Tensor:
    """The checkpoint's value of the learner parameter ``name``: stored under its own name, or — a
    mixture-of-experts layer in the released layout, one tensor per expert and projection — stacked
    the way transformers fuses them at load (``experts.gate_up_proj`` [E, 2I, H] holds each expert's
    gate then up rows, ``experts.down_proj`` [E, H, I] each expert's down)."""
    if name in present:
        return read(name)
    stem, dot, kind = name.rpartition(".experts.")
    parts = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}.get(kind)
    if dot and parts:
        count = 0
        while f"{stem}.experts.{count}.{parts[0]}.weight" in present:
            count += 1
        missing = [f"{stem}.experts.{e}.{part}.weight" for e in range(count) for part in parts
                   if f"{stem}.experts.{e}.{part}.weight" not in present]
        if count and missing:
            raise KeyError(f"{where}: parameter {name} is stored per expert, but {missing[:3]} are missing")
        if count:
            return torch.stack([
                torch.cat([read(f"{stem}.experts.{e}.{part}.weight") for part in parts], dim=0) for e in range(count)
            ])
    raise KeyError(f"{where}: no weight for parameter {name}")


def build_model(
    settings: LearnerSettings,
    config: dict[str, Any],
    *,
    rank: int,
    device: torch.device,
    dtype: torch.dtype,
    trainable: bool,
) -> torch.nn.Module:
    """This rank's thinker on ``device``: under ZeRO-3 partitioned as it is built (``config`` is
    the :func:`deepspeed_config` that partitions it), else whole; frozen and in eval mode unless
    ``trainable``."""
    import deepspeed
    from transformers import AutoConfig

    s = settings
    Thinker = family_of(s.model_path).thinker_type()  # noqa: N806 (a class)
    if s.zero_stage == 3:
        hf_config = AutoConfig.from_pretrained(str(s.model_path), local_files_only=True)
        thinker_config = getattr(hf_config, "thinker_config", hf_config)
        from transformers.initialization import no_init_weights

        drawn = None
        if s.random_init and rank == 0:
            # The weights ZeRO-2 would draw, bit for bit: the same build, whole, on rank 0
            # (before zero.Init, which would partition it), then scattered into the shards
            # below and freed (rank 0 holds one whole copy meanwhile: 17.9 GB for the 7B in
            # bf16). transformers' own initialisation cannot run inside zero.Init: it writes
            # into parameters already partitioned away (and no_init_weights, needed for that
            # reason, leaves the shards as whatever memory held); its per-module ZeRO-3 variant
            # draws in another order than the whole build, so other values.
            drawn = build_thinker(s, device, dtype)
        # The dtype comes from the config's bf16 section: DeepSpeed 0.19.8 ignores an explicit
        # dtype on accelerators without fp16 (the CPU).
        with deepspeed.zero.Init(config_dict_or_path=config), no_init_weights():
            model = Thinker._from_config(thinker_config, attn_implementation=s.attn_implementation, dtype=dtype)
        set_tower_attention(model, s.tower_attention)
        if s.random_init:
            scatter_zero3(model, drawn, rank)
            del drawn
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the whole copy's blocks: the optimizer states want them
        else:
            load_weights_zero3(model, s.model_path, rank)
    else:
        model = build_thinker(s, device, dtype)
    model.to(device)
    if not trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def freeze_prefixes(model: torch.nn.Module, prefixes: tuple[str, ...]) -> int:
    """Hold fixed every parameter whose name starts with one of ``prefixes``; returns how many.

    A prefix that matches nothing is a typo in a config, not a no-op: it fails with the names
    that do exist at the top of the module tree.
    """
    params = dict(model.named_parameters())
    frozen = 0
    for prefix in prefixes:
        stem = prefix.rstrip(".")
        hits = [name for name in params if name == stem or name.startswith(stem + ".")]
        if not hits:
            tops = sorted({".".join(n.split(".")[:2]) for n in params})
            raise ValueError(f"learner.freeze: {prefix!r} matches no parameter; prefixes at hand: {tops}")
        for name in hits:
            params[name].requires_grad_(False)
            frozen += params[name].numel()
    return frozen


def build_engine(settings: LearnerSettings, model: torch.nn.Module, config: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The trainable ``model`` (from :func:`build_model`) in a DeepSpeed engine: the configured
    parts frozen, AdamW with weight decay on matrices only, the learning-rate schedule. Returns
    (engine, optimizer, scheduler); without ``settings.train`` (weight-sync benchmarks) the engine
    holds the weights only, and optimizer and scheduler are None."""
    import deepspeed

    s = settings
    if s.freeze_audio_tower:
        model.audio_tower.requires_grad_(False)
    if s.freeze_vision_tower:
        model.visual.requires_grad_(False)
    freeze_prefixes(model, s.freeze)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step, total=s.total_steps, warmup=s.warmup_steps, kind=s.lr_schedule, min_ratio=s.min_lr_ratio
            ),
        )

    if not s.train:  # weights only: no optimizer states
        inference = {k: v for k, v in config.items() if k not in ("optimizer", "managed_gradient_accumulation")}
        engine, *_ = deepspeed.initialize(model=model, config=inference)
        return engine, None, None
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=[g for g in groups if g["params"]], config=config, lr_scheduler=schedule
    )
    initialize_adam_states(optimizer)
    return engine, optimizer, scheduler


def initialize_adam_states(optimizer: Any) -> bool:
    """Allocate torch Adam's moments now, before any activation exists; returns whether it did.

    torch allocates them lazily, inside the first step, after the step's activations were freed,
    so the caching allocator may place each moment (18.8 GB on the 3B layout) in a segment that
    activations used, whose free rest then cannot be returned to the driver. Measured on an H200
    (RESULTS.md section 11, part 2): after a colocated 3B step the learner held 96.9 GiB at rest
    instead of about 80, and the engine could not wake. Allocated here, before any activation, the
    moments get segments of their own (this cause is our reading; the fix is not yet measured on
    a GPU).

    Exact: one step with zero gradients at learning rate 0, then the step counter set back to 0 —
    zero moments, unchanged weights (1 − 0·decay is 1, the update 0), as lazy initialisation leaves
    them. DeepSpeed's CPU Adam (ZeRO-Offload) is not torch's Adam and keeps its own way.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wrapper holds torch's optimizer
    if not isinstance(inner, torch.optim.Adam):  # AdamW is one
        return False
    params = [p for group in inner.param_groups for p in group["params"] if p.requires_grad]
    if not params or all(len(inner.state[p]) > 0 for p in params):
        return False
    rates = [group["lr"] for group in inner.param_groups]
    for group in inner.param_groups:
        group["lr"] = 0.0
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
    finally:
        for p in params:
            p.grad = None
        for group, rate in zip(inner.param_groups, rates, strict=True):
            group["lr"] = rate
    for p in params:
        inner.state[p]["step"].zero_()
    return True


def build_reference(
    settings: LearnerSettings, config: dict[str, Any], *, rank: int, device: torch.device, dtype: torch.dtype
) -> Any:
    """The frozen reference policy for the KL term: the same build as the trainable model, under
    ZeRO-3 in an inference engine of its own (partitioned like the policy), else the bare module."""
    import deepspeed

    model = build_model(settings, config, rank=rank, device=device, dtype=dtype, trainable=False)
    if settings.zero_stage == 3:
        reference_config = {
            "train_micro_batch_size_per_gpu": settings.micro_batch_size,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": int(1e6)},
            "bf16": {"enabled": dtype == torch.bfloat16},
        }
        engine, *_ = deepspeed.initialize(model=model, config=reference_config)
        engine.eval()
        return engine
    return model
