"""A rollout engine: one vLLM `LLM` (in-process) behind a Ray actor.

vLLM's CPU platform scans every loaded module when it starts; llvmlite (which librosa pulls in)
breaks that scan, so the engine starts before anything here touches audio.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Sequence
from typing import Any

from avqa import MediaError, Record
from omni.handoff import Channel
from omni.inputs import load_processor, media_token_ids, prepare_prompt
from omni.quiet import quiet_default_talker_warnings
from omni.sampling import suppression_bias
from omni.weightsync import BucketSpec, GroupInfo
from rollout import receive
from rollout.types import Completion, EngineSettings, RolloutResult, SamplingSettings

CPU_KV_CACHE_BYTES = 256 << 20


def request_seed(base: int, record_id: str, salt: int | str) -> int:
    """A per-request seed from the run seed, the question and a call counter (stable across runs)."""
    digest = hashlib.sha256(f"{base}:{record_id}:{salt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def llm_kwargs(settings: EngineSettings, engine_index: int = 0, *, is_cpu: bool) -> dict[str, Any]:
    """The `vllm.LLM` arguments for an engine (also what benchmarks give a bare `LLM`)."""
    kwargs: dict[str, Any] = {
        "model": str(settings.model_path),
        "tensor_parallel_size": settings.tensor_parallel_size,
        "max_model_len": settings.max_model_len,
        "gpu_memory_utilization": settings.memory_share,
        "limit_mm_per_prompt": media_limits(settings),
        "enforce_eager": settings.enforce_eager,
        "seed": settings.seed + engine_index,
        "dtype": settings.dtype,
        "max_num_seqs": settings.max_num_seqs,
        # safetensors only: a .bin/.pt checkpoint would be unpickled
        "load_format": "safetensors" if settings.load_format == "auto" else settings.load_format,
        # log-probs of the distribution a token is sampled from: after the logit bias, the
        # temperature and top-k / top-p (renormalised over the kept tokens), as the learner computes
        # them (omni.sampling). vLLM's default, raw_logprobs, is the model's own softmax before any
        # of these: a run at temperature 0.7 then compared two distributions (measured on the tiny
        # checkpoint: 0.19 mean |Δ log p| against 2e-7). On GPUs it also rules out FlashInfer's
        # sampler, which returns no processed log-probs (the machines here run without it anyway).
        "logprobs_mode": "processed_logprobs",
    }
    if kwargs["limit_mm_per_prompt"]["video"] > 0 and kwargs["limit_mm_per_prompt"]["audio"] > 0:
        # a video with its own sound may come. vLLM (0.32) processes only the media its processor
        # cache misses: a video with its own
        # sound whose track is cached but whose frames are not (an ablation's grey frames, or two
        # clips sharing one sound track) reaches the processor as a video without audio and fails
        # the whole batch ("Video doesn't have audio track"). Without the cache every prompt is
        # processed whole; G completions of a question are one request, so little is repeated.
        kwargs["mm_processor_cache_gb"] = 0
    kv_bytes = settings.kv_cache_bytes
    if kv_bytes is None and is_cpu:
        # The CPU backend sizes its cache as a share of one NUMA node minus this process's
        # memory, which can go negative on a small host: a fixed size is predictable.
        kv_bytes = CPU_KV_CACHE_BYTES
    if kv_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_bytes
    if settings.sleep_mode and not is_cpu:  # vLLM has no sleep mode on CPUs
        kwargs["enable_sleep_mode"] = True
    if is_cpu and settings.dtype == "auto":
        kwargs["dtype"] = "float32"  # auto would downcast a float32 checkpoint to bfloat16
    if is_cpu:
        # vLLM's runner rewinds a seeded request's generator when it drops the token sampled
        # during a partial (chunked) prefill, and CPU generators cannot rewind ("CPU Generator
        # does not use offset"): prefill whole prompts on CPUs so per-request seeds work there too
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(settings.max_model_len, 8192)
    return kwargs


def media_limits(settings: EngineSettings) -> dict[str, int]:
    """Per-prompt media counts the engine accepts (every medium named, 0 where it is off)."""
    limits = {"image": 0, "audio": 0, "video": 0}
    limits.update(dict(settings.media_per_prompt))
    return limits


def over_limits(counts: dict[str, int], limits: dict[str, int]) -> str | None:
    """Why a prompt with these media counts cannot be served, or None."""
    over = [m for m, n in counts.items() if n > limits.get(m, 0)]
    if not over:
        return None
    held = ", ".join(f"{counts[m]} {m} (the engine takes {limits.get(m, 0)})" for m in over)
    return f"the prompt holds {held}; raise media.per_prompt.{over[0]}"


def request_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it cannot take: ValueError, and in newer releases (0.32) its
    own client-error class, which is not a ValueError."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # vLLM 0.26 (the GPU machines)
        return (ValueError,)
    return (ValueError, VLLMClientError)


def sampling_params(sampling: SamplingSettings, n: int, seed: int | None, logit_bias: dict[int, float]) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        n=n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_new_tokens,
        logprobs=0,
        seed=seed,
        ignore_eos=sampling.ignore_eos,
        skip_special_tokens=True,
        logit_bias=logit_bias,
    )


class RolloutEngine:
    """Owns one vLLM engine for a checkpoint folder and serves `generate` calls."""

    def __init__(self, settings: EngineSettings, engine_index: int = 0) -> None:
        # The process environment (vLLM in-process, quiet tokenizers) comes from
        # orchestrator.placement.actor_env through the actor's runtime_env, not from here.
        import vllm
        from vllm.platforms import current_platform

        self.settings = settings
        self.index = engine_index
        self.media_limits = media_limits(settings)
        self.refusals = request_errors()
        self.is_cpu = current_platform.is_cpu()
        started = time.perf_counter()
        kwargs = llm_kwargs(settings, engine_index, is_cpu=self.is_cpu)
        quiet_default_talker_warnings()  # vLLM loads the checkpoint's Qwen2.5-Omni config
        self.llm = vllm.LLM(**kwargs)
        self.processor = load_processor(settings.model_path)
        # never sample a media placeholder: the learner could not replay such a completion (the
        # learner's SamplingDistribution suppresses the same tokens with the same bias)
        self.logit_bias = suppression_bias(media_token_ids(self.processor.tokenizer))
        self.start_seconds = time.perf_counter() - started
        self.calls = 0
        self.weight_version = 0
        self.asleep: set[str] = set()  # what vLLM's sleep mode has released: "weights", "kv_cache"

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        records: Sequence[Record],
        n: int,
        sampling: SamplingSettings,
        salt: int | Sequence[int | str] | None = None,
        media_overrides: Sequence[dict[str, Any] | None] | None = None,
    ) -> list[RolloutResult]:
        """``n`` completions per record, in the records' order. A record whose media fail gets a
        result with ``error`` set; the others are served. ``media_overrides`` replace a record's
        image or audio (evaluation ablations). ``salt`` (one, or one per record) goes into each
        request's seed; None: this engine's call count."""
        self.calls += 1
        salt = self.calls if salt is None else salt
        salts = [salt] * len(records) if isinstance(salt, int) else list(salt)
        results: list[RolloutResult] = []
        inputs, params, slots = [], [], []
        for i, record in enumerate(records):
            override = (media_overrides[i] if media_overrides else None) or {}
            try:
                prompt = prepare_prompt(
                    record,
                    self.processor,
                    media=self.settings.media,
                    system_prompt=self.settings.system_prompt,
                    image=override.get("image"),
                    audio=override.get("audio"),
                    video=override.get("video"),
                )
            except (MediaError, ValueError, OSError) as exc:
                results.append(RolloutResult(record.id, error=f"{type(exc).__name__}: {exc}"))
                continue
            refused = over_limits(prompt.media_counts, self.media_limits)
            if refused is not None:
                results.append(RolloutResult(record.id, error=f"MediaLimit: record {record.id} ({record.data_type}): {refused}"))
                continue
            seed = None if sampling.seed is None else request_seed(sampling.seed, record.id, salts[i])
            params.append(sampling_params(sampling, n, seed, self.logit_bias))
            inputs.append(prompt.vllm_input())
            slots.append(len(results))
            results.append(RolloutResult(record.id))
        if inputs:
            try:
                outputs = self.llm.generate(inputs, params, use_tqdm=False)
            except self.refusals:
                # vLLM refuses a whole batch for one prompt it cannot take (longer than
                # max_model_len, media its processor rejects): serve the others one by one
                outputs = [self._generate_one(i, p) for i, p in zip(inputs, params, strict=True)]
            for slot, output in zip(slots, outputs, strict=True):
                result = results[slot]
                if isinstance(output, str):
                    result.error = output
                    continue
                result.prompt_token_ids = list(output.prompt_token_ids)
                result.completions = [completion_from_vllm(c) for c in output.outputs]
        return results

    def _generate_one(self, prompt: dict[str, Any], params: Any) -> Any:
        """One request's output, or the reason vLLM refused it."""
        try:
            return self.llm.generate([prompt], [params], use_tqdm=False)[0]
        except self.refusals as exc:
            return f"vLLM refused the prompt: {exc}"

    # ------------------------------------------------------------------ weights
    def init_weight_sync(self, info: GroupInfo, first_rank: int) -> list[int]:
        """Join the learner's sync group (blocks until every member has joined)."""
        return self.llm.collective_rpc(receive.join_sync_group, args=(info, first_rank))

    def receive_weights(self, specs: Sequence[BucketSpec], version: int) -> int:
        """Receive one full push and drop every cache computed with the old weights."""
        counts = self.llm.collective_rpc(receive.receive_weights, args=(list(specs),))
        self._reset_caches()
        self.weight_version = version
        return int(counts[0])

    def receive_handoff(self, specs: Sequence[BucketSpec], version: int, channel: Channel) -> int:
        """Receive one push handed over within the node (colocated placement, `omni.handoff`)."""
        counts = self.llm.collective_rpc(receive.receive_handoff, args=(list(specs), channel))
        self._reset_caches()
        self.weight_version = version
        return int(counts[0])

    # ------------------------------------------------------------------ sharing a GPU
    def sleep(self, level: int) -> dict[str, float]:
        """Free the GPU for the learner: level 1 keeps the weights in host memory, level 2 drops
        them (the next push brings new ones). Returns the seconds and the GPU memory then in use."""
        started = time.perf_counter()
        if not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = {"weights", "kv_cache"}
        return {"seconds": time.perf_counter() - started, "gpu_used_gb": _gpu_used_gb()}

    def wake_up(self, tags: Sequence[str] = ("weights", "kv_cache")) -> dict[str, float]:
        """Take the GPU back: ``["weights"]`` before a push, ``["kv_cache"]`` after it. Waking
        what is awake does nothing (an engine restarted while the others slept starts awake)."""
        started = time.perf_counter()
        waking = [t for t in tags if t in self.asleep]
        if waking:
            self.llm.wake_up(tags=waking)
            self.asleep -= set(waking)
        return {"seconds": time.perf_counter() - started, "gpu_used_gb": _gpu_used_gb()}

    def receive_raw(self, sizes: Sequence[int]) -> int:
        """Receive and drop raw buffers (the transport baseline for benchmarks)."""
        return int(self.llm.collective_rpc(receive.drain, args=(list(sizes),))[0])

    def _reset_caches(self) -> None:
        self.llm.reset_prefix_cache()
        engine = self.llm.llm_engine
        if hasattr(engine, "reset_encoder_cache"):
            engine.reset_encoder_cache()

    # ------------------------------------------------------------------ housekeeping
    def info(self) -> dict[str, Any]:
        import ray

        context = ray.get_runtime_context() if ray.is_initialized() else None
        return {
            "index": self.index,
            "pid": os.getpid(),
            "node_id": context.get_node_id() if context else "",
            "gpus": context.get_accelerator_ids().get("GPU", []) if context else [],
            "start_seconds": self.start_seconds,
            "calls": self.calls,
            "weight_version": self.weight_version,
            "platform": "cpu" if self.is_cpu else "cuda",
        }

    def ping(self) -> bool:
        return True

    def __repr__(self) -> str:
        """What Ray's dashboard shows for this actor (omni.actorrepr: taken once it has started)."""
        from omni.actorrepr import actor_repr

        return actor_repr(f"engine {self.index}", f"weights v{getattr(self, 'weight_version', 0)}")


def _gpu_used_gb() -> float:
    """Memory in use on this engine's GPU by every process (the learner rank that shares it too)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def completion_from_vllm(output: Any) -> Completion:
    """One vLLM completion output → a Completion with exactly one sampler log-prob per token.

    A token whose log-prob vLLM did not return (no entry, the token missing from its entry, or
    fewer entries than tokens) or returned as a non-finite number keeps NaN: "unknown", which the
    learner counts and leaves out of the mismatch metrics and the importance weights. Never 0,
    which would read as "the sampler was certain".
    """
    token_ids = list(output.token_ids)
    entries = list(output.logprobs or [])
    logprobs = []
    for position, token in enumerate(token_ids):
        entry = entries[position] if position < len(entries) else None
        value = float(entry[token].logprob) if entry is not None and token in entry else math.nan
        logprobs.append(value if math.isfinite(value) else math.nan)
    return Completion(
        text=output.text,
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=str(output.finish_reason or "length"),
    )
