"""The run config: every default in one place. YAML files override it; `--set key=value` overrides those
(how files and overrides are read: `orchestrator.config_files`).

Unknown keys and bad values fail before anything starts, naming the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.config_files import ConfigError, apply_override, merge_trees, read_yaml


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value


class DataConfig(Section):
    train: Path = Path("data/synth/train/omni_rl_format_train.json")
    valid: Path | None = Path("data/synth/valid/omni_rl_format_valid.json")
    media_root: Path | None = None  # default: the folder holding each JSON file
    skip_bad_records: bool = False  # true: refuse broken records (counted, listed) instead of stopping
    shuffle: bool = True


class MediaConfig(Section):
    min_pixels: int = Field(4 * 28 * 28, gt=0)
    max_pixels: int = Field(256 * 28 * 28, gt=0)
    max_audio_seconds: float = Field(10.0, gt=0)
    sample_rate: int = Field(16_000, gt=0)
    video_fps: float = Field(2.0, gt=0, description="frames sampled per second of video (the model's time axis)")
    max_video_frames: int = Field(16, ge=2, description="at most this many frames a video (an even number is kept)")
    video_min_pixels: int = Field(4 * 28 * 28, gt=0, description="a video frame's least area after resizing")
    video_max_pixels: int = Field(128 * 28 * 28, gt=0, description="a video frame's largest area after resizing")
    # what one prompt may hold, per medium: the engines' limit_mm_per_prompt (0 turns a medium off,
    # and vLLM then reserves nothing for it); a record that needs more fails alone, with its reason
    per_prompt: Literal["auto"] | dict[Literal["image", "audio", "video"], int] = Field(
        "auto",
        description="media one prompt may hold, e.g. {image: 1, audio: 1, video: 0} (0 or 1 of each; the engines' "
        "limit_mm_per_prompt); auto: one of each medium that the run's records read, none of the others",
    )

    @model_validator(mode="after")
    def _order(self) -> MediaConfig:
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"media.max_pixels ({self.max_pixels}) is below media.min_pixels ({self.min_pixels})")
        if self.video_max_pixels < self.video_min_pixels:
            raise ValueError(
                f"media.video_max_pixels ({self.video_max_pixels}) is below media.video_min_pixels ({self.video_min_pixels})"
            )
        bad = {} if self.per_prompt == "auto" else {k: v for k, v in self.per_prompt.items() if not 0 <= v <= 1}
        if bad:
            raise ValueError(f"media.per_prompt {bad}: a prompt holds 0 or 1 of each medium")
        return self


class GRPOConfig(Section):
    """The algorithm. Defaults are the reference run's (EchoInk-R1: vanilla GRPO); README's table
    "The GRPO family" names each choice's formula and source. Combinations that would do nothing
    or contradict each other are refused before anything starts."""

    group_size: int = Field(16, ge=2, description="G: completions per question")
    questions_per_step: int = Field(8, ge=1)
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = Field(
        "grpo", description="advantage estimator (learner/advantages.py)"
    )
    policy_loss: Literal["reference", "ppo_clip", "gspo"] = Field(
        "reference", description="reference: ratio·A on policy; ppo_clip: clipped token ratio; gspo: clipped sequence ratio"
    )
    clip_eps: float | None = Field(None, gt=0.0, description="clip range (low side, and high unless clip_eps_high) of ppo_clip / gspo")
    clip_eps_high: float | None = Field(None, gt=0.0, description="the clip's high side (DAPO's clip-higher); default clip_eps")
    epochs_per_batch: int = Field(1, ge=1, description="optimizer passes over each step's batch")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per pass (the batch split by question)")
    beta: float = Field(0.001, ge=0.0, description="KL weight; 0 skips the reference model")
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "seq-mean-token-mean"
    )
    adv_eps: float = Field(1e-4, gt=0.0)
    entropy_coef: float = Field(0.0, ge=0.0, description="entropy bonus: the loss minus this × the policy's token entropy")
    overlong: Literal["none", "mask", "penalty"] = Field(
        "none", description="completions cut at sampling.max_new_tokens: trained as they are, left out of the loss, "
        "or given DAPO's soft length penalty over the last overlong_buffer tokens"
    )
    overlong_buffer: int = Field(0, ge=0, description="penalty: tokens before the limit where the penalty ramps to -overlong_penalty")
    overlong_penalty: float = Field(1.0, gt=0.0)
    dynamic_sampling: bool = Field(False, description="DAPO: drop questions whose G rewards are equal, roll out more")
    max_extra_rollouts: int = Field(3, ge=1, description="dynamic_sampling: at most this many extra rollouts a step")
    off_policy: bool = Field(False, description="one-step-off-policy: roll out step t+1 while learning step t")
    rollout_correction: Literal["auto", "none", "tis", "token_mask", "seq_mask"] = Field(
        "auto", description="for the learner-vs-sampler mismatch, from vLLM's log-probs: tis (truncated importance "
        "weights, cap is_clip), token_mask / seq_mask (drop tokens / sequences whose ratio leaves "
        "[correction_low, correction_high]); auto: tis when off_policy, else none (the reference run)"
    )
    is_clip: float = Field(2.0, gt=0.0, description="cap C of the truncated importance weights (tis)")
    correction_low: float = Field(0.5, gt=0.0)
    correction_high: float = Field(2.0, gt=0.0)
    warn_no_signal_steps: int = Field(
        5, ge=0, description="warn when every group's rewards were identical this many steps in a row; 0: never"
    )

    @property
    def correction(self) -> str:
        """The rollout correction in force (``auto`` resolved by the learner's own rule)."""
        from learner.correction import resolve_correction  # here: loading a config needs no torch

        return resolve_correction(self.rollout_correction, self.off_policy, self.clip_eps)

    @property
    def clip(self) -> tuple[float, float] | None:
        if self.clip_eps is None:
            return None
        return (self.clip_eps, self.clip_eps_high if self.clip_eps_high is not None else self.clip_eps)

    @model_validator(mode="after")
    def _consistent(self) -> GRPOConfig:
        # a key set away from its default where it does nothing (a dumped config, all defaults, loads)
        given = {k for k, f in type(self).model_fields.items() if getattr(self, k) != f.default}
        clipped = self.policy_loss in ("ppo_clip", "gspo")
        if clipped and self.clip_eps is None:
            raise ValueError(f"grpo.policy_loss {self.policy_loss} needs grpo.clip_eps (e.g. 0.2; gspo: 3e-4)")
        if not clipped and (self.clip_eps is not None or self.clip_eps_high is not None):
            raise ValueError("grpo.clip_eps / grpo.clip_eps_high do nothing with grpo.policy_loss reference (no ratio "
                             "is clipped): set grpo.policy_loss: ppo_clip or gspo, or drop the clip")
        one_pass = self.epochs_per_batch == 1 and self.mini_batches == 1
        if clipped and one_pass and not self.off_policy:
            raise ValueError(f"grpo.policy_loss {self.policy_loss} clips the ratio to the old policy, which is 1 with one "
                             "on-policy pass: set grpo.epochs_per_batch or grpo.mini_batches above 1, or grpo.off_policy")
        if self.mini_batches > self.questions_per_step:
            raise ValueError(f"grpo.mini_batches ({self.mini_batches}) splits the batch by question: at most "
                             f"grpo.questions_per_step ({self.questions_per_step})")
        if self.correction_low >= self.correction_high:
            raise ValueError(f"grpo.correction_low ({self.correction_low}) must be below grpo.correction_high ({self.correction_high})")
        if "is_clip" in given and self.correction != "tis":
            raise ValueError(f"grpo.is_clip caps tis weights, but grpo.rollout_correction is {self.correction}")
        if given & {"correction_low", "correction_high"} and self.correction not in ("token_mask", "seq_mask"):
            raise ValueError(f"grpo.correction_low/high bound the masks, but grpo.rollout_correction is {self.correction}")
        if given & {"overlong_buffer", "overlong_penalty"} and self.overlong != "penalty":
            raise ValueError(f"grpo.overlong_buffer/penalty shape the penalty, but grpo.overlong is {self.overlong}")
        if self.overlong == "penalty" and self.overlong_buffer == 0:
            raise ValueError("grpo.overlong penalty needs grpo.overlong_buffer > 0 (tokens before the limit)")
        if "max_extra_rollouts" in given and not self.dynamic_sampling:
            raise ValueError("grpo.max_extra_rollouts limits grpo.dynamic_sampling, which is off")
        if "kl_estimator" in given and self.beta == 0:
            raise ValueError("grpo.kl_estimator does nothing with grpo.beta 0 (no KL term)")
        return self


# the least temperature training samples at: omni.sampling.MIN_TEMPERATURE (vLLM's floor), written
# here too because loading a config imports no torch (tests/test_sampling_cpu.py holds them equal)
MIN_TEMPERATURE = 1e-2


class SamplingConfig(Section):
    """The rollout's sampling distribution; the learner's log-probs compared with vLLM's are of the
    same one (omni.sampling.SamplingDistribution: temperature, then top-k, then top-p)."""

    temperature: float = Field(1.0, description="at least 0.01 (0, greedy, has no log-probs to learn from)")
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1, description="-1 or 0: off")
    max_new_tokens: int = Field(768, ge=1)

    @field_validator("temperature")
    @classmethod
    def _samples(cls, value: float) -> float:
        # Checked here, before anything starts: at 0 the learner's log-probs are logits / 0, so every
        # step is non-finite and skipped, and the run stops blaming the learning rate. Below 0.01
        # vLLM samples at 0.01 (and warns) while the learner would divide by the value given.
        if value < MIN_TEMPERATURE:
            raise ValueError(
                f"sampling.temperature {value:g}: training samples from a distribution and learns from its "
                f"log-probs, so it needs a temperature of at least {MIN_TEMPERATURE:g} (0 is greedy decoding). "
                "For greedy evaluation set eval.mode: greedy, which decodes on its own"
            )
        return value


