"""One learner rank: a DeepSpeed engine around the Qwen2.5-Omni thinker, in a Ray actor.

A rank builds model inputs itself (same media path as the engines), computes policy and reference
log-probs over completion tokens, accumulates gradients over micro-batches and steps once per call.
It also streams its weights to the rollout engines and writes loadable checkpoints. What it
delegates: the models and DeepSpeed's config to `learner.model`, LoRA to `learner.lora`, the
model inputs to `learner.batches`, the weights it sends and saves to `learner.exports`, the loss to
`learner.grpo`, the rollout correction to `learner.correction`, the files of a checkpoint to
`learner.checkpoint_io`.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from learner.batches import BatchBuilder
from learner.checkpoint_io import (
    agree,
    deferred_write_errors,
    export_model,
    load_train_state,
    save_train_state,
)
from learner.correction import mismatch_parts, resolve_correction, rollout_weights, sampler_logprobs
from learner.exports import WeightExport, numel
from learner.grpo import LossNorm, aggregate, policy_loss
from learner.lora import adapters_off, add_adapters, lora_layers, write_adapter
from learner.model import (
    build_engine,
    build_model,
    build_reference,
    deepspeed_config,
    resolve_dtype,
)
from learner.offload import HostResident
from learner.phases import NullClock, PhaseClock
from learner.types import Experience, LearnerSettings
from omni.fixtures.failpoints import failpoint
from omni.forward import completion_logprobs, unused_tower_term
from omni.handoff import Channel, Stager, send_over
from omni.inputs import ModelBatch, PromptFeatures, load_processor
from omni.names import require_safetensors
from omni.quiet import quiet_default_talker_warnings
from omni.router import RouterCapture
from omni.sampling import SamplingDistribution
from omni.weightsync import (
    BucketSpec,
    GroupInfo,
    SyncGroup,
    pack_bucket,
    send_buckets,
    send_raw,
)

HANDOFF_IN_FLIGHT = 2  # buckets staged for a colocated engine at once: extra memory of two buckets


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
            if self.settings.max_gpu_memory_gb is not None:  # a smaller card on a larger one
                total = torch.cuda.get_device_properties(self.device).total_memory
                share = min(1.0, self.settings.max_gpu_memory_gb * 2**30 / total)
                torch.cuda.set_per_process_memory_fraction(share, self.device)
        deepspeed.init_distributed(
            dist_backend="nccl" if self.cuda else "gloo",
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=self.settings.collective_timeout_s),
        )
        torch.manual_seed(self.settings.seed)
        s = self.settings
        if not s.random_init:
            require_safetensors(s.model_path)
        self.dtype = resolve_dtype(s.dtype, self.cuda)
        config = deepspeed_config(s, dtype=self.dtype, cuda=self.cuda)
        model = build_model(s, config, rank=self.rank, device=self.device, dtype=self.dtype, trainable=True)
        if s.lora.enabled:  # before the engine: its optimizer gets the adapters only
            add_adapters(model, s.lora, seed=s.seed)
        # the routers, found once (a dense thinker is refused here, and by echoink plan before)
        self.balance = RouterCapture(model) if s.router_aux_loss_coef > 0 else None
        self._progress(f"model built ({time.perf_counter() - started:.0f} s)")
        # the reference for the KL term: a frozen copy of the starting model, or under LoRA the
        # policy itself with its adapters off (learner.lora) — no second model. Built before the
        # optimizer states, so that one kept on the host (learner.reference_device) has left the
        # GPU before they take their memory
        self.reference = (
            build_reference(s, config, rank=self.rank, device=self.device, dtype=self.dtype)
            if s.beta > 0 and not s.lora.enabled
            else None
        )
        self.reference_home = (
            HostResident(self.reference, self.device)
            if self.reference is not None and s.reference_device == "cpu"
            else None
        )
        self.engine, self.optimizer, self.scheduler = build_engine(s, model, config)
        self.clock: NullClock = NullClock()  # a PhaseClock for one clocked step (clocked_step)
        self._progress(f"DeepSpeed ZeRO-{s.zero_stage} engine ready ({time.perf_counter() - started:.0f} s)")
        self.processor = load_processor(s.model_path)
        self._batch = BatchBuilder(self.processor, self.engine.module, s, self.device, self.dtype)
        # the engines' sampling distribution, media placeholders suppressed as they are there
        self.distribution = SamplingDistribution(s.temperature, s.top_k, s.top_p, suppressed=tuple(self._batch.media_ids))
        self.adapters = list(lora_layers(self.engine.module).values())  # empty without LoRA
        # what the engines and the model folder get: each weight of the plain thinker under its
        # vLLM name (under LoRA a target's merged value, computed when sent)
        self.export = WeightExport(self.engine.module, s.model_path, self.dtype, zero3=s.zero_stage == 3)
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
            "parameters": self.export.parameters(),  # the plain thinker's
            "trainable": sum(numel(p) for p in self.engine.module.parameters() if p.requires_grad),
        }

    def _progress(self, message: str) -> None:
        """Set-up of a large model takes minutes: say where it is (Ray forwards it to the driver)."""
        if self.rank == 0:
            print(f"[echoink] learner: {message}", flush=True)

    def _logprobs(
        self,
        model: Any,
        batch: ModelBatch,
        entropy: list[torch.Tensor] | None = None,
        entropy_grad: bool = False,
        sampling: list[torch.Tensor] | None = None,
        outside: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The tempered log-probs (the loss's); with ``sampling`` / ``outside`` also those of the
        whole sampling distribution (omni.forward.completion_logprobs)."""
        module = getattr(model, "module", model)
        return completion_logprobs(
            model,
            batch,
            lm_head=module.lm_head,
            distribution=self.distribution,
            chunk=self.settings.logprob_chunk,
            fused=self.settings.fused_head,
            entropy=entropy,
            entropy_grad=entropy_grad,
            sampling=sampling,
            outside=outside,
        )

    def _reference_logprobs(self, batch: ModelBatch) -> torch.Tensor:
        """The reference policy's tempered log-probs, without gradients: the frozen copy, or under
        LoRA the policy with its adapters off (outside any graph: switching them touches their
        ``requires_grad``)."""
        with torch.no_grad():
            if self.reference is not None:
                return self._logprobs(self.reference, batch)
            with adapters_off(self.adapters):
                return self._logprobs(self.engine, batch)

    def _reference_visit(self) -> AbstractContextManager[Any]:
        """The reference's weights on the device for a ``with`` block (they are there already unless
        it lives on the host, learner.reference_device)."""
        return self.reference_home.on_device() if self.reference_home is not None else nullcontext()

    @property
    def has_reference(self) -> bool:
        return self.settings.beta > 0

    # ------------------------------------------------------------------ training
    def train_step(self, experiences: Sequence[Experience], norm: LossNorm) -> dict[str, float]:
        """Forward/backward over micro-batches of this rank's share, then one optimizer step.

        Returns this rank's parts of the step's learner metrics, keyed by their names in
        ``omni.metric_table`` and shaped for each metric's ``combine`` rule (``learner.group.combine``
        turns the ranks' parts into the step's values): "sum" metrics are this rank's sums;
        "per_token" ones Σ value × tokens over the trained (real) tokens; "per_sampled_token" ones
        Σ over the trained tokens that have a sampler log-prob, whose count is the helper
        ``_sampled_tokens`` (helpers start with "_" and are no metric); "max"/"min"/"first" ones the
        rank's own value. Padding and masked overlong completions add nothing.
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
        correction = resolve_correction(s.rollout_correction, s.off_policy, s.clip_eps)
        micros = [experiences[i : i + s.micro_batch_size] for i in range(0, len(experiences), s.micro_batch_size)]
        references: list[torch.Tensor] | None = None
        built: list[ModelBatch] = []
        clock = self.clock
        clock.lap("step start (memory statistics, schedule)")
        if self.reference_home is not None:  # one visit a step: every micro-batch's reference first
            built = [self._batch(micro, cache) for micro in micros]  # kept for the loop below
            clock.lap("inputs (processor, collation, copies to the device)")
            with self._reference_visit(), clock.scope("reference"):
                references = [self._reference_logprobs(batch) for batch in built]
                clock.lap("visit and forward")
        for index, micro in enumerate(micros):
            batch = built[index] if built else self._batch(micro, cache)
            real = torch.tensor([1.0 if e.in_loss else 0.0 for e in micro], device=self.device)
            mask = batch.completion_mask * real.unsqueeze(1)
            advantages = torch.tensor([e.advantage for e in micro], device=self.device, dtype=torch.float32)
            sampled = sampler_logprobs([e.sampler_logprobs for e in micro], mask)
            # Two views of one distribution (omni.sampling). The loss — the policy gradient, the KL
            # to the reference, the ratio between passes — uses the *tempered* log-probs (the
            # temperature alone, full vocabulary), as verl and TRL do and as the reference run did
            # (its loss took the whole softmax while it sampled with top-k 50, top-p 0.95):
            # a truncated log-prob has no value for a token outside the kept set, which rounding
            # at the boundary (bf16 on GPUs) or the reference model's own kept set would hit, and
            # its gradient ignores the tail. What is compared with vLLM's log-probs — the mismatch
            # metrics, the importance weights, the off-policy ratio — uses the *sampling*
            # distribution (the media bias, top-k and top-p too), which is what vLLM reports
            # (rollout.engine: processed log-probs): both sides of every such ratio are then the
            # same distribution.
            entropy: list[torch.Tensor] = []
            truncated: list[torch.Tensor] = []
            outside: list[torch.Tensor] = []
            compare = sampled is not None  # nothing to compare without sampler log-probs
            clock.lap("inputs (processor, collation, copies to the device)")
            # the reference first: under LoRA it is the policy's own forward with the adapters off
            with clock.scope("reference"):
                ref_logp = (
                    references[index] if references is not None
                    else self._reference_logprobs(batch) if self.has_reference else None
                )
                if ref_logp is not None:
                    clock.lap("forward and log-probs")
            balance = self.balance
            with balance or nullcontext():
                logp = self._logprobs(
                    self.engine,
                    batch,
                    entropy,
                    entropy_grad=s.entropy_coef > 0,
                    sampling=truncated if compare else None,
                    outside=outside if compare else None,
                )
            clock.lap("policy log-probs (log-softmax, entropy, sampling view)")
            old_logp = logp.detach()
            if micro[0].old_logprobs is not None:  # a later pass over the batch: the first pass's policy
                old_logp = _rows(torch.zeros_like(logp), [e.old_logprobs for e in micro])
            if s.off_policy and sampled is not None and s.clip_eps is not None:
                # PPO's clip against the behaviour policy, which sampled a step ago: the ratio's
                # value is π/μ of the sampling distribution on both sides (log π_samp − log μ),
                # its gradient that of the tempered log π, as on policy (log π − log π_samp, the
                # learner's gap between its two views, is moved onto μ). A token
                # without a sampler log-prob is treated as on-policy (ratio 1); see rollout_weights
                behaviour = sampled.logprobs + (logp.detach() - truncated[0])
                old_logp = torch.where(sampled.known, behaviour, old_logp)
            is_weights = rollout_weights(truncated[0], sampled, mask, correction, s) if sampled is not None else None
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
            if balance is not None:  # the micro-batch's share of the step's sequences: shares sum to the step's
                share = float(real.sum()) / max(norm.sequences, 1)
                weighted = balance.balance_loss() * share
                loss = loss + s.router_aux_loss_coef * weighted
                parts["learner/router_balance_loss"] += float(weighted.detach())
            parts["entropy"] += float((entropy[0].detach() * mask).sum())
            if failpoint("learner.loss") == "nan":
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                parts["learner/nonfinite_loss"] += 1.0
            # DeepSpeed averages gradients over ranks; the shares already sum to the batch loss
            clock.lap("loss (GRPO math, corrections)")
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            clock.lap("backward (with the checkpointed layers' recompute, gradient reduction)")
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
                for name, value in mismatch_parts(truncated[0], sampled, mask, is_weights, outside[0]).items():
                    parts[name] += value
            clock.lap("metrics (host reads)")
        skipped_before = self.engine.skipped_steps
        self.engine.step()  # DeepSpeed skips the update (and clears the gradients) on a non-finite norm
        clock.lap("optimizer step (clipping, update, schedule)")
        parts["learner/step_skipped"] = float(self.engine.skipped_steps - skipped_before)
        grad_norm = self.engine.get_global_grad_norm()
        self.steps_done += 1
        parts["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        parts["lr"] = lr
        if ratio_max >= ratio_min:  # at least one trained token on this rank
            parts["ratio/max"], parts["ratio/min"] = ratio_max, ratio_min
        parts["memory/host_used_gb"] = host_used_gib()  # the node's: offloaded states and a reference live there
        if self.cuda:
            parts["memory/learner_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if s.release_memory:  # a colocated engine wakes into what the step's activations held
                torch.cuda.empty_cache()
            # live tensors (weights, states) plus the cached blocks it kept: what a waking engine lacks
            parts["memory/learner_held_gb"] = torch.cuda.memory_reserved() / 2**30
        parts["timing/learn_s"] = time.perf_counter() - started
        clock.lap("step end (memory statistics)")
        return dict(parts)

    def clocked_step(self, experiences: Sequence[Experience], norm: LossNorm) -> dict[str, Any]:
        """One :meth:`train_step` (a real update) with its time split by phase (learner.phases):
        {"metrics": the step's parts, "phases": seconds per phase}. Every boundary syncs the device,
        so it is slower than a plain step: a diagnostic, run apart from timed steps."""
        clock = PhaseClock(self.device)
        for model in (self.engine, self.reference):
            if model is not None:
                thinker = getattr(model, "module", model)
                thinker = thinker.get_base_model() if hasattr(thinker, "get_base_model") else thinker
                clock.watch_thinker(thinker)
        self.clock = clock
        try:
            metrics = self.train_step(experiences, norm)
        finally:
            self.clock = NullClock()
            phases = clock.close()
        return {"metrics": metrics, "phases": phases}

    @torch.no_grad()
    def compute_logprobs(
        self, experiences: Sequence[Experience], reference: bool = False, sampling: bool = False
    ) -> list[list[float]]:
        """Per-token log-probs of each completion (through the end-of-turn token): the tempered
        distribution's (the loss's), or with ``sampling`` the sampling distribution's (what an
        engine with these weights reports, omni.sampling)."""
        if reference and not self.has_reference:
            raise ValueError("no reference model (beta is 0)")
        was_training = self.engine.training
        self.engine.eval()
        cache: dict[str, PromptFeatures] = {}
        out: list[list[float]] = []
        try:
            with self._reference_visit() if reference else nullcontext():
                for start in range(0, len(experiences), self.settings.micro_batch_size):
                    batch = self._batch(experiences[start : start + self.settings.micro_batch_size], cache)
                    truncated: list[torch.Tensor] = []
                    if reference:
                        logp = self._reference_logprobs(batch)
                    else:
                        logp = self._logprobs(self.engine, batch, sampling=truncated if sampling else None)
                        logp = truncated[0] if sampling else logp
                    for row in range(logp.shape[0]):
                        n = int(batch.completion_mask[row].sum())
                        out.append(logp[row, :n].float().cpu().tolist())
        finally:
            self.engine.train(was_training)
        return out

    def eos_token_ids(self) -> list[int]:
        return list(self._batch.eos_ids)

    # ------------------------------------------------------------------ weights out
    def weight_specs(self, bucket_bytes: int) -> list[BucketSpec]:
        return self.export.specs(bucket_bytes)

    def init_weight_sync(self, info: GroupInfo) -> bool:
        """Rank 0 joins the sync group as its rank 0 (blocks until every engine worker has joined);
        the group it had (before an engine restart) is closed first, not left beside the new one."""
        if self.rank == 0:
            if self.sync is not None:
                old, self.sync = self.sync, None
                old.close()
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
            sent = send_over(self.stager, channel, specs, self.export.gathered(specs, mine=True))
        elif self.rank == 0:
            if self.sync is None:
                raise RuntimeError("init_weight_sync was not called on rank 0")
            buckets = (
                pack_bucket(spec, tensors, device=self.device)
                for spec, tensors in zip(specs, self.export.gathered(specs, mine=True), strict=True)
            )
            sent = send_buckets(self.sync, buckets)
        else:
            for _ in self.export.gathered(specs, mine=False):  # the gathers rank 0's broadcast needs
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
        named = self.export.named(self.weight_specs(bucket_bytes=1 << 62), mine=self.rank == 0)
        return [(n, t.detach().to("cpu").clone()) for n, t in named if names is None or n in names]

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str, client_state: dict[str, Any] | None = None, train_state: bool = True) -> dict[str, Any]:
        """Write the loadable model folder (rank 0) and the resumable train state (every rank).

        All ranks saved, or every rank raises the same `CheckpointWriteFailed` (naming the ranks
        whose writes failed and why): a rank's failed write is held until it has joined the
        collectives the other ranks are in, and the ranks agree on the outcome of each part
        before any of them starts the next one.
        """
        dest = Path(folder)
        # under ZeRO-3 each bucket is a gather every rank joins; rank 0 writes what it gathers
        named = self.export.named(self.weight_specs(bucket_bytes=1 << 30), mine=self.rank == 0)

        failure: BaseException | None = None
        if self.rank == 0:
            try:
                export_model(Path(self.settings.model_path), dest, named, on_write=self._write_failpoint)
                if self.settings.lora.enabled:  # the adapters as peft's folder too (whole on every rank)
                    write_adapter(self.engine.module, dest)
            except Exception as exc:  # noqa: BLE001 - agreed below, raised on every rank
                failure = exc
        for _ in named:  # the gathers the failed write left (all of them on the other ranks)
            pass
        agree(failure, f"writing the model folder {dest}")
        if train_state:
            with deferred_write_errors(self.engine, on_write=self._write_failpoint) as failures:
                save_train_state(self.engine, dest, client_state, frozen=not self.settings.lora.enabled)
            agree(failures[0] if failures else None, f"writing the train state in {dest}")
        return {"rank": self.rank, "folder": str(dest)}

    def _write_failpoint(self) -> None:
        """Tests: a write of this rank that fails; each file a rank writes is a hit (rank 0's
        model folder and weight files, then DeepSpeed's files of every rank), so
        ``ECHOINK_FAILPOINTS=learner.write.rank1@2=enospc`` fails rank 1's second file."""
        failpoint(f"learner.write.rank{self.rank}")

    def load_train_state(self, folder: str) -> dict[str, Any]:
        """Restore the optimizer, schedule and weights that :meth:`save` wrote; returns its client state."""
        return load_train_state(self.engine, Path(folder), frozen=not self.settings.lora.enabled)

    def ping(self) -> int:
        return self.rank

    def __repr__(self) -> str:
        """What Ray's dashboard shows for this actor (omni.actorrepr: taken once it has started)."""
        from omni.actorrepr import actor_repr

        return actor_repr(f"learner rank {self.rank}/{self.world_size}", f"step {self.steps_done}")


def host_used_gib() -> float:
    import psutil

    memory = psutil.virtual_memory()
    return (memory.total - memory.available) / 2**30


def _rows(out: torch.Tensor, rows: Sequence[Sequence[float] | None]) -> torch.Tensor:
    """Per-token values of each completion into ``out`` ([B, C]); shorter rows keep out's value."""
    for i, row in enumerate(rows):
        if row:
            n = min(len(row), out.shape[1])
            out[i, :n] = torch.tensor(list(row[:n]), dtype=out.dtype)
    return out
