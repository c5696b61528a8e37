"""What the learner takes and gives back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avqa import Record
from omni.inputs import MediaSettings


@dataclass
class Experience:
    """One completion to learn from: its question, tokens, advantage, and what the sampler saw."""

    record: Record
    completion_ids: list[int]
    advantage: float
    sampler_logprobs: list[float] | None = None  # vLLM's per-token log-probs (mismatch, off-policy IS)
    old_logprobs: list[float] | None = None  # the learner's before the step's first update (several passes)
    # a copy that evens out the ranks' micro-batches (learner.group.padded: under ZeRO-3 every
    # rank must run the same forwards); its advantage is 0 and it adds nothing
    padding: bool = False
    # cut at the token limit with grpo.overlong "mask" (orchestrator.scoring): its reward counts
    # in its group's baseline, but it leaves the loss and its normalisation
    overlong_masked: bool = False

    @property
    def in_loss(self) -> bool:
        """Whether its tokens count in the loss (and in the counts the loss is divided by)."""
        return not (self.padding or self.overlong_masked)


# the language model's attention and MLP projections (Qwen2 names)
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters on the policy (learner.lora); rank 0 is a full fine-tune."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS  # the last part of a linear layer's name
    towers: bool = False  # adapters on the audio and vision towers' layers of those names too

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(frozen=True)
class LearnerSettings:
    # the run's starting model: the policy's first weights (a resumed run loads its train state over
    # them), the reference's weights, and the files every checkpoint copies beside its weights
    model_path: Path
    num_ranks: int = 1
    zero_stage: int = 3
    dtype: str = "auto"  # auto: bfloat16 on GPUs, float32 on CPUs
    gradient_checkpointing: bool = True
    micro_batch_size: int = 4
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: int = 1
    grad_clip: float = 5.0
    freeze_audio_tower: bool = False
    freeze_vision_tower: bool = False
    share_prompts: bool = True  # each distinct prompt runs once per micro-batch (see omni.collate_shared)
    freeze: tuple[str, ...] = ()  # parameter-name prefixes held fixed (e.g. the embeddings)
    attn_implementation: str = "sdpa"
    beta: float = 0.001
    kl_estimator: str = "k3"
    policy_loss: str = "reference"  # learner.grpo.POLICY_LOSSES
    clip_eps: float | tuple[float, float] | None = None  # (low, high) of ppo_clip / gspo
    epochs_per_batch: int = 1  # optimizer passes over a step's batch (the group runs them)
    mini_batches: int = 1  # optimizer steps per pass
    loss_agg: str = "seq-mean-token-mean"
    entropy_coef: float = 0.0  # an entropy bonus in the loss (0: the entropy is only a metric)
    off_policy: bool = False
    rollout_correction: str = "auto"  # auto | none | tis | token_mask | seq_mask (auto: tis when off_policy)
    is_clip: float = 2.0
    correction_low: float = 0.5
    correction_high: float = 2.0
    # the rollout's sampling (config.sampling): the learner's log-probs are those of the same
    # distribution (omni.sampling.SamplingDistribution; the loss uses its tempered part)
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 0.95
    max_new_tokens: int = 768
    logprob_chunk: int = 1024
    fused_head: bool = False  # omni.head: completions through the head in chunks, no logits kept
    tower_attention: str = "varlen"  # varlen: one call per tower layer (omni.tower_attention) | per_window
    fused_optimizer: bool = True  # torch's fused AdamW kernel on GPUs (no state-sized temporaries)
    router_aux_loss_coef: float = 0.0  # a mixture of experts' balance loss, added × coef (omni/router.py)
    seed: int = 0
    media: MediaSettings = MediaSettings()
    system_prompt: str | None = None
    random_init: bool = False  # benchmarks: random weights from config.json, no checkpoint read
    collective_timeout_s: float = 1800.0  # a rank stuck in a collective fails after this
    release_memory: bool = False  # colocated on a GPU: return cached blocks after each step and push
    train: bool = True  # False: weights only, no optimizer (weight-sync benchmarks)
    lora: LoraSettings = LoraSettings()
    max_gpu_memory_gb: float | None = None  # a smaller card's memory on a larger one (benchmarks, plans)
    offload_optimizer: bool = False  # ZeRO-Offload: master weights, gradients' copy and moments on the host
    optimizer_dtype: str = "float32"  # bfloat16: master weights, gradients and moments in bf16
    reference_device: str = "gpu"  # cpu: the reference in host memory, on the GPU only for its forwards
