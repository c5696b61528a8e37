"""The run config is the one place a default lives, and every key of it is used somewhere.

- The settings dataclasses' own defaults (for callers that build them by hand) equal what
  `orchestrator.settings` makes of `RunConfig()`.
- Every leaf key of `RunConfig`, changed to another valid value, changes the run's plan
  (`orchestrator.plan.RunPlan`, which the trainer starts from without going back to the config) or
  what `orchestrator.settings` builds, or is listed below with the module that reads it before a
  plan exists (and that module's source reads it). A new key that nothing consumes fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from evaluation.evaluate import EvalSettings
from learner.types import LearnerSettings
from omni.inputs import MediaSettings
from orchestrator.config import RunConfig
from orchestrator.plan import Cluster, make_plan
from orchestrator.settings import (
    engine_settings,
    eval_settings,
    learner_settings,
    media_settings,
    sampling_settings,
)
from rollout.types import EngineSettings, SamplingSettings

REPO = Path(__file__).resolve().parent.parent
MODEL = Path("/models/m")

# keys read before a plan exists, outside it (the data, the Ray cluster): key → (file, text it contains)
DIRECT: dict[str, tuple[str, str]] = {
    "data.train": ("orchestrator/data.py", "data.train"),
    "data.valid": ("orchestrator/data.py", "data.valid"),
    "data.media_root": ("orchestrator/data.py", "media_root=data.media_root"),
    "ray.address": ("orchestrator/trainer.py", "config.ray.address"),
    "ray.num_cpus": ("orchestrator/trainer.py", "config.ray.num_cpus"),
    "ray.use_gpus": ("orchestrator/trainer.py", "config.ray.use_gpus"),
    "placement.check_memory": ("orchestrator/trainer.py", "config.placement.check_memory"),
}

# values that the type alone does not suggest
ALTERNATIVES: dict[str, Any] = {
    "grpo.policy_loss": {"grpo.policy_loss": "gspo", "grpo.clip_eps": 3e-4},  # a dict: keys changed together
    "total_steps": 7,
    "media.per_prompt": {"image": 1, "audio": 1, "video": 0},  # one value: the engines' per-prompt limits
    "system_prompt": "Answer briefly.",
    "data.valid": "/elsewhere/valid.json",
    "data.media_root": "/elsewhere",
    "grpo.clip_eps": 0.1,
    "grpo.clip_eps_high": 0.28,
    "rollout.kv_cache_mb": 64.0,
    "rollout.resources": {"rollout_node": 1.0},
    "learner.resources": {"learner_node": 1.0},
    "learner.betas": (0.8, 0.99),
    "learner.freeze": ["lm_head"],
    "rewards.weights": {"accuracy": 2.0, "format": 1.0},
    "eval.ablate": ["none", "audio"],
    "ray.address": "auto",
    "ray.num_cpus": 3.0,
    "learner.max_gpu_memory_gb": 76.0,
    "learner.lora.targets": ["q_proj", "v_proj"],
}


def leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += leaves(annotation, key + ".")
        else:
            out.append((key, field))
    return out


def other_value(key: str, field: Any, current: Any) -> Any:
    if key in ALTERNATIVES:
        return ALTERNATIVES[key]
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return next(choice for choice in get_args(annotation) if choice != current)
    if annotation is bool:
        return not current
    if annotation is int:
        return current + 1
    if annotation is float:
        return current / 2 if current else 0.5
    if annotation is Path or Path in get_args(annotation):
        return f"/elsewhere/{Path(current).name if current else 'x'}"
    raise AssertionError(f"{key}: no alternative value for {annotation}; add one to ALTERNATIVES")


# keys whose other values are valid only beside others (the grpo section refuses combinations
# that do nothing): set in both the base and the changed config
COMPANIONS: dict[str, dict[str, Any]] = {
    "learner.lora.rank": {"learner.zero_stage": 2},  # LoRA runs under ZeRO-2
    "learner.optimizer_dtype": {"learner.dtype": "bfloat16"},  # bf16 master weights need bf16 weights
    "learner.reference_device": {"learner.zero_stage": 2},  # the whole reference moves under ZeRO-2
    # the plan refuses the balance loss for a dense checkpoint it can read (the default model
    # folder may hold one): a folder not there leaves the family to the loaders
    "learner.router_aux_loss_coef": {"model_path": "/elsewhere/a-mixture-of-experts"},
    "grpo.policy_loss": {"grpo.mini_batches": 2},
    "grpo.clip_eps": {"grpo.policy_loss": "ppo_clip", "grpo.clip_eps": 0.2, "grpo.mini_batches": 2},
    "grpo.clip_eps_high": {"grpo.policy_loss": "ppo_clip", "grpo.clip_eps": 0.2, "grpo.mini_batches": 2},
    "grpo.overlong_buffer": {"grpo.overlong": "penalty", "grpo.overlong_buffer": 8},
    "grpo.overlong_penalty": {"grpo.overlong": "penalty", "grpo.overlong_buffer": 8},
    "grpo.is_clip": {"grpo.rollout_correction": "tis"},
    "grpo.max_extra_rollouts": {"grpo.dynamic_sampling": True},
    "grpo.correction_low": {"grpo.rollout_correction": "token_mask"},
    "grpo.correction_high": {"grpo.rollout_correction": "token_mask"},
    # a paper protocol fixes its own decoding: the fair protocol's eval.mode stays greedy beside it
    "eval.protocol": {"eval.mode": "greedy"},
}


def with_value(key: str, value: Any, base: RunConfig | None = None) -> RunConfig:
    return with_values({key: value}, base)


def with_values(values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    tree = (base or RunConfig()).model_dump(mode="python")
    for key, value in values.items():
        node = tree
        *sections, leaf = key.split(".")
        for section in sections:
            node = node[section]
        node[leaf] = value
    return RunConfig.model_validate(tree)


def built(config: RunConfig) -> Any:
    """What the trainer starts from: the run's plan (its config record aside), which holds every
    settings object `orchestrator.settings` makes (engine, learner, sampling, scoring, evaluation)."""
    return make_plan(config, Cluster(use_gpus=False), train_size=100)


def test_settings_defaults_equal_the_config_defaults() -> None:
    config = RunConfig()
    assert media_settings(config) == MediaSettings()
    assert engine_settings(config, MODEL) == EngineSettings(model_path=MODEL)
    assert learner_settings(config, 1, MODEL) == LearnerSettings(model_path=MODEL)
    assert sampling_settings(config) == SamplingSettings(seed=config.seed)
    assert eval_settings(config) == EvalSettings()


LEAVES = leaves(RunConfig)


@pytest.mark.parametrize(("key", "field"), LEAVES, ids=[k for k, _ in LEAVES])
def test_every_config_key_is_consumed(key: str, field: Any) -> None:
    # greedy evaluation ignores eval.samples
    base = with_values({"eval.mode": "sampled", **COMPANIONS.get(key, {})})
    current: Any = base
    for part in key.split("."):
        current = getattr(current, part)
    value = other_value(key, field, current)
    changed = with_values(value if isinstance(value, dict) and key.startswith("grpo.") else {key: value}, base)
    if built(changed) != built(base):
        return  # reaches a settings object
    assert key in DIRECT, f"{key}: changing it changes no settings object and no module is listed as reading it"
    path, text = DIRECT[key]
    assert text in (REPO / path).read_text(encoding="utf-8"), f"{key}: {path} does not read it ({text!r})"


def test_direct_keys_are_real_keys() -> None:
    keys = {k for k, _ in LEAVES}
    assert set(DIRECT) <= keys, sorted(set(DIRECT) - keys)


def test_greedy_evaluation_keeps_one_sample_and_the_token_limit() -> None:
    config = with_value("sampling.max_new_tokens", 99)
    greedy = eval_settings(config, samples=8)
    assert greedy.samples == 1
    decoding = greedy.decoding()
    assert (decoding.temperature, decoding.top_p, decoding.max_new_tokens) == (0.0, 1.0, 99)
    sampled = eval_settings(config, mode="sampled", samples=4)
    assert sampled.samples == 4 and sampled.decoding() == sampling_settings(config)


def test_media_per_prompt_auto_follows_what_the_records_read() -> None:
    from avqa import Record
    from orchestrator.settings import media_per_prompt

    def record(kind: str, **paths: Path) -> Record:
        return Record(id=kind, question="q", options=("A. x", "B. y"), answer="A", data_type=kind, **paths)

    released = record("image_audio", image_path=Path("a.jpg"), audio_path=Path("a.wav"))
    with_sound = record("video_audio", video_path=Path("v.mp4"))
    text = record("text")
    auto = RunConfig()
    assert media_per_prompt(auto, [released]) == (("audio", 1), ("image", 1), ("video", 0))
    assert media_per_prompt(auto, [with_sound]) == (("audio", 1), ("image", 0), ("video", 1))  # its own track
    assert media_per_prompt(auto, [text]) == (("audio", 0), ("image", 0), ("video", 0))
    assert media_per_prompt(auto, [released, with_sound, text]) == (("audio", 1), ("image", 1), ("video", 1))
    assert media_per_prompt(auto) == (("audio", 1), ("image", 1), ("video", 1))  # nothing known: all
    fixed = with_value("media.per_prompt", {"video": 1})
    assert media_per_prompt(fixed, [released]) == (("audio", 0), ("image", 0), ("video", 1))  # as written
    with pytest.raises(ValueError, match="0 or 1 of each"):
        with_value("media.per_prompt", {"video": 2})
