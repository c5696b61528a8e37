"""What a run holds in memory — on each GPU, per role and phase, and on the host — before it starts:
`echoink plan --gpu-memory/--host-memory`'s estimate, and the check that stops a config that cannot
fit, naming its largest item and a lever that would make it fit.

The bytes are counted from the thinker's shape (omni.sizes: every parameter, from config.json) and
the config: weights in the learner's dtype, DeepSpeed ZeRO's gradients, master weights and Adam
moments (partitioned over the ranks; on the host with ZeRO-Offload; bf16 with
learner.optimizer_dtype), the reference copy, LoRA's adapters, the engine's share of the card
(vLLM takes ``rollout.memory_share`` of it for weights and KV cache, whatever the model).

Two numbers are measured rather than derived (one H200, RESULTS.md section 9):
- the activations of one sequence under gradient checkpointing are dominated by the head's
  float32 log-softmax over the vocabulary, kept for the backward: ``HEAD_BYTES_PER_LOGIT`` bytes
  per completion token and vocabulary entry, fitted on the 3B LoRA row, plus each layer's
  checkpointed input;
- ``OVERHEAD_GIB`` per GPU: CUDA contexts, a sleeping engine's remainder, the allocator's cache.
The estimate is held against every measured row (tests/test_memory_plan_cpu.py): within 10 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omni.sizes import ModelShape
from orchestrator.config_files import apply_override

GIB = 2**30
BUCKET_ELEMENTS = 5e8  # learner.model.deepspeed_config's reduce / all-gather bucket size
HEAD_BYTES_PER_LOGIT = 15.6  # measured: (43.1 GiB peak − the 3B LoRA learner's resident bytes) / 16 sequences
OVERHEAD_GIB = 5.0  # measured: GPU memory in use beyond what the roles allocate (sections 6 and 9)
# measured: host memory in use beyond the offloaded states, per actor (the driver, Ray, vLLM's and
# the learner's processes: 17.3 GiB for the 3B offload row's two actors, section 10)
PROCESS_GIB = 8.6
# a learner phase this close to the card may still fail: the allocator's fragmentation (the 7B run
# estimated at 123.6 GiB of 139.8 failed at its first backward with 22.8 GiB reserved but unused)
TIGHT = 0.88
TEXT_TOKENS = 128  # a prompt's text, chat template and media markers (the AVQA questions: 60–120)
AUDIO_TOKENS_PER_SECOND = 25  # Qwen2.5-Omni's audio tower after pooling


@dataclass(frozen=True)
class Item:
    name: str
    gib: float
    note: str = ""


@dataclass(frozen=True)
class Phase:
    """One moment of a GPU's life: what it holds then."""

    name: str
    items: tuple[Item, ...]

    @property
    def gib(self) -> float:
        return sum(i.gib for i in self.items)


@dataclass(frozen=True)
class MemoryPlan:
    gpu_gib: float | None  # the card's memory (--gpu-memory), None: not checked
    host_gib: float | None
    phases: tuple[Phase, ...]  # each GPU kind's phases (learner GPUs, engine GPUs)
    host: tuple[Item, ...]  # host memory of one node holding the run
    levers: tuple[str, ...]  # what is on

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.gib)

    @property
    def learner_peak(self) -> float:
        """What the learner's allocator peaks at (its step or its update, whichever needs more): the
        learner phases without the overhead, comparable to ``memory/learner_peak_gb``."""
        return max(p.gib for p in self.phases if p.name.startswith("learner GPU") and "rollout" not in p.name) - OVERHEAD_GIB

    @property
    def both_awake(self) -> float | None:
        """A colocated GPU's memory while the engine generates (``memory/gpu_used_awake_gb``)."""
        return next((p.gib for p in self.phases if "rollout" in p.name), None)

    @property
    def host_total(self) -> float:
        return sum(i.gib for i in self.host)

    @property
    def fits(self) -> bool:
        gpu = self.gpu_gib is None or self.peak.gib <= self.gpu_gib
        host = self.host_gib is None or self.host_total <= self.host_gib
        return gpu and host

    @property
    def tight(self) -> bool:
        """Fits, but a phase the learner's allocator manages is within (1 − TIGHT) of the card."""
        return self.gpu_gib is not None and any(
            p.gib > TIGHT * self.gpu_gib for p in self.phases if p.name.startswith("learner GPU") and "rollout" not in p.name)

    def largest(self) -> Item:
        """The largest item of the phase that needs the most (or of the host, when that is what fails)."""
        if self.gpu_gib is not None and self.peak.gib > self.gpu_gib or self.host_gib is None:
            return max(self.peak.items, key=lambda i: i.gib)
        return max(self.host, key=lambda i: i.gib)

    def describe(self) -> str:
        lines = []
        for phase in self.phases:
            head = f"{phase.name}: {phase.gib:.1f} GiB"
            if self.gpu_gib is not None:
                head += f" of {self.gpu_gib:g}" + ("" if phase.gib <= self.gpu_gib else "  ← does not fit")
            lines.append(head)
            lines += [f"    {i.name:<34} {i.gib:7.1f}  {i.note}".rstrip() for i in phase.items if i.gib >= 0.05]
        head = f"host: {self.host_total:.1f} GiB"
        if self.host_gib is not None:
            head += f" of {self.host_gib:g}" + ("" if self.host_total <= self.host_gib else "  ← does not fit")
        lines.append(head)
        lines += [f"    {i.name:<34} {i.gib:7.1f}  {i.note}".rstrip() for i in self.host if i.gib >= 0.05]
        lines.append("levers: " + (", ".join(self.levers) or "none"))
        if self.tight:
            lines.append(f"warning: a learner phase needs more than {TIGHT:.0%} of the card: the allocator's fragmentation "
                         "may still stop it (RESULTS.md section 10); a lever below gives room")
        return "\n".join(lines)


