"""The run config → the settings objects of rollout, learner and evaluation.

`orchestrator.config.RunConfig` is the only place a default lives; every translation from it to a
package's settings dataclass is here, so the trainer, `echoink eval`, the warm start and the
benchmarks build the same engines and learners from the same keys. The dataclasses keep defaults
of their own for callers that build them by hand (tests, benchmarks); a test proves that those
defaults equal what this module makes of `RunConfig()`, and another that every config key is
consumed somewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import avqa
from evaluation.evaluate import EvalSettings
from learner.types import LearnerSettings, LoraSettings
from omni.inputs import MediaSettings
from orchestrator.config import RunConfig
from orchestrator.scoring import ScoringRules
from rollout.types import EngineSettings, SamplingSettings


def media_settings(config: RunConfig) -> MediaSettings:
    m = config.media
    return MediaSettings(
        min_pixels=m.min_pixels,
        max_pixels=m.max_pixels,
        max_audio_seconds=m.max_audio_seconds,
        sample_rate=m.sample_rate,
        video_fps=m.video_fps,
        max_video_frames=m.max_video_frames,
        video_min_pixels=m.video_min_pixels,
        video_max_pixels=m.video_max_pixels,
    )


def sampling_settings(config: RunConfig) -> SamplingSettings:
    """The rollout's sampling; per-request seeds derive from the run seed and the question."""
    s = config.sampling
    return SamplingSettings(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        seed=config.seed,
    )


MEDIA = ("audio", "image", "video")


def media_per_prompt(config: RunConfig, records: Sequence[avqa.Record] | None = None) -> tuple[tuple[str, int], ...]:
    """The engines' per-prompt media limits: ``media.per_prompt``, or with "auto" one of each medium
    the ``records`` read (all three without records). A medium off costs vLLM nothing: it reserves
    no encoder memory for it, and its processor cache stays on where no video can come."""
    limits = config.media.per_prompt
    if limits == "auto":
        used = set(MEDIA) if records is None else {m for r in records for m in r.modalities}
        limits = {m: int(m in used) for m in MEDIA}
    return tuple(sorted({**dict.fromkeys(MEDIA, 0), **limits}.items()))


def engine_settings(
    config: RunConfig,
    model_path: Path | None = None,
    *,
    sleep_mode: bool = False,
    records: Sequence[avqa.Record] | None = None,
) -> EngineSettings:
    """One rollout engine; ``model_path`` overrides ``config.model_path`` (a checkpoint to evaluate);
    ``sleep_mode`` for an engine that shares its GPU with a learner rank (placement decides);
    ``records``: what it will be asked (``media.per_prompt: auto`` follows their media)."""
    r = config.rollout
    return EngineSettings(
        model_path=Path(model_path or config.model_path),
        tensor_parallel_size=r.tensor_parallel_size,
        max_model_len=r.max_model_len,
        memory_share=r.memory_share,
        kv_cache_bytes=int(r.kv_cache_mb * 2**20) if r.kv_cache_mb else None,
        enforce_eager=r.enforce_eager,
        max_num_seqs=r.max_num_seqs,
        seed=config.seed,
        load_format=r.load_format,
        media=media_settings(config),
        media_per_prompt=media_per_prompt(config, records),
        system_prompt=config.system_prompt,
        sleep_mode=sleep_mode,
    )


