"""One learner rank: a DeepSpeed engine around the Qwen2.5-Omni thinker, in a Ray actor.

A rank builds model inputs itself (same media path as the engines), computes policy and reference
log-probs over completion tokens, accumulates gradients over micro-batches and steps once per call.
It also streams its weights to the rollout engines and writes loadable checkpoints.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from learner.export import copy_model_files, write_weights
from learner.grpo import LossNorm, aggregate, policy_loss
from learner.schedule import lr_multiplier
from learner.types import Experience, LearnerSettings
from omni.failpoints import failpoint
from omni.handoff import Channel, Stager, send_over
from omni.inputs import (
    ModelBatch,
    PromptFeatures,
    add_positions,
    collate,
    collate_shared,
    completion_logprobs,
    encode_prompt,
    load_processor,
    media_token_ids,
    prepare_prompt,
    unused_tower_term,
)
from omni.names import (
    head_is_tied,
    require_safetensors,
    to_learner_name,
    to_vllm_name,
    without_tied_head,
)
from omni.quiet import quiet_default_talker_warnings
from omni.weightsync import (
    BucketSpec,
    GroupInfo,
    SyncGroup,
    pack_bucket,
    plan_buckets,
    send_buckets,
    send_raw,
)

TRAIN_STATE_DIR = "train_state"
HANDOFF_IN_FLIGHT = 2  # buckets staged for a colocated engine at once: extra memory of two buckets
TRAIN_STATE_TAG = "state"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray
        return "127.0.0.1"


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


class LearnerWorker:
    """Rank ``rank`` of ``world_size``. Construction is cheap; :meth:`setup` joins the group."""

    def __init__(self, settings: LearnerSettings, rank: int, world_size: int) -> None:
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.sync: SyncGroup | None = None
        self.stager: Stager | None = None  # colocated placement: buffers handed to this rank's engine
        self.steps_done = 0

    def address(self) -> tuple[str, int]:
        return node_ip(), free_port()

    # ------------------------------------------------------------------ setup
    def setup(self, master_addr: str, master_port: int) -> dict[str, Any]:
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        started = time.perf_counter()
        # This actor's process is the rank's alone, so these process-wide settings stay with it:
        # DeepSpeed 0.19 calls torch's deprecated all-gather name on every ZeRO gather and torch
        # warns each time; transformers warns about its default talker config when the
        # checkpoint's Qwen2.5-Omni config is loaded (omni.quiet).
        warnings.filterwarnings(
            "ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated", category=FutureWarning
        )
        quiet_default_talker_warnings()
        import deepspeed

        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(
            dist_backend="nccl" if self.cuda else "gloo",
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=self.settings.collective_timeout_s),
        )
        torch.manual_seed(self.settings.seed)
        s = self.settings
        if not s.random_init:
            require_safetensors(s.model_path)
        if s.dtype == "auto":
            self.dtype = torch.bfloat16 if self.cuda else torch.float32
        else:
            self.dtype = getattr(torch, s.dtype)
        self.ds_config = self._ds_config()
        model = self._build_model(trainable=True)
        self._progress(f"model built ({time.perf_counter() - started:.0f} s)")
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

        if s.train:
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, model_parameters=[g for g in groups if g["params"]], config=self.ds_config, lr_scheduler=schedule
            )
        else:  # weights only (sync benchmarks): no optimizer states
            inference = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "managed_gradient_accumulation")}
            self.engine, *_ = deepspeed.initialize(model=model, config=inference)
            self.optimizer = self.scheduler = None
        self._progress(f"DeepSpeed ZeRO-{s.zero_stage} engine ready ({time.perf_counter() - started:.0f} s)")
        self.reference = self._build_reference() if s.beta > 0 else None
        self.processor = load_processor(s.model_path)
        tokenizer = self.processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None})
        self.media_ids = media_token_ids(tokenizer)
        self.named_params = dict(self.engine.module.named_parameters())
        import ray

        context = ray.get_runtime_context() if ray.is_initialized() else None
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_id": context.get_node_id() if context else "",
            "gpus": context.get_accelerator_ids().get("GPU", []) if context else [],
            "device": str(self.device),
            "dtype": str(self.dtype),
            "setup_seconds": time.perf_counter() - started,
            "parameters": sum(_numel(p) for p in self.named_params.values()),
            "trainable": sum(_numel(p) for p in self.named_params.values() if p.requires_grad),
        }

    def _progress(self, message: str) -> None:
        """Set-up of a large model takes minutes: say where it is (Ray forwards it to the driver)."""
        if self.rank == 0:
            print(f"[echoink] learner: {message}", flush=True)

    def _ds_config(self) -> dict[str, Any]:
        s = self.settings
        zero: dict[str, Any] = {
            "stage": s.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": self.cuda,
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
        return {
            "train_micro_batch_size_per_gpu": s.micro_batch_size,
            "gradient_accumulation_steps": 1,
            # backward() only accumulates; step() is the boundary: one call of train_step is one
            # optimizer step whatever the number of micro-batches
            "managed_gradient_accumulation": False,
            "gradient_clipping": s.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.dtype == torch.bfloat16},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": s.lr,
                    "betas": list(s.betas),
                    "eps": s.adam_eps,
                    "weight_decay": s.weight_decay,
                    "torch_adam": True,
                    "adam_w_mode": True,
                },
            },
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def _build_model(self, trainable: bool) -> torch.nn.Module:
        import deepspeed
        from transformers import AutoConfig
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

        s = self.settings
        if s.zero_stage == 3:
            config = AutoConfig.from_pretrained(str(s.model_path), local_files_only=True)
            thinker_config = getattr(config, "thinker_config", config)
            from transformers.initialization import no_init_weights

            drawn = None
            if s.random_init and self.rank == 0:
                # The weights ZeRO-2 would draw, bit for bit: the same build, whole, on rank 0
                # (before zero.Init, which would partition it), then scattered into the shards
                # below and freed (rank 0 holds one whole copy meanwhile: 17.9 GB for the 7B in
                # bf16). transformers' own initialisation cannot run inside zero.Init: it writes
                # into parameters already partitioned away (and no_init_weights, needed for that
                # reason, leaves the shards as whatever memory held); its per-module ZeRO-3 variant
                # draws in another order than the whole build, so other values.
                drawn = build_thinker(s, self.device, self.dtype)
            # The dtype comes from the config's bf16 section: DeepSpeed 0.19.8 ignores an explicit
            # dtype on accelerators without fp16 (the CPU).
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config), no_init_weights():
                model = Thinker._from_config(thinker_config, attn_implementation=s.attn_implementation, dtype=self.dtype)
            if s.random_init:
                scatter_zero3(model, drawn, self.rank)
                del drawn
                if self.cuda:
                    torch.cuda.empty_cache()  # the whole copy's blocks: the optimizer states want them
            else:
                self._load_weights_zero3(model)
        else:
            model = build_thinker(s, self.device, self.dtype)
        model.to(self.device)
        if not trainable:
            model.eval()
            model.requires_grad_(False)
        return model

    def _load_weights_zero3(self, model: torch.nn.Module) -> None:
        """Fill partitioned parameters from the checkpoint: rank 0 reads, every rank takes its shard."""
        import deepspeed
        from safetensors import safe_open

        files = require_safetensors(self.settings.model_path)
        location: dict[str, Path] = {}
        if self.rank == 0:
            for path in files:
                with safe_open(str(path), framework="pt") as fh:
                    for name in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                        if name.startswith("thinker."):
                            location[to_learner_name(name)] = path
        handles: dict[Path, Any] = {}
        try:
            for name, param in model.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.rank == 0:
                        if name not in location:
                            raise KeyError(f"{self.settings.model_path}: no weight for parameter {name}")
                        path = location[name]
                        if path not in handles:
                            handles[path] = safe_open(str(path), framework="pt")
                        param.data.copy_(handles[path].get_tensor(to_vllm_name(name)))
        finally:
            handles.clear()

    def _build_reference(self) -> Any:
        import deepspeed

        model = self._build_model(trainable=False)
        if self.settings.zero_stage == 3:
            config = {
                "train_micro_batch_size_per_gpu": self.settings.micro_batch_size,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": int(1e6)},
                "bf16": {"enabled": self.dtype == torch.bfloat16},
            }
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
            return engine
        return model

    # ------------------------------------------------------------------ batches
    def _features(self, experiences: Sequence[Experience], cache: dict[str, PromptFeatures]) -> list[PromptFeatures]:
        out = []
        for exp in experiences:
            key = exp.record.id
            if key not in cache:
                prompt = prepare_prompt(
                    exp.record, self.processor, media=self.settings.media, system_prompt=self.settings.system_prompt
                )
                cache[key] = add_positions(self.engine.module, encode_prompt(self.processor, prompt))
            out.append(cache[key])
        return out

    def _batch(self, experiences: Sequence[Experience], cache: dict[str, PromptFeatures]) -> ModelBatch:
        prompts = self._features(experiences, cache)
        completions = [e.completion_ids for e in experiences]
        common = dict(pad_id=self.pad_id, eos_ids=self.eos_ids, forbidden_ids=self.media_ids)
        if self.settings.share_prompts:
            batch = collate_shared(prompts, [e.record.id for e in experiences], completions, **common)
        else:
            batch = collate(prompts, completions, **common)
        batch = batch.to(self.device, float_dtype=self.dtype)
        batch.completion_mask = batch.completion_mask.float()
        return batch

    def _logprobs(
        self, model: Any, batch: ModelBatch, entropy: list[torch.Tensor] | None = None, entropy_grad: bool = False
    ) -> torch.Tensor:
        module = getattr(model, "module", model)
        return completion_logprobs(
            model,
            batch,
            lm_head=module.lm_head,
            temperature=self.settings.temperature,
            chunk=self.settings.logprob_chunk,
            entropy=entropy,
            entropy_grad=entropy_grad,
        )

    # ------------------------------------------------------------------ training
    def train_step(self, experiences: Sequence[Experience], norm: LossNorm) -> dict[str, float]:
        """Forward/backward over micro-batches of this rank's share, then one optimizer step.

        Returns this rank's parts of the step's learner metrics, keyed by their names in
        ``omni.metrics`` and shaped for each metric's ``combine`` rule (``learner.group.combine``
        turns the ranks' parts into the step's values): "sum" metrics are this rank's sums;
        "per_token" ones Σ value × tokens over the trained (real) tokens; "per_sampled_token" ones
        Σ over the trained tokens that have a sampler log-prob, whose count is the helper
        ``_sampled_tokens`` (helpers start with "_" and are no metric); "max"/"min"/"first" ones the
        rank's own value. Padding sequences add nothing.
        """
        s = self.settings
        started = time.perf_counter()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()  # the step's own peak, not the run's
        self.engine.train()
        cache: dict[str, PromptFeatures] = {}
        parts: dict[str, float] = defaultdict(float)
        parts["learner/nonfinite_loss"] = 0.0  # reported when nothing went wrong too
        ratio_max, ratio_min = -math.inf, math.inf
        lr = float(self.scheduler.get_last_lr()[0])
        for start in range(0, len(experiences), s.micro_batch_size):
            micro = experiences[start : start + s.micro_batch_size]
            batch = self._batch(micro, cache)
            real = torch.tensor([0.0 if e.dummy else 1.0 for e in micro], device=self.device)
            mask = batch.completion_mask * real.unsqueeze(1)
            advantages = torch.tensor([e.advantage for e in micro], device=self.device, dtype=torch.float32)
            entropy: list[torch.Tensor] = []
            logp = self._logprobs(self.engine, batch, entropy, entropy_grad=s.entropy_coef > 0)
            ref_logp = None
            if self.reference is not None:
                with torch.no_grad():
                    ref_logp = self._logprobs(self.reference, batch)
            sampled = sampler_logprobs([e.sampler_logprobs for e in micro], mask)
            old_logp = logp.detach()
            if micro[0].old_logprobs is not None:  # a later pass over the batch: the first pass's policy
                old_logp = _rows(torch.zeros_like(logp), [e.old_logprobs for e in micro])
            if s.off_policy and sampled is not None and s.clip_eps is not None:
                # PPO's clip against the behaviour policy, which sampled a step ago. A token without
                # a sampler log-prob is treated as on-policy (ratio 1); see rollout_weights
                old_logp = torch.where(sampled.known, sampled.logprobs, old_logp)
            correction = _correction(s)
            is_weights = rollout_weights(logp.detach(), sampled, mask, correction, s) if sampled is not None else None
            loss, metrics = policy_loss(
                logp,
                old_logp,
                ref_logp,
                advantages,
                mask,
                beta=s.beta,
                clip_eps=s.clip_eps,
                agg=s.loss_agg,
                kl=s.kl_estimator,
                is_weights=is_weights,
                norm=norm,
                loss=s.policy_loss,
            )
            idle = unused_tower_term(self.engine.module, batch.inputs) if self.world_size > 1 else None
            if idle is not None:  # zero: keeps every rank's gradient reduction the same in mixed batches
                loss = loss + idle
            if s.entropy_coef > 0:  # an entropy bonus: −c · H, aggregated like the loss
                loss = loss - s.entropy_coef * aggregate(entropy[0], mask, s.loss_agg, norm)
            parts["entropy"] += float((entropy[0].detach() * mask).sum())
            if failpoint("learner.loss") == "nan":
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                parts["learner/nonfinite_loss"] += 1.0
            # DeepSpeed averages gradients over ranks; the shares already sum to the batch loss
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            tokens = float(mask.sum())
            parts["loss"] += float(loss.detach())
            parts["learner/tokens"] += tokens
            parts["learner/input_tokens"] += float((batch.input_tokens * real).sum())
            parts["logprob_mean"] += float((logp.detach() * mask).sum())
            parts["kl"] += metrics["kl"] * tokens
            parts["clip_fraction"] += metrics["clip_fraction"] * tokens
            parts["ratio/mean"] += metrics["ratio/mean"] * tokens
            if tokens > 0:  # a micro-batch of padding alone reports a ratio of 1 that no token has
                ratio_max = max(ratio_max, metrics["ratio/max"])
                ratio_min = min(ratio_min, metrics["ratio/min"])
            if sampled is not None:
                detached = logp.detach()
                zero = torch.zeros_like(detached)
                prob_gap = torch.where(sampled.known, (torch.exp(detached) - torch.exp(sampled.logprobs)).abs(), zero)
                logp_gap = torch.where(sampled.known, (detached - sampled.logprobs).abs(), zero)
                parts["mismatch/token_prob_error"] += float(prob_gap.sum())
                parts["mismatch/logprob_abs_error"] += float(logp_gap.sum())
                parts["mismatch/missing_logprobs"] += float(sampled.missing.sum())
                parts["_sampled_tokens"] += float(sampled.known.sum())
                # the learner against the sampler on the sampled tokens: KL(μ‖π) by k3 (r − 1 − log r,
                # r = π/μ) and the log-perplexity gap (mean log μ − mean log π)
                log_r = torch.where(sampled.known, detached - sampled.logprobs, zero)
                parts["rollout_correction/kl"] += float(torch.where(sampled.known, log_r.exp() - 1 - log_r, zero).sum())
                parts["rollout_correction/log_ppl_diff"] += float(-log_r.sum())
                if is_weights is not None:
                    w = torch.where(mask > 0, is_weights, zero)
                    parts["rollout_correction/masked_share"] += float(((w == 0) & (mask > 0)).sum())
                    parts["_weight_sum"] += float(w.sum())
                    parts["_weight_sq_sum"] += float((w**2).sum())
        skipped_before = self.engine.skipped_steps
        self.engine.step()  # DeepSpeed skips the update (and clears the gradients) on a non-finite norm
        parts["learner/step_skipped"] = float(self.engine.skipped_steps - skipped_before)
        grad_norm = self.engine.get_global_grad_norm()
        self.steps_done += 1
        parts["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        parts["lr"] = lr
        if ratio_max >= ratio_min:  # at least one trained token on this rank
            parts["ratio/max"], parts["ratio/min"] = ratio_max, ratio_min
        if self.cuda:
            parts["memory/learner_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if s.release_memory:  # a colocated engine wakes into what the step's activations held
                torch.cuda.empty_cache()
        parts["timing/learn_s"] = time.perf_counter() - started
        return dict(parts)

    @torch.no_grad()
    def compute_logprobs(self, experiences: Sequence[Experience], reference: bool = False) -> list[list[float]]:
        """Per-token log-probs of each completion (through the end-of-turn token)."""
        model = self.reference if reference else self.engine
        if model is None:
            raise ValueError("no reference model (beta is 0)")
        was_training = self.engine.training
        self.engine.eval()
        cache: dict[str, PromptFeatures] = {}
        out: list[list[float]] = []
        try:
            for start in range(0, len(experiences), self.settings.micro_batch_size):
                batch = self._batch(experiences[start : start + self.settings.micro_batch_size], cache)
                logp = self._logprobs(model, batch)
                for row in range(logp.shape[0]):
                    n = int(batch.completion_mask[row].sum())
                    out.append(logp[row, :n].float().cpu().tolist())
        finally:
            self.engine.train(was_training)
        return out

    def eos_token_ids(self) -> list[int]:
        return list(self.eos_ids)

    # ------------------------------------------------------------------ weights out
    def _ordered_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self.named_params.items())

    def weight_specs(self, bucket_bytes: int) -> list[BucketSpec]:
        # a tied head is the embedding matrix: vLLM's shares its storage, so it is not pushed
        named = without_tied_head(self._ordered_params(), tied=head_is_tied(self.settings.model_path))
        return plan_buckets(
            ((to_vllm_name(n), _full_shape(p), self.dtype if p.is_floating_point() else p.dtype) for n, p in named),
            bucket_bytes,
        )

    def _gathered(self, specs: Sequence[BucketSpec], everyone: bool = False) -> Iterator[list[torch.Tensor] | None]:
        """Per bucket, the full tensors on rank 0 (on every rank with ``everyone``; else None on
        the other ranks, which join the gathers)."""
        import deepspeed

        mine = everyone or self.rank == 0
        for spec in specs:
            params = [self.named_params[to_learner_name(t.name)] for t in spec.tensors]
            # ZeRO-3 gathers each bucket's parameters from every rank (a collective); ZeRO-2
            # ranks hold them whole already
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.settings.zero_stage == 3):
                yield [p.data.to(self.dtype) if p.is_floating_point() else p.data for p in params] if mine else None

    def init_weight_sync(self, info: GroupInfo) -> bool:
        """Rank 0 joins the sync group as its rank 0 (blocks until every engine worker has joined)."""
        if self.rank == 0:
            self.sync = SyncGroup(info, 0, device=self.device)
        return True

    def send_weights(self, specs: Sequence[BucketSpec], channel: Channel | None = None) -> dict[str, float]:
        """Stream every weight to the engines (all ranks call this: ZeRO-3 gathers are collective).

        With a ``channel`` (colocated placement) this rank hands its full weights over to the
        engine that shares its node or GPU (`omni.handoff`: shared memory on CPUs, CUDA IPC on
        GPUs); without, rank 0 broadcasts them to every engine over the sync group.
        """
        failpoint("learner.push")  # tests: a rank that dies during a push
        started = time.perf_counter()
        sent = 0
        if channel is not None:
            if self.stager is None:  # kept: the engine keeps the CUDA buffers it opened
                self.stager = Stager(self.device, in_flight=HANDOFF_IN_FLIGHT)
            sent = send_over(self.stager, channel, specs, self._gathered(specs, everyone=True))
        elif self.rank == 0:
            if self.sync is None:
                raise RuntimeError("init_weight_sync was not called on rank 0")
            buckets = (
                pack_bucket(spec, tensors, device=self.device)
                for spec, tensors in zip(specs, self._gathered(specs), strict=True)
            )
            sent = send_buckets(self.sync, buckets)
        else:
            for _ in self._gathered(specs):
                pass
        if self.cuda:
            torch.cuda.synchronize()
            if self.settings.release_memory:
                torch.cuda.empty_cache()  # ZeRO-3's gathered copies: give them back before the engine wakes
        return {"bytes": float(sent), "seconds": time.perf_counter() - started}

    def send_raw(self, sizes: Sequence[int]) -> dict[str, float]:
        """Rank 0: broadcast ready buffers of ``sizes`` bytes (the transport baseline for benchmarks)."""
        if self.rank != 0 or self.sync is None:
            return {"bytes": 0.0, "seconds": 0.0}
        buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for size in sizes]
        started = time.perf_counter()
        sent = send_raw(self.sync, buffers)
        if self.cuda:
            torch.cuda.synchronize()
        return {"bytes": float(sent), "seconds": time.perf_counter() - started}

    def named_weights(self, names: Sequence[str] | None = None) -> list[tuple[str, torch.Tensor]]:
        """Full weights on CPU under vLLM names (rank 0 returns them; small models, tests)."""
        specs = self.weight_specs(bucket_bytes=1 << 62)
        out: list[tuple[str, torch.Tensor]] = []
        for spec, tensors in zip(specs, self._gathered(specs), strict=True):
            if tensors is None:
                continue
            for ts, tensor in zip(spec.tensors, tensors, strict=True):
                if names is None or ts.name in names:
                    out.append((ts.name, tensor.detach().to("cpu").clone()))
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str, client_state: dict[str, Any] | None = None, train_state: bool = True) -> dict[str, Any]:
        """Write the loadable model folder (rank 0) and the resumable train state (every rank)."""
        dest = Path(folder)
        specs = self.weight_specs(bucket_bytes=1 << 30)

        def named() -> Iterator[tuple[str, torch.Tensor]]:
            for spec, tensors in zip(specs, self._gathered(specs), strict=True):
                if tensors is not None:
                    yield from ((ts.name, t) for ts, t in zip(spec.tensors, tensors, strict=True))

        if self.rank == 0:
            copy_model_files(Path(self.settings.model_path), dest)
            write_weights(dest, named())
        else:
            for _ in named():
                pass
        if train_state:
            self.engine.save_checkpoint(
                str(dest / TRAIN_STATE_DIR), tag=TRAIN_STATE_TAG, client_state=client_state or {}, save_latest=False
            )
        return {"rank": self.rank, "folder": str(dest)}

    def load_train_state(self, folder: str) -> dict[str, Any]:
        # DeepSpeed unpickles its train state with weights_only=False: load it safely instead
        self.engine.checkpoint_engine.load = safe_torch_load
        _, client_state = self.engine.load_checkpoint(
            str(Path(folder) / TRAIN_STATE_DIR),
            tag=TRAIN_STATE_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        return client_state or {}

    def ping(self) -> int:
        return self.rank

    def __repr__(self) -> str:
        """What Ray's dashboard shows for this actor (omni.actorrepr: taken once it has started)."""
        from omni.actorrepr import actor_repr

        return actor_repr(f"learner rank {self.rank}/{self.world_size}", f"step {self.steps_done}")