def prompt_tokens(config: Any) -> int:
    """A prompt's tokens at the media limits: its text, its picture's merged patches or its video's
    (whichever is larger, of the media a prompt may hold), its clip's frames."""
    m = config.media
    allowed = {"image": 1, "audio": 1, "video": 1} if m.per_prompt == "auto" else m.per_prompt
    picture = allowed.get("image", 0) * m.max_pixels // (28 * 28)
    video = allowed.get("video", 0) * (m.max_video_frames // 2) * (m.video_max_pixels // (28 * 28))
    audio = allowed.get("audio", 0) * int(AUDIO_TOKENS_PER_SECOND * m.max_audio_seconds)
    return TEXT_TOKENS + max(picture, video) + audio


def estimate(config: Any, shape: ModelShape, *, colocated: bool, gpu_gib: float | None = None,
             host_gib: float | None = None) -> MemoryPlan:
    """The memory of ``config`` (an orchestrator.config.RunConfig) for a thinker of ``shape``."""
    lc, g = config.learner, config.grpo
    cuda_dtype = lc.dtype if lc.dtype != "auto" else "bfloat16"  # the estimate is for GPUs
    w = 2 if cuda_dtype == "bfloat16" else 4
    ranks, zero3 = lc.num_ranks, lc.zero_stage == 3
    params = shape.parameters
    lora = lc.lora.rank > 0
    if lora:
        trainable = shape.lora_parameters(lc.lora.rank, lc.lora.targets, lc.lora.towers)
    else:
        frozen = set(shape.under(lc.freeze))
        frozen |= set(shape.under(["audio_tower"])) if lc.freeze_audio_tower else set()
        frozen |= set(shape.under(["visual"])) if lc.freeze_vision_tower else set()
        trainable = params - shape.count(frozen)
    share = (lambda n: n / ranks) if zero3 else (lambda n: n)  # weights: partitioned under ZeRO-3
    state = 2 if lc.optimizer_dtype == "bfloat16" else 4  # bytes of a master weight and of a moment
    optimizer = trainable / ranks * (state + 2 * state)  # master weights + two moments: always partitioned
    update_copy = trainable / ranks * state  # the gradients in the master weights' dtype, for the update
    # ZeRO-Offload also accumulates each micro-batch's gradients on the host in the weights' dtype
    # (DeepSpeed's accumulated_grads_in_cpu; with bf16 master weights it accumulates into the copy above)
    host_accumulation = trainable / ranks * w if lc.optimizer_dtype == "float32" else 0.0
    reference = g.beta > 0 and not lora
    new = config.sampling.max_new_tokens
    per_sequence = HEAD_BYTES_PER_LOGIT * new * shape.vocab + shape.layers * (prompt_tokens(config) + new) * shape.hidden * w
    head_chunk = 0.0
    if lc.fused_head and lc.share_prompts and lc.zero_stage == 2 and config.grpo.entropy_coef == 0:
        # omni.head: no logits kept, only each completion token's hidden state; a chunk's logits,
        # probabilities and their gradient at a time (derived, not measured: issue 27)
        per_sequence = shape.layers * (prompt_tokens(config) + new) * shape.hidden * w + new * shape.hidden * w
        head_chunk = 3 * 4 * lc.logprob_chunk * shape.vocab
        # the head weight's gradient, summed over chunks in float32 (and a chunk's bf16 and fp32 parts)
        head_chunk += (4 + 2 + 4) * shape.vocab * shape.hidden
        # plus one layer's activations, recomputed in the backward for the whole micro-batch (the
        # measured constant of the plain path holds this; here it is counted: 3 MLP and 6 hidden widths)
        intermediate = shape.shapes.get("model.layers.0.mlp.gate_proj.weight", (4 * shape.hidden,))[0]
        head_chunk += lc.micro_batch_size * (prompt_tokens(config) + new) * (3 * intermediate + 6 * shape.hidden) * w
    if not lc.gradient_checkpointing:  # every layer's activations (not measured: an upper guide)
        per_sequence += 34 * shape.layers * (prompt_tokens(config) + new) * shape.hidden * w
    offload = lc.offload_optimizer
    resident = [
        Item("policy weights", share(params * w) / GIB, f"{params / 1e9:.2f} B × {w} bytes" + (f" / {ranks} ranks" if zero3 else "")),
        Item("LoRA adapters", trainable * w / GIB if lora else 0.0, f"rank {lc.lora.rank}: {trainable / 1e6:.1f} M"),
        Item("reference model", share(params * w) / GIB if reference and lc.reference_device == "gpu" else 0.0,
             "a frozen copy (learner.reference_device: cpu moves it to the host)"),
        Item("gradients", 0.0 if offload else trainable * w / ranks / GIB,
             f"{trainable / 1e9:.2f} B trainable, partitioned" + ("; reduced straight to the host" if offload else "")),
        Item("gradient buckets", 2 * BUCKET_ELEMENTS * w / GIB, "DeepSpeed's reduce buckets"),
        Item("master weights + Adam moments", 0.0 if offload else optimizer / GIB,
             ("bf16" if lc.optimizer_dtype == "bfloat16" else "fp32") + (" (on the host)" if offload else "")),
    ]
    overhead = Item("contexts, allocator cache", OVERHEAD_GIB, "measured")
    activations = Item("activations", lc.micro_batch_size * per_sequence / GIB,
                       f"micro-batch {lc.micro_batch_size} × {per_sequence / GIB:.2f} GiB (head's log-softmax, checkpoints)")
    step = [*resident, activations, overhead]
    if head_chunk:
        step.insert(-1, Item("head chunk + a layer's recompute", head_chunk / GIB, "learner.fused_head (derived, not measured)"))
    phases = [Phase("learner GPU, learner step" + (" (engine asleep)" if colocated else ""), tuple(step))]
    if not offload:
        # torch's multi-tensor AdamW makes a temporary the size of its moments, all parameters at
        # once (measured: _foreach_sqrt asked for 17.52 GiB on the 3B, RESULTS.md section 11); the
        # fused kernel (learner.fused_optimizer, the default) makes none
        foreach = Item("AdamW's foreach temporaries", 0.0 if lc.fused_optimizer else update_copy / GIB,
                       "none: the fused kernel" if lc.fused_optimizer else "one state-sized copy")
        phases.append(Phase("learner GPU, optimizer update",
                            (*resident, Item("gradients cast for the update", update_copy / GIB), foreach, overhead)))
    if reference and lc.reference_device == "cpu":
        phases.append(Phase("learner GPU, reference visit", (*resident, Item("reference model (visiting)", params * w / GIB), overhead)))
    engine_weights = params * 2 / GIB  # vLLM's bf16 copy of the thinker (its tensor-parallel shards summed)
    engine_budget = config.rollout.memory_share * gpu_gib if gpu_gib is not None else engine_weights
    engine_note = (f"rollout.memory_share {config.rollout.memory_share:g} of the card: weights {engine_weights:.1f} GiB + KV cache"
                   if gpu_gib is not None else "its weights; the KV cache takes rollout.memory_share of the card")
    engine = Item("engine (vLLM)", engine_budget, engine_note)
    if colocated:
        phases.append(Phase("learner GPU, rollout (engine awake)", (*resident, engine, overhead)))
    else:
        phases.append(Phase("engine GPU", (engine, overhead)))
    host = [
        Item("optimizer states (ZeRO-Offload)", (optimizer + update_copy + host_accumulation) / GIB * ranks if offload
             else 0.0, "master weights, moments, gradients (not pinned: learner.model)"),
        Item("reference model (host)", params * w / GIB * ranks if reference and lc.reference_device == "cpu" else 0.0, "pinned"),
        Item("sleeping engine's weights", engine_weights if colocated and config.sync.every > 1 else 0.0, "vLLM sleep level 1"),
        Item("processes", PROCESS_GIB * (ranks + config.rollout.num_engines), f"{PROCESS_GIB:g} GiB an actor (measured)"),
    ]
    levers = tuple(name for name, on in (
        (f"LoRA rank {lc.lora.rank}", lora), ("ZeRO-Offload", offload), ("bf16 optimizer states", lc.optimizer_dtype == "bfloat16"),
        ("reference on the host", reference and lc.reference_device == "cpu"), ("ZeRO-3", zero3),
        ("gradient checkpointing", lc.gradient_checkpointing)) if on)
    return MemoryPlan(gpu_gib, host_gib, tuple(phases), tuple(host), levers)


# levers tried, one at a time and then together, for a config that does not fit: (key, value)
def _levers(config: Any) -> list[tuple[str, Any]]:
    lc = config.learner
    out: list[tuple[str, Any]] = []
    if lc.micro_batch_size > 1:
        out.append(("learner.micro_batch_size", max(1, lc.micro_batch_size // 2)))
    if lc.lora.rank == 0 and config.grpo.beta > 0 and lc.zero_stage == 2 and lc.reference_device == "gpu":
        out.append(("learner.reference_device", "cpu"))
    if lc.optimizer_dtype == "float32" and lc.dtype == "bfloat16":
        out.append(("learner.optimizer_dtype", "bfloat16"))
    if not lc.offload_optimizer:
        out.append(("learner.offload_optimizer", True))
    if lc.lora.rank == 0 and lc.zero_stage == 2:
        out.append(("learner.lora.rank", 64))
    if config.rollout.memory_share > 0.2:
        out.append(("rollout.memory_share", round(config.rollout.memory_share * 0.75, 2)))
    return out


def _with(config: Any, key: str, value: Any) -> Any:
    """``config`` with ``key`` set to ``value``, validated again: the path of ``--set``."""
    tree = config.model_dump(mode="python")
    apply_override(tree, f"{key}={value}")
    return type(config).model_validate(tree)


def lever_that_fits(config: Any, shape: ModelShape, *, colocated: bool, gpu_gib: float | None,
                    host_gib: float | None) -> list[tuple[str, Any]] | None:
    """What makes ``config`` fit: the first single lever (``_levers``' order), else the fewest of them
    in that order together — a full fine-tune's levers before LoRA, which changes what is trained;
    None if none of that fits."""

    def fits(changes: list[tuple[str, Any]]) -> bool:
        current = config
        for key, value in changes:
            current = _with(current, key, value)
        return estimate(current, shape, colocated=colocated, gpu_gib=gpu_gib, host_gib=host_gib).fits

    candidates = _levers(config)
    full = [c for c in candidates if c[0] != "learner.lora.rank"]
    for group in (full, candidates):
        for lever in group:
            if fits([lever]):
                return [lever]
        for n in range(2, len(group) + 1):
            if fits(group[:n]):
                return group[:n]
    return None


def check_fits(config: Any, shape: ModelShape, *, colocated: bool, gpu_gib: float | None,
               host_gib: float | None = None) -> MemoryPlan:
    """The estimate; a ValueError naming the largest item and the levers that fit when it does not."""
    plan = estimate(config, shape, colocated=colocated, gpu_gib=gpu_gib, host_gib=host_gib)
    if plan.fits:
        return plan
    largest = plan.largest()
    over = (f"{plan.peak.name} needs {plan.peak.gib:.1f} GiB of {gpu_gib:g}"
            if gpu_gib is not None and plan.peak.gib > gpu_gib else f"the host needs {plan.host_total:.1f} GiB of {host_gib:g}")
    fix = lever_that_fits(config, shape, colocated=colocated, gpu_gib=gpu_gib, host_gib=host_gib)
    hint = ("set " + " ".join(f"{k}={v}" for k, v in fix)) if fix else "no lever of echoink's makes it fit: use more GPUs"
    raise ValueError(f"the run does not fit: {over}; the largest item is {largest.name} ({largest.gib:.1f} GiB); {hint}\n"
                     + plan.describe())