def learner_settings(
    config: RunConfig, total_steps: int, model_path: Path | None = None, *, release_memory: bool = False
) -> LearnerSettings:
    """The learner group; ``model_path`` overrides ``config.model_path`` (a checkpoint to resume);
    ``release_memory`` for ranks that share their GPU with a sleeping engine (placement decides)."""
    lc, g = config.learner, config.grpo
    return LearnerSettings(
        model_path=Path(model_path or config.model_path),
        num_ranks=lc.num_ranks,
        zero_stage=lc.zero_stage,
        dtype=lc.dtype,
        gradient_checkpointing=lc.gradient_checkpointing,
        micro_batch_size=lc.micro_batch_size,
        lr=lc.lr,
        betas=tuple(lc.betas),
        weight_decay=lc.weight_decay,
        adam_eps=lc.adam_eps,
        lr_schedule=lc.lr_schedule,
        warmup_steps=lc.warmup_steps,
        min_lr_ratio=lc.min_lr_ratio,
        total_steps=total_steps * g.epochs_per_batch * g.mini_batches,  # optimizer steps: the schedule's length
        grad_clip=lc.grad_clip,
        freeze_audio_tower=lc.freeze_audio_tower,
        freeze_vision_tower=lc.freeze_vision_tower,
        freeze=tuple(lc.freeze),
        share_prompts=lc.share_prompts,
        attn_implementation=lc.attn_implementation,
        beta=g.beta,
        kl_estimator=g.kl_estimator,
        policy_loss=g.policy_loss,
        clip_eps=g.clip,
        epochs_per_batch=g.epochs_per_batch,
        mini_batches=g.mini_batches,
        loss_agg=g.loss_agg,
        entropy_coef=g.entropy_coef,
        off_policy=g.off_policy,
        rollout_correction=g.rollout_correction,
        is_clip=g.is_clip,
        correction_low=g.correction_low,
        correction_high=g.correction_high,
        # the engines' distribution (sampling_settings): the learner compares vLLM's log-probs with its own of it
        temperature=config.sampling.temperature,
        top_k=config.sampling.top_k,
        top_p=config.sampling.top_p,
        max_new_tokens=config.sampling.max_new_tokens,
        logprob_chunk=lc.logprob_chunk,
        fused_head=lc.fused_head,
        tower_attention=lc.tower_attention,
        fused_optimizer=lc.fused_optimizer,
        router_aux_loss_coef=lc.router_aux_loss_coef,
        seed=config.seed,
        media=media_settings(config),
        system_prompt=config.system_prompt,
        collective_timeout_s=config.faults.collective_timeout_s,
        random_init=lc.random_init,
        release_memory=release_memory,
        lora=LoraSettings(rank=lc.lora.rank, alpha=lc.lora.alpha, dropout=lc.lora.dropout,
                          targets=tuple(lc.lora.targets), towers=lc.lora.towers),
        max_gpu_memory_gb=lc.max_gpu_memory_gb,
        offload_optimizer=lc.offload_optimizer,
        optimizer_dtype=lc.optimizer_dtype,
        reference_device=lc.reference_device,
    )


def eval_settings(config: RunConfig, **overrides: Any) -> EvalSettings:
    """How to evaluate: ``eval.*`` for the protocol, ``sampling.*`` for sampled decoding, ``media.*``,
    ``rewards.accuracy_match`` for the fair protocol's answer parsing (the reward's own).

    ``overrides`` (from `echoink eval`'s flags) replace fields; greedy decoding takes one sample.
    """
    e = config.eval
    base = EvalSettings(  # the run's fields; mode, samples, protocol and the flags in one replace, checked once
        ablate=tuple(e.ablate),
        sampling=sampling_settings(config),
        media=media_settings(config),
        accuracy_match=config.rewards.accuracy_match,
    )
    values: dict[str, Any] = {"mode": e.mode, "samples": e.samples, "protocol": e.protocol, **overrides}
    if values["mode"] == "greedy":
        values["samples"] = 1
    return replace(base, **values)


def scoring_rules(config: RunConfig) -> ScoringRules:
    g = config.grpo
    return ScoringRules(
        adv_eps=g.adv_eps,
        advantage=g.advantage,
        skip_failed=config.data.skip_bad_records,
        overlong=g.overlong,
        max_new_tokens=config.sampling.max_new_tokens,
        overlong_buffer=g.overlong_buffer,
        overlong_penalty=g.overlong_penalty,
    )