def safe_torch_load(path: str, map_location: Any = None) -> Any:
    """torch.load with weights_only=True, admitting the three plain-data DeepSpeed types that its
    optimizer states hold; anything else in the file is refused, not executed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def build_thinker(settings: LearnerSettings, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The whole (unpartitioned) thinker: the checkpoint's weights, or with ``random_init``
    transformers' initialisation drawn from ``settings.seed`` on ``device``.

    One function for every path that draws random weights — ZeRO-2 ranks, ZeRO-3's rank 0 (which
    scatters them into the partitions) and the bare forward/backward of
    benchmarks/bench_learner.py — so that they all start from the same values for a seed.
    """
    from transformers import AutoConfig
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    if not settings.random_init:
        return Thinker.from_pretrained(
            str(settings.model_path),
            dtype=dtype,
            attn_implementation=settings.attn_implementation,
            local_files_only=True,
            use_safetensors=True,  # never unpickle weights
        )
    config = AutoConfig.from_pretrained(str(settings.model_path), local_files_only=True)
    thinker_config = getattr(config, "thinker_config", config)
    # the same seed for the policy and the reference (they start equal, as from a checkpoint);
    # built on the device: initialising billions of weights on the host's CPU takes minutes, and
    # the device's generator is what every path draws from
    torch.manual_seed(settings.seed)
    with torch.device(device):
        return Thinker._from_config(thinker_config, attn_implementation=settings.attn_implementation, dtype=dtype)


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