class RolloutConfig(Section):
    num_engines: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(4096, ge=64)
    memory_share: float = Field(0.85, gt=0.0, le=1.0, description="vLLM gpu_memory_utilization (host RAM share on CPU)")
    enforce_eager: bool = False
    max_num_seqs: int = Field(256, ge=1)
    cpus_per_engine: float = Field(1.0, gt=0.0)
    kv_cache_mb: float | None = Field(None, gt=0.0, description="fixed KV cache size (default on CPUs: 256)")
    load_format: Literal["auto", "dummy"] = Field("auto", description="dummy: random weights (benchmarks)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per engine")


# the language model's attention and MLP projections: learner.types.DEFAULT_LORA_TARGETS, written
# here too because loading a config imports no torch (tests/test_lora_cpu.py holds them equal)
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Section):
    rank: int = Field(0, ge=0, description="LoRA rank; 0 (the default) is a full fine-tune")
    alpha: float = Field(16.0, gt=0.0, description="the adapters' scale is alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        description="the last name part of the linear layers that get adapters (default: the language model's "
        "attention and MLP projections); each must name one",
    )
    towers: bool = Field(False, description="adapters on the audio and vision towers' layers of those names too")


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    zero_stage: Literal[2, 3] = 3
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 on GPUs, fp32 on CPUs
    gradient_checkpointing: bool = True
    micro_batch_size: int = Field(4, ge=1, description="sequences per forward/backward on a rank")
    lr: float = Field(1e-6, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0.0)
    adam_eps: float = Field(1e-8, gt=0.0)
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    grad_clip: float = Field(5.0, gt=0.0)
    freeze_audio_tower: bool = False
    freeze_vision_tower: bool = False
    share_prompts: bool = Field(
        True,
        description="run each question's prompt (and its image and audio encoders) once per micro-batch for its "
        "completions, which continue from its keys and values; exact, also under gradient checkpointing",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="parameter-name prefixes held fixed, e.g. [model.embed_tokens, lm_head]; each must match a parameter",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    cpus_per_rank: float = Field(1.0, gt=0.0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per rank")
    random_init: bool = Field(False, description="random weights from config.json (benchmarks; no checkpoint)")
    logprob_chunk: int = Field(1024, ge=1, description="positions per chunk of the log-softmax")
    fused_head: bool = Field(
        False,
        description="completions' log-probs through the output layer in chunks, their logits not kept for the "
        "backward (omni/head.py): the same values, less activation memory, one more head matmul a token; shared "
        "prompts only, not with an entropy bonus or ZeRO-3. Off until measured on a GPU (issue 27)",
    )
    tower_attention: Literal["varlen", "per_window"] = Field(
        "varlen",
        description="the audio and vision towers' windowed attention: varlen, one call per layer over all windows "
        "(FlashAttention's varlen kernel on GPUs, a block-diagonal mask elsewhere; omni/tower_attention.py), or "
        "per_window, transformers' own call per window (a 448-px picture has 16 windows, a 10-s clip 10 chunks)",
    )
    router_aux_loss_coef: float = Field(
        0.0,
        ge=0.0,
        description="a mixture-of-experts thinker (Qwen3-Omni): add coef × the routers' Switch Transformer balance "
        "loss (transformers' formula, over every routed token of the policy's forward; omni/router.py) to the loss. "
        "0, the default, is upstream's RL training: transformers adds it only with labels, verl-omni not at all. "
        "A dense thinker refuses a coefficient above 0",
    )
    fused_optimizer: bool = Field(
        True,
        description="torch's fused AdamW kernel on GPUs (one kernel, no temporaries); false: its multi-tensor "
        "(foreach) AdamW, which makes a temporary the size of the moments at each update. Not used under "
        "learner.offload_optimizer (DeepSpeed's CPU Adam) nor on CPUs",
    )
    max_gpu_memory_gb: float | None = Field(
        None,
        gt=0.0,
        description="cap each rank's GPU memory (torch's per-process fraction): what the learner would have on a "
        "smaller card, e.g. 80 on a 141 GB GPU; it fails with CUDA's out-of-memory error where that card would",
    )
    offload_optimizer: bool = Field(
        False,
        description="ZeRO-Offload: the master weights, their gradients and Adam's moments in host memory, updated "
        "there by DeepSpeed's CPU Adam; the GPU keeps the bf16 weights and gradients",
    )
    optimizer_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="bfloat16: master weights, gradients and Adam's moments in bf16 (DeepSpeed's "
        "bf16_master_weights_and_grads and bf16_optimizer_states), 8 bytes a trainable parameter instead of 16; "
        "an update smaller than bf16's step at a weight is lost (RESULTS.md, section 10); needs dtype bfloat16",
    )
    reference_device: Literal["gpu", "cpu"] = Field(
        "gpu",
        description="cpu: the frozen reference waits in host memory and comes to the GPU once a step for the "
        "reference log-probs of every micro-batch, then leaves (ZeRO-2, a full fine-tune with beta > 0)",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="low-rank adapters: only they train; the reference is the policy with them switched off; "
        "the engines and checkpoints get the merged weights",
    )

    @model_validator(mode="after")
    def _lora_under_zero2(self) -> LearnerConfig:
        if self.lora.rank > 0 and self.zero_stage == 3:
            raise ValueError(
                "learner.lora needs learner.zero_stage 2: a LoRA run's adapters and their optimizer states are "
                "small, and its frozen base is held whole on every rank (ZeRO-3 partitioning of a LoRA run is "
                "not built); set learner.zero_stage=2"
            )
        return self

    @model_validator(mode="after")
    def _lean_levers(self) -> LearnerConfig:
        if self.optimizer_dtype == "bfloat16" and self.dtype != "bfloat16":
            raise ValueError("learner.optimizer_dtype bfloat16 keeps the master weights in bf16: it needs "
                             "learner.dtype bfloat16 (set learner.dtype=bfloat16)")
        if self.reference_device == "cpu" and (self.zero_stage == 3 or self.lora.rank > 0):
            raise ValueError("learner.reference_device cpu moves a whole frozen reference model: under ZeRO-3 it is "
                             "already partitioned over the ranks, and under LoRA there is none (the reference is "
                             "the policy with its adapters off); set learner.reference_device=gpu")
        return self


class RewardConfig(Section):
    weights: dict[str, float] = Field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    accuracy_match: Literal["exact", "letters"] = Field(
        "letters",
        description="accuracy: exact (the reference run's: the stripped first <answer> equals the gold string, "
        "so 'C C', 'CC', 'C;' are wrong) or letters (the answer's letters as a set equal the gold's: 'A,C' = "
        "'CA'; for multi-answer data). The default keeps the demo's recipe as measured; "
        "configs/echoink_r1_7b.yaml sets exact",
    )
    lenient: bool = False  # accuracy (letters): also accept "C. text" / "C)" answers

    @model_validator(mode="after")
    def _lenient_reads_letters(self) -> RewardConfig:
        if self.lenient and self.accuracy_match == "exact":
            raise ValueError("rewards.lenient reads option letters; it does nothing with rewards.accuracy_match exact")
        return self

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        from rewards import REWARDS

        if not value:
            raise ValueError("at least one reward is needed")
        unknown = sorted(set(value) - set(REWARDS))
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; registered: {sorted(REWARDS)}")
        for name, weight in value.items():
            if not math.isfinite(weight):
                raise ValueError(f"weight of {name!r} must be finite")
        return value


class SyncConfig(Section):
    every: int = Field(1, ge=1, description="push weights to the engines every N optimizer steps")
    bucket_mb: float = Field(1024.0, gt=0.0)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: float = Field(600.0, gt=0.0)


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="evaluate every N steps on a fixed subset (0: never during training)")
    subset: int = Field(64, ge=1)
    at_end: bool = True
    at_start: bool = Field(
        False,
        description="also evaluate the starting weights on the whole split before step 1 (not on --resume); "
        "the end of the run then prints the paired before/after comparison",
    )
    protocol: Literal["fair", "paper-base", "paper-trained"] = Field(
        "fair",
        description="fair: the training prompt, eval.mode decoding, sampling.max_new_tokens, the reward's answer "
        "parsing (one protocol for before and after); paper-base / paper-trained: the EchoInk-R1 paper's two "
        "protocols exactly (evaluation/protocols.py), each with its prompt, decoding, 1024 tokens and lenient parser",
    )
    mode: Literal["greedy", "sampled"] = "greedy"
    samples: int = Field(1, ge=1)
    ablate: list[Literal["none", "audio", "image", "video", "both"]] = Field(
        default_factory=lambda: ["none"],
        description="conditions of the final evaluation: audio → silence (a clip or a video's sound), image → grey, "
        "video → grey frames, both → every medium; a record without that medium is left out of the condition",
    )

    @model_validator(mode="after")
    def _protocol_decoding(self) -> EvalConfig:
        if self.protocol != "fair" and (self.mode != "greedy" or self.samples != 1):
            raise ValueError(
                f"eval.mode / eval.samples choose the fair protocol's decoding; eval.protocol {self.protocol} "
                "fixes its own (evaluation/protocols.py): leave them at greedy / 1"
            )
        return self


class LogConfig(Section):
    samples_every: int = Field(
        50,
        ge=0,
        description="at step 1 and every N steps, log.samples_per_step completions with their question, "
        "picture, sound, rewards and advantage go to TensorBoard and RUN/samples.jsonl, their media to RUN/samples/ "
        "(watch/samples.py; echoink report shows them; 0: never)",
    )
    samples_per_step: int = Field(4, ge=1, description="completions logged at a sampled step (one per question first)")


class CheckpointConfig(Section):
    every: int = Field(100, ge=0, description="save every N steps (0: only at the end)")
    keep_last: int = Field(2, ge=1)
    at_end: bool = True


class PlacementConfig(Section):
    mode: Literal["auto", "split", "colocated"] = Field(
        "auto",
        description="split: every engine and every learner rank gets GPUs of its own; colocated: engine i and "
        "learner rank i share GPU i (vLLM sleeps while the learner trains; weights move within the node); "
        "auto: split where the cluster's GPUs hold that layout, else colocated (CPUs: split)",
    )
    check_memory: bool = Field(
        True,
        description="on GPUs, stop before anything starts when echoink's memory estimate (echoink plan) says the "
        "run does not fit this node's GPUs or host; false starts it anyway (the estimate is within 10 % of the "
        "measured peaks, RESULTS.md section 10)",
    )


class RayConfig(Section):
    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit), else a new local Ray; "auto": `ray start`
    num_cpus: float | None = None  # logical CPUs of a local Ray (None: what the run needs, at least the host's)
    use_gpus: Literal["auto", "yes", "no"] = "auto"

    @field_validator("use_gpus", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML reads a bare yes/no as a boolean
        return {True: "yes", False: "no"}.get(value, value) if isinstance(value, bool) else value


class FaultConfig(Section):
    max_engine_restarts: int = Field(3, ge=0)
    max_restarts: int = Field(0, ge=0, description="automatic resumes after a learner failure")
    max_nonfinite_steps: int = Field(3, ge=1, description="stop after this many skipped optimizer steps")
    collective_timeout_s: float = Field(1800.0, gt=0.0, description="a learner collective that waits longer fails")


class RunConfig(Section):
    model_path: Path = Path("checkpoints/tiny-omni")
    output_dir: Path = Path("runs/tiny")
    seed: int = 0
    total_steps: int | None = Field(None, ge=1, description="null: epochs × steps per epoch")
    epochs: float = Field(1.0, gt=0)
    system_prompt: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    media: MediaConfig = Field(default_factory=MediaConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    rewards: RewardConfig = Field(default_factory=RewardConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)

    @model_validator(mode="after")
    def _colocation(self) -> RunConfig:
        if self.placement.mode == "colocated":
            check_colocation(self)
        g = self.grpo
        if g.overlong == "penalty" and g.overlong_buffer >= self.sampling.max_new_tokens:
            raise ValueError(f"grpo.overlong_buffer ({g.overlong_buffer}) must be below sampling.max_new_tokens "
                             f"({self.sampling.max_new_tokens})")
        return self

    def steps_for(self, num_train_records: int) -> int:
        """The number of optimizer steps: ``total_steps`` or epochs over the training set."""
        if self.total_steps is not None:
            return self.total_steps
        # a last partial batch counts as a step, as in the reference (4,490 questions / 8 = 562)
        return max(1, math.ceil(num_train_records * self.epochs / self.grpo.questions_per_step))


def check_colocation(config: RunConfig) -> None:
    """What a colocated layout needs (also checked when ``placement.mode: auto`` chooses it)."""
    r, lc = config.rollout, config.learner
    if r.num_engines > lc.num_ranks:
        raise ValueError(
            f"placement.mode colocated pairs engine i with learner rank i: rollout.num_engines ({r.num_engines}) "
            f"must not exceed learner.num_ranks ({lc.num_ranks})"
        )
    if r.tensor_parallel_size != 1:
        raise ValueError("placement.mode colocated supports rollout.tensor_parallel_size 1 only (one GPU per pair)")
    if config.grpo.off_policy:
        raise ValueError(
            "grpo.off_policy overlaps the next rollout with learning, which colocated engines cannot do "
            "(they sleep while the learner trains): set grpo.off_policy: false or placement.mode: split"
        )


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid run config ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    recipe: str | Path | None = None,
) -> RunConfig:
    """Defaults ← YAML file ← recipe (configs/recipes/: an algorithm's keys) ← ``key=value``
    overrides; paths stay relative to the CWD until `with_absolute_paths`."""
    tree: dict[str, Any] = {}
    sources = []
    if path is not None:
        tree = read_yaml(Path(path))
        sources.append(str(path))
    if recipe is not None:
        tree = merge_trees(tree, read_yaml(Path(recipe)))
        sources.append(f"recipe {recipe}")
    for assignment in overrides:
        apply_override(tree, assignment)
    if overrides:
        sources.append("--set " + " ".join(overrides))
    source = " + ".join(sources) or "defaults"
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def dump_config(config: RunConfig | dict[str, Any]) -> str:
    """The config as YAML (a RunConfig, or its JSON record as a run plan keeps it)."""
    record = config.model_dump(mode="json") if isinstance(config, RunConfig) else config
    return yaml.safe_dump(record, sort_keys=False)