def _numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    shape = getattr(param, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(param.shape)


@dataclass(frozen=True)
class SamplerLogprobs:
    """The sampler's (vLLM's) log-probs of a micro-batch's completion tokens, [B, C] each."""

    logprobs: torch.Tensor  # float32; NaN where unknown
    known: torch.Tensor  # bool: a trained token (in the mask) with a finite sampler log-prob
    missing: torch.Tensor  # bool: a trained token of a completion that came with log-probs, lacking one


def _correction(s: LearnerSettings) -> str:
    """``auto``: truncated importance weights for a one-step-off sampler, unless a clipped loss
    already takes its ratio against the sampler; none on policy (the reference run)."""
    if s.rollout_correction == "auto":
        return "tis" if s.off_policy and s.clip_eps is None else "none"
    return s.rollout_correction


def rollout_weights(
    logp: torch.Tensor, sampled: SamplerLogprobs, mask: torch.Tensor, correction: str, s: LearnerSettings
) -> torch.Tensor | None:
    """Per-token weights of the policy term that correct for sampling with vLLM's probabilities μ
    instead of the learner's π (a one-step-off sampler, or the two engines' numerical gap):

    - tis: min(π/μ, C), truncated importance sampling (Ionides 2008; Yao et al. 2025, "Your
      efficient RL framework secretly brings you off-policy RL training"), C = ``is_clip``;
    - token_mask: 1 where π/μ lies in [low, high], else 0 (the token leaves the loss);
    - seq_mask: 1 for a whole completion whose geometric-mean ratio exp(mean log π/μ) lies in
      [low, high], else 0.

    A token without a sampler log-prob is treated as on-policy: weight 1. Its weight π/μ is
    unknown, and 1 is that weight's expectation under the sampler (E_μ[π/μ] = 1): the token keeps
    its uncorrected gradient and its place in the loss's normalisation. (Reading log μ as 0 gave
    the weight π < 1, which shrank exactly the tokens that vLLM failed to report.)
    """
    if correction == "none":
        return None
    ones = torch.ones_like(logp)
    if correction == "tis":
        weights = torch.exp(logp - sampled.logprobs).clamp(max=s.is_clip)
        return torch.where(sampled.known, weights, ones) * mask
    log_r = torch.where(sampled.known, logp - sampled.logprobs, torch.zeros_like(logp))
    low, high = math.log(s.correction_low), math.log(s.correction_high)
    if correction == "token_mask":
        keep = (log_r >= low) & (log_r <= high)
    elif correction == "seq_mask":
        known = sampled.known.to(logp.dtype)
        mean = (log_r * known).sum(dim=1, keepdim=True) / known.sum(dim=1, keepdim=True).clamp(min=1)
        keep = ((mean >= low) & (mean <= high)).expand_as(log_r)
    else:
        raise ValueError(f"unknown rollout correction {correction!r}")
    return keep.to(logp.dtype) * mask


def _rows(out: torch.Tensor, rows: Sequence[Sequence[float] | None]) -> torch.Tensor:
    """Per-token values of each completion into ``out`` ([B, C]); shorter rows keep out's value."""
    for i, row in enumerate(rows):
        if row:
            n = min(len(row), out.shape[1])
            out[i, :n] = torch.tensor(list(row[:n]), dtype=out.dtype)
    return out


def sampler_logprobs(rows: Sequence[Sequence[float] | None], mask: torch.Tensor) -> SamplerLogprobs | None:
    """Line up each completion's sampler log-probs with its tokens; ``None`` when no completion
    carries any (batches built without a sampler: nothing to compare or to weight).

    A missing entry (a list shorter than the completion) or a non-finite one is unknown, never
    0, which would mean "the sampler was certain" and skew the mismatch metrics and the
    importance weights. Unknown tokens of a completion that came with log-probs are ``missing``
    (counted as ``mismatch/missing_logprobs``); a completion without any (``None``) is not
    counted: nothing was asked of a sampler for it.
    """
    if all(row is None for row in rows):
        return None
    if len(rows) != mask.shape[0]:
        raise ValueError(f"{len(rows)} rows of sampler log-probs for a batch of {mask.shape[0]} completions")
    values = torch.full(mask.shape, math.nan, dtype=torch.float32)
    given = torch.zeros(mask.shape[0], dtype=torch.bool)
    for i, row in enumerate(rows):
        if row is None:
            continue
        given[i] = True
        n = min(len(row), mask.shape[1])
        if n:
            values[i, :n] = torch.tensor(list(row[:n]), dtype=torch.float32)
    values = values.to(mask.device)
    finite = torch.isfinite(values)
    trained = mask > 0
    return SamplerLogprobs(
        logprobs=values,
        known=finite & trained,
        missing=~finite & trained & given.to(mask.device).unsqueeze(1),
    )
