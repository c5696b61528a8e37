"""Learner: one GRPO step (policy forward and backward, reference forward, optimizer step) with
image + audio inputs, bf16, gradient checkpointing, against its yardstick in the same run: a bare
transformers forward + backward of the same thinker on the same tokens. Goal: learner/bare ≤ 1.2
and MFU ≥ 40 %.

    python benchmarks/bench_learner.py --layout 7b --ranks 2     # the 7B layout on 2 GPUs
    python benchmarks/bench_learner.py --layout 2b --ranks 1 --zero-stage 2 --micro-batch 16
    python benchmarks/bench_learner.py --cpu                     # checks the script on CPUs (not a number)

A step holds GRPO's shape: G completions of each question (`--group-size`, 16 as in the reference
run). The learner runs on random weights (`learner.random_init`: transformers' initialisation for
the seed, under ZeRO-2 and ZeRO-3 alike) twice on the same completions, with `learner.share_prompts`
(the default: each prompt and its media once per micro-batch) and without (one copy per
completion).

The bare yardstick runs in a Ray task with one learner rank's resources: the same thinker (the
learner's own build, so the same weights, dtype, attention implementation and gradient
checkpointing), no DeepSpeed and no RL: rank 0's share of the sequences as the learner's unshared
path builds them (prompt + completion, one copy per completion, the same processor calls and
collation), in the same micro-batches; the head scores the completion positions only (as the
learner's), the loss is the cross-entropy of the completion tokens, and the step is the inputs'
preparation + forward + backward, timed like the learner's (warm-up, then the median of
``--steps``), without an optimizer step or a reference forward: what the learner adds over it is
what the ratio measures. The last line is learner (one copy each) / bare, step time per GPU: the
same work on both sides (shared prompts' saving is its own row; without the unshared run, shared / bare).

The second yardstick (issue 27) splits the thinker's work into what plain trainers run: a plain
transformers Qwen2 language model of the thinker's text dimensions on the same language-model
tokens (`plain_lm_step`, its own Ray task), and the towers alone on the same media (inside the bare
task); the table ends its rows with learner / (plain LM + towers).

MFU = model FLOPs per GPU per step / step time / the card's dense bf16 peak (989 TFLOP/s for the
H100 and the H200, the same chip). Model FLOPs are 2·N per position forward and 4·N backward (6·N
for training) over the positions each part of the thinker actually runs on: the vision tower on
its patches (4 per image token; its merger on the image tokens), the audio tower on its encoder
frames (2 per audio token; its output projection on the audio tokens), the language model on every
token of every sequence it computes (prompt, media placeholders and completion), the LM head on the
scored completion tokens; embedding lookups and attention's quadratic term are not counted, nor is
the recomputation of gradient checkpointing. The learner is credited with the work it computes (a
shared prompt and its media once per micro-batch) plus 2·N for its reference forward; the bare path
with one copy per completion. Losses and gradient norms are checked finite before any time is
trusted (the script exits with status 1 otherwise, after its report).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

# The benchmark's shape on GPUs, and the tiny check of the script on CPUs (--cpu).
DEFAULTS = {
    "gpu": dict(layout="7b", ranks=2, sequences_per_gpu=16, group_size=16, tokens=768, micro_batch=4, steps=2,
                image_size=448, audio_seconds=10.0),
    "cpu": dict(layout="tiny", ranks=1, sequences_per_gpu=4, group_size=4, tokens=16, micro_batch=2, steps=1,
                image_size=56, audio_seconds=1.0),
}

# Which positions each parameter runs on (first matching prefix wins); None: a lookup, no matmul.
PARTS: tuple[tuple[str, str | None], ...] = (
    ("visual.merger.", "image_tokens"),
    ("visual.", "patches"),
    ("audio_tower.conv1.", "mel_frames"),
    ("audio_tower.audio_bos_eos_token.", None),
    ("audio_tower.ln_post.", "audio_tokens"),
    ("audio_tower.proj.", "audio_tokens"),
    ("audio_tower.", "audio_frames"),
    ("model.embed_tokens.", None),
    ("model.", "text_tokens"),
    ("lm_head.", "scored_tokens"),
)


def part_of(name: str) -> str | None:
    for prefix, positions in PARTS:
        if name.startswith(prefix):
            return positions
    raise KeyError(f"parameter {name} is in no part of the FLOP count (benchmarks/bench_learner.py PARTS)")


def prompt_positions(features: Any, merge: int) -> Counter:
    """Positions one prompt costs each part: its tokens, image patches and tokens, mel frames,
    audio encoder frames and tokens (the lengths of transformers' Qwen2.5-Omni audio encoder:
    the stride-2 conv, then the stride-2 pooling)."""
    patches = int(features.image_grid_thw.prod(dim=-1).sum())
    mel = int(features.feature_attention_mask.sum())
    frames = (mel - 1) // 2 + 1
    return Counter(text_tokens=int(features.input_ids.numel()), patches=patches, image_tokens=patches // merge**2,
                   mel_frames=mel, audio_frames=frames, audio_tokens=(frames - 2) // 2 + 1)


def work(micro_batches: Sequence[Sequence[Any]], prompts: dict[str, Counter], eos_ids: Sequence[int],
         shared: bool) -> Counter:
    """Positions per part over micro-batches: each prompt once per micro-batch (``shared``) or
    once per completion, plus every completion token (through its end of turn)."""
    from omni.inputs import completion_mask

    out: Counter = Counter()
    for micro in micro_batches:
        ids = [e.record.id for e in micro]
        for rid in (dict.fromkeys(ids) if shared else ids):
            out.update(prompts[rid])
        scored = sum(sum(completion_mask(e.completion_ids, eos_ids)) for e in micro)
        out.update(text_tokens=scored, scored_tokens=scored)
    return out


def flops(params: dict[str, int], positions: Counter, per_position: int) -> float:
    return float(per_position * sum(n * positions[part] for part, n in params.items()))


def chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def bare_step(settings: Any, experiences: Sequence[Any], steps: int, profile: bool) -> dict[str, Any]:
    """The yardstick, in its own process with one learner rank's resources (see the docstring)."""
    import torch
    import torch.nn.functional as F

    from learner.model import build_thinker, resolve_dtype
    from omni.forward import keep_last_positions
    from omni.inputs import (
        add_positions,
        collate,
        encode_prompt,
        load_processor,
        media_token_ids,
        prepare_prompt,
    )

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = resolve_dtype(settings.dtype, cuda)  # as a learner rank resolves it
    model = build_thinker(settings, device, dtype)  # the learner's own build: the same weights
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    processor = load_processor(settings.model_path)
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None})
    media_ids = media_token_ids(tokenizer)
    micro_batches = chunks(experiences, settings.micro_batch_size)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def one(phases: dict[str, float] | None = None) -> tuple[float, float, float, float]:
        """Seconds of one step (and of its input preparation), its loss and gradient norm. With
        ``phases``, each phase is closed by a device sync and timed (an untimed, profiled step)."""

        def lap(name: str, since: float) -> float:
            if phases is None:
                return since
            sync()
            now = time.perf_counter()
            phases[name] = phases.get(name, 0.0) + now - since
            return now

        model.zero_grad(set_to_none=True)
        sync()
        started = time.perf_counter()
        prepared = 0.0
        cache: dict[str, Any] = {}  # each question's prompt once per step, as the learner's
        loss_sum = 0.0
        for micro in micro_batches:
            t = time.perf_counter()
            with torch.profiler.record_function("inputs"):
                for e in micro:
                    if e.record.id not in cache:
                        prompt = prepare_prompt(e.record, processor, media=settings.media, system_prompt=settings.system_prompt)
                        cache[e.record.id] = add_positions(model, encode_prompt(processor, prompt))
                batch = collate([cache[e.record.id] for e in micro], [e.completion_ids for e in micro],
                                pad_id=pad_id, eos_ids=eos_ids, forbidden_ids=media_ids).to(device, float_dtype=dtype)
            prepared += time.perf_counter() - t
            t = lap("inputs", t)
            c = batch.completion_len
            with torch.profiler.record_function("forward"), keep_last_positions(model.lm_head, c + 1):
                logits = model(**batch.inputs, use_cache=False).logits[:, :-1, :]  # position t predicts token t
            t = lap("forward", t)
            with torch.profiler.record_function("loss"):
                mask = batch.completion_mask.float()
                nll = F.cross_entropy(logits.float().transpose(1, 2), batch.completion_ids, reduction="none")
                loss = (nll * mask).sum() / mask.sum().clamp(min=1.0)
            t = lap("loss", t)
            with torch.profiler.record_function("backward"):
                loss.backward()
            loss_sum += float(loss.detach())  # a host sync per micro-batch, as the learner's metrics
            lap("backward", t)
        sync()
        seconds = time.perf_counter() - started
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        return seconds, prepared, loss_sum, norm

    def towers() -> float:
        """Seconds of the towers alone on the step's media (one copy per completion, as the bare
        step): each micro-batch's pictures and clips forward and backward, nothing else."""
        model.zero_grad(set_to_none=True)
        cache: dict[str, Any] = {}
        batches = []
        for micro in micro_batches:
            for e in micro:
                if e.record.id not in cache:
                    prompt = prepare_prompt(e.record, processor, media=settings.media, system_prompt=settings.system_prompt)
                    cache[e.record.id] = add_positions(model, encode_prompt(processor, prompt))
            batches.append(collate([cache[e.record.id] for e in micro], [e.completion_ids for e in micro],
                                   pad_id=pad_id, eos_ids=eos_ids, forbidden_ids=media_ids).to(device, float_dtype=dtype))
        sync()
        started = time.perf_counter()
        for batch in batches:
            x = batch.inputs
            parts = []
            if "pixel_values" in x:
                parts += list(model.get_image_features(x["pixel_values"], x["image_grid_thw"], return_dict=True).pooler_output)
            if "input_features" in x:
                parts.append(model.get_audio_features(x["input_features"], x["feature_attention_mask"],
                                                      return_dict=True).last_hidden_state)
            if parts:
                sum(part.float().square().mean() for part in parts).backward()
        sync()
        seconds = time.perf_counter() - started
        grads = [p.grad.float() for p in model.parameters() if p.grad is not None]
        tower_norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
                           if grads else float("nan"))
        return seconds

    from omni.tower_attention import set_tower_attention

    tower_norms: list[float] = []
    one()  # warm-up
    other = "per_window" if settings.tower_attention == "varlen" else "varlen"
    set_tower_attention(model, other)  # the other way of the towers' attention, for the before/after row
    towers()
    other_runs = [towers() for _ in range(steps)]
    set_tower_attention(model, settings.tower_attention)
    towers()
    tower_runs = [towers() for _ in range(steps)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [one() for _ in range(steps)]
    out: dict[str, Any] = {
        "runs": [r[0] for r in runs], "inputs_s": [r[1] for r in runs], "loss": [r[2] for r in runs],
        "grad_norm": [r[3] for r in runs], "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "towers_runs": tower_runs, "towers_grad_norm": tower_norms[1:], "towers_mode": settings.tower_attention,
        "towers_other_mode": other, "towers_other_runs": other_runs,
    }
    if profile:
        from torch.profiler import ProfilerActivity

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        phases: dict[str, float] = {}
        with torch.profiler.profile(activities=activities) as prof:
            one(phases)
        out["phases"] = phases
        out["top_ops"] = prof.key_averages().table(
            sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=12
        )
    return out


def plain_lm_step(settings: Any, micro_batches: Sequence[Sequence[tuple[int, int]]], steps: int) -> dict[str, Any]:
    """The language-model yardstick, in its own process with one learner rank's resources: a plain
    transformers Qwen2 causal LM with the thinker's text dimensions (random weights from the seed,
    the learner's dtype, attention implementation and gradient checkpointing), forward + backward
    on the same sequences' lengths — (all tokens, completion tokens) per sequence, left-padded per
    micro-batch — with the head on the completion positions and their cross-entropy as the loss.
    No towers, no DeepSpeed, no RL: what a text-only trainer would run on these tokens."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    from learner.model import resolve_dtype
    from omni.forward import keep_last_positions

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = resolve_dtype(settings.dtype, cuda)
    text = AutoConfig.from_pretrained(str(settings.model_path), local_files_only=True).thinker_config.text_config
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    config = Qwen2Config(**{f: getattr(text, f) for f in fields}, head_dim=head_dim)
    torch.manual_seed(settings.seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, attn_implementation=settings.attn_implementation, dtype=dtype)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for micro in micro_batches:
        width, tail = max(n for n, _ in micro), max(c for _, c in micro)
        ids = torch.randint(0, config.vocab_size, (len(micro), width), generator=generator)
        mask = torch.zeros(len(micro), width, dtype=torch.long)
        scored = torch.zeros(len(micro), tail)
        for row, (n, c) in enumerate(micro):  # left-padded: every completion ends at the last position
            mask[row, width - n :] = 1
            scored[row, tail - c :] = 1.0
        batches.append((ids.to(device), mask.to(device), scored.to(device), tail))

    def one() -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        started, total = time.perf_counter(), 0.0
        for ids, mask, scored, tail in batches:
            with keep_last_positions(model.lm_head, tail + 1):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1, :]
            nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, -tail:], reduction="none")
            loss = (nll * scored).sum() / scored.sum().clamp(min=1.0)
            loss.backward()
            total += float(loss.detach())
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None])))
        return seconds, total, norm

    one()  # warm-up
    runs = [one() for _ in range(steps)]
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    return {"runs": [r[0] for r in runs], "loss": [r[1] for r in runs], "grad_norm": [r[2] for r in runs],
            "non_embedding_params": non_embedding,
            "head_params": model.lm_head.weight.numel()}


def parse_arm(text: str) -> dict[str, Any]:
    """``key=value,key=value`` → learner settings to change (true/false, numbers, or words)."""
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--arm {text!r}: expected KEY=VALUE[,KEY=VALUE], got {item!r}")
        word = value.strip()
        lowered = word.lower()
        out[key.strip()] = (lowered == "true" if lowered in ("true", "false")
                            else int(word) if word.lstrip("-").isdigit() else word)
    return out


def run_name(share: bool, changes: dict[str, Any] | None) -> str:
    """A learner run's name in the table: its prompts' path and its --arm settings."""
    return ("shared prompts" if share else "one copy each") + "".join(f", {k}={v}" for k, v in (changes or {}).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout")
    parser.add_argument("--ranks", type=int)
    parser.add_argument("--sequences-per-gpu", type=int)
    parser.add_argument("--group-size", type=int, help="G: completions per question")
    parser.add_argument("--no-unshared", action="store_true", help="skip the one-copy-per-completion learner run")
    parser.add_argument("--arm", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="run the shared learner once more with these learner settings (before/after in one run), "
                             "e.g. --arm tower_attention=per_window --arm fused_head=true; repeatable")
    parser.add_argument("--breakdown", action="store_true",
                        help="after each learner run's timed steps, one clocked step: its time by phase (learner.phases)")
    parser.add_argument("--tokens", type=int, help="completion length")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--zero-stage", type=int, default=3, choices=(2, 3))
    parser.add_argument("--steps", type=int, help="timed steps after one warm-up step")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--audio-seconds", type=float)
    parser.add_argument("--profile", action="store_true",
                        help="one more, untimed bare step: its phases (synced) and torch.profiler's top operators")
    parser.add_argument("--cpu", action="store_true", help="check the script on CPUs (tiny layout; not a number)")
    args = parser.parse_args()
    for key, value in DEFAULTS["cpu" if args.cpu else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import ray
    import torch
    from transformers import AutoConfig

    from avqa import load_records
    from learner.group import LearnerGroup, padded, shard_indices
    from learner.types import Experience, LearnerSettings
    from omni.family import family_of
    from omni.inputs import encode_prompt, load_processor, media_token_ids, prepare_prompt

    common.start_ray()
    folder = common.model_folder(args.layout, weights=False)  # random init, ZeRO-2 and ZeRO-3 alike
    config = AutoConfig.from_pretrained(str(folder)).thinker_config
    with torch.device("meta"):
        named = list(family_of(folder).thinker_type()._from_config(config).named_parameters())
    total_params = sum(p.numel() for _, p in named)
    params: dict[str, int] = Counter()
    for name, p in named:
        if (part := part_of(name)) is not None:
            params[part] += p.numel()
    total = args.sequences_per_gpu * args.ranks
    questions = max(1, -(-total // args.group_size))
    data = common.data_folder(max(8, questions), image_size=args.image_size, audio_seconds=args.audio_seconds)
    records = load_records(data / "train" / "omni_rl_format_train.json")
    processor = load_processor(folder)
    tokenizer = processor.tokenizer
    end_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None}
    banned = set(media_token_ids(tokenizer)) | end_ids
    rng = random.Random(0)
    vocab = len(tokenizer)

    def completion() -> list[int]:
        out = []
        while len(out) < args.tokens:
            token = rng.randrange(vocab)
            if token not in banned:
                out.append(token)
        return out

    experiences = [
        Experience(records[i // args.group_size], completion(), advantage=rng.choice([-1.0, 1.0]))
        for i in range(total)
    ]

    def settings(share: bool, changes: dict[str, Any] | None = None) -> LearnerSettings:
        return replace(LearnerSettings(
            model_path=folder, num_ranks=args.ranks, zero_stage=args.zero_stage, dtype="auto", gradient_checkpointing=True,
            micro_batch_size=args.micro_batch, lr=1e-6, beta=0.001, random_init=True,
            max_new_tokens=args.tokens, total_steps=args.steps + 2, share_prompts=share,
        ), **(changes or {}))

    arms = [parse_arm(text) for text in args.arm]
    for arm in arms:
        settings(True, arm)  # an unknown key fails here, before anything runs

    # the positions each distinct prompt costs, from the processor calls the learner makes
    media = settings(True).media
    merge = int(config.vision_config.spatial_merge_size)
    prompts = {r.id: prompt_positions(encode_prompt(processor, prepare_prompt(r, processor, media=media)), merge)
               for r in {e.record.id: e.record for e in experiences}.values()}
    eos_ids = sorted(end_ids)

    def micro_batches(share: bool) -> list[list[list[Any]]]:
        """Each rank's micro-batches, dealt as LearnerGroup.train_step deals them."""
        shards = padded(experiences, shard_indices(experiences, args.ranks, keep_prompts=share))
        return [chunks(s, args.micro_batch) for s in shards]

    peak, peak_words = common.peak_flops()
    # one learner rank's resources, the bare task's too (Ray sets OMP_NUM_THREADS from num_cpus).
    # On CPUs one thread each: two spinning OpenMP threads on a shared 2-core machine ran 10× slower
    per_rank = {"num_cpus": 1, "num_gpus": 0} if args.cpu else {"num_cpus": 2, "num_gpus": 1}
    problems: list[str] = []

    def mfu(flop: float, seconds: float) -> str:
        return f"MFU {flop / seconds / peak:.3f}" if peak else "MFU n/a"

    # the yardstick: rank 0's sequences (whole questions, as the shared learner deals them)
    bare_share = micro_batches(True)[0]
    bare_experiences = [e for micro in bare_share for e in micro]
    bare_task = ray.remote(**per_rank, max_calls=1)(bare_step)  # max_calls: GPU memory back
    bare = ray.get(bare_task.remote(settings(True), bare_experiences, args.steps, args.profile))
    bare["seconds"] = common.median(bare["runs"])
    bare_work = work(chunks(bare_experiences, args.micro_batch), prompts, eos_ids, shared=False)
    bare["flops"] = flops(params, bare_work, 6)
    bare["positions"] = dict(bare_work)
    for loss, norm in zip(bare["loss"], bare["grad_norm"], strict=True):
        if not (math.isfinite(loss) and math.isfinite(norm) and norm > 0):
            problems.append(f"bare: loss {loss}, gradient norm {norm}")
    print(f"bare forward + backward: {bare['seconds']:.3f} s per step", flush=True)
    # the plain language model on the bare step's sequences: (all LM tokens, completion tokens) each
    from omni.inputs import completion_mask

    lm_lengths = [[(prompts[e.record.id]["text_tokens"] + len(e.completion_ids), len(e.completion_ids)) for e in micro]
                  for micro in chunks(bare_experiences, args.micro_batch)]
    plain_task = ray.remote(**per_rank, max_calls=1)(plain_lm_step)
    plain = ray.get(plain_task.remote(settings(True), lm_lengths, args.steps))
    plain["seconds"] = common.median(plain["runs"])
    lm_tokens = sum(n for micro in lm_lengths for n, _ in micro)
    scored_tokens = sum(sum(completion_mask(e.completion_ids, eos_ids)) for e in bare_experiences)
    plain["flops"] = 6.0 * (plain["non_embedding_params"] * lm_tokens + plain["head_params"] * scored_tokens)
    bare["towers_seconds"] = common.median(bare["towers_runs"])
    tower_params = {k: v for k, v in params.items() if k not in ("text_tokens", "scored_tokens")}
    bare["towers_flops"] = flops(tower_params, bare_work, 6)
    for loss, norm in zip(plain["loss"], plain["grad_norm"], strict=True):
        if not (math.isfinite(loss) and math.isfinite(norm) and norm > 0):
            problems.append(f"plain LM: loss {loss}, gradient norm {norm}")
    for norm in bare["towers_grad_norm"]:
        if not (math.isfinite(norm) and norm > 0):
            problems.append(f"towers alone: gradient norm {norm}")
    yardstick = plain["seconds"] + bare["towers_seconds"]
    print(f"plain LM forward + backward: {plain['seconds']:.3f} s; towers alone {bare['towers_seconds']:.3f} s", flush=True)

    def measure(share: bool, changes: dict[str, Any] | None = None) -> dict[str, Any]:
        group = LearnerGroup(settings(share, changes), [per_rank] * args.ranks)
        clocked = None
        try:
            group.train_step(experiences)  # warm-up
            runs = [group.train_step(experiences) for _ in range(args.steps)]
            if args.breakdown:
                clocked = group.clocked_step(experiences)
        finally:
            group.kill()
        name = run_name(share, changes)
        for r in runs:
            if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0) \
                    or r.get("learner/step_skipped", 0) or r.get("learner/nonfinite_loss", 0):
                problems.append(f"learner, {name}: loss {r['loss']}, gradient norm {r['grad_norm']}, "
                                f"skipped {r.get('learner/step_skipped')}")
        seconds = common.median([r["timing/learn_s"] for r in runs])
        positions = Counter()
        for rank in micro_batches(share):
            positions.update(work(rank, prompts, eos_ids, shared=share))
        # the count must be the learner's own (which splits a shared prompt over its rows: fractions)
        if abs(positions["text_tokens"] - runs[-1]["learner/input_tokens"]) > 0.5:
            problems.append(f"learner, {name}: counted {positions['text_tokens']} language-model tokens, the learner "
                            f"reports {runs[-1]['learner/input_tokens']:.0f}")
        per_gpu = Counter({k: v / args.ranks for k, v in positions.items()})
        print(f"share_prompts={share}: {seconds:.3f} s per step, {runs[-1]['learner/input_tokens']:.0f} computed tokens",
              flush=True)
        return {
            "seconds": seconds, "runs": [r["timing/learn_s"] for r in runs], "input_tokens": runs[-1]["learner/input_tokens"],
            "flops": flops(params, per_gpu, 6), "flops_with_reference": flops(params, per_gpu, 8),
            "positions_per_gpu": dict(per_gpu), "loss": [r["loss"] for r in runs], "grad_norm": [r["grad_norm"] for r in runs],
            "peak_gib": max(r.get("memory/learner_peak_gb", 0.0) for r in runs), "name": name,
            "phases": clocked["phases"] if clocked else None,
            "clocked_s": clocked["metrics"]["timing/learn_s"] if clocked else None,
        }

    failed: list[tuple[str, str]] = []

    def attempt(share: bool, changes: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """An arm or the one-copy-each run that fails (out of memory, say) is a row, not the end of
        the run: the other arms' numbers still come back."""
        try:
            return measure(share, changes)
        except Exception as error:  # noqa: BLE001 (reported in the table and the record)
            name = run_name(share, changes)
            words = " ".join(str(error).split())
            failed.append((name, words[-400:]))
            print(f"learner, {name}: failed: {words[-400:]}", flush=True)
            return None

    shared = measure(True)
    armed = [m for m in (attempt(True, arm) for arm in arms) if m is not None]
    unshared = None if args.no_unshared else attempt(False)

    def listed(values: Sequence[float]) -> str:
        return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"

    if peak:  # the record keeps the numbers the table prints
        for m in (bare, shared, unshared, *armed):
            if m is not None:
                m["mfu"] = m["flops"] / m["seconds"] / peak
                if "flops_with_reference" in m:
                    m["mfu_with_reference"] = m["flops_with_reference"] / m["seconds"] / peak
    towers = {k: bare_work[k] for k in ("patches", "image_tokens", "audio_frames", "audio_tokens")}
    rows = [
        ("layout", f"{args.layout} ({total_params / 1e9:.3f} B parameters), ZeRO-{args.zero_stage} "
                   f"{'fp32 (CPU)' if args.cpu else 'bf16'}, gradient checkpointing, random init"),
        ("batch", f"{args.sequences_per_gpu} sequences/GPU × {args.ranks} GPU(s), G = {args.group_size}, "
                  f"{args.tokens} completion tokens, micro-batch {args.micro_batch}"),
        ("FLOPs counted", "6·N per position (2·N forward, 4·N backward): towers on their media positions only "
                          "(vision: patches, merger: image tokens; audio: encoder frames, projection: audio tokens), "
                          "the language model on every token, the head on the scored completion tokens"),
        ("peak", peak_words),
        ("bare fwd+bwd: step (median)", f"{bare['seconds']:.3f} s  runs {listed(bare['runs'])}  (input preparation "
                                        f"{common.median(bare['inputs_s']):.3f} s), one copy per completion"),
        ("bare fwd+bwd: work per GPU", f"{bare['flops'] / 1e12:.3f} TFLOP ({bare_work['text_tokens']} LM tokens, "
                                       f"tower positions {towers})  {mfu(bare['flops'], bare['seconds'])}"),
    ]
    rows += [
        ("plain LM fwd+bwd (the text dims)", f"{plain['seconds']:.3f} s  runs {listed(plain['runs'])}  on {lm_tokens} tokens "
                                             f"({plain['non_embedding_params'] / 1e9:.3f} B non-embedding)  "
                                             f"{mfu(plain['flops'], plain['seconds'])}"),
        (f"towers alone fwd+bwd (the media), tower_attention={bare['towers_mode']}", f"{bare['towers_seconds']:.3f} s  runs {listed(bare['towers_runs'])}  "
                                             f"{mfu(bare['towers_flops'], bare['towers_seconds'])}"),
        (f"towers alone, tower_attention={bare['towers_other_mode']}", f"{common.median(bare['towers_other_runs']):.3f} s  "
                                             f"runs {listed(bare['towers_other_runs'])}  "
                                             f"{mfu(bare['towers_flops'], common.median(bare['towers_other_runs']))}"),
        ("yardstick: plain LM + towers", f"{yardstick:.3f} s"),
    ]
    if not args.cpu:
        rows.append(("bare fwd+bwd: peak memory", f"{bare['peak_gib']:.1f} GiB"))
    extra: dict[str, Any] = {"arms": armed, "plain_lm": plain, "yardstick_s": yardstick, "params": total_params, "params_by_positions": dict(params), "group_size": args.group_size,
                             "bare": bare, "shared": shared, "unshared": unshared, "problems": problems, "args": vars(args)}
    for m in (shared, *armed, unshared):
        if m is None:
            continue
        name = "learner, " + m["name"]
        rows += [
            (f"{name}: step (median)", f"{m['seconds']:.3f} s  runs {listed(m['runs'])}  = {m['seconds'] / bare['seconds']:.2f} × bare"),
            (f"{name}: work per GPU", f"{m['flops'] / 1e12:.3f} TFLOP, {m['input_tokens'] / args.ranks:,.0f} LM tokens  "
                                      f"{mfu(m['flops'], m['seconds'])} (with the reference forward, 8·N: "
                                      f"{mfu(m['flops_with_reference'], m['seconds'])})"),
        ]
        if not args.cpu:
            rows.append((f"{name}: peak memory per GPU", f"{m['peak_gib']:.1f} GiB"))
        if m["phases"]:
            step = sum(m["phases"].values())
            rows.append((f"{name}: clocked step, {m['clocked_s']:.3f} s (synced phases)", ", ".join(
                f"{k} {v:.3f} s ({v / step:.0%})" for k, v in m["phases"].items())))
    # the same work on both sides: the yardstick runs one copy per completion, as the unshared
    # learner does (the shared learner runs each question's prompt and media once per micro-batch)
    rows += [(f"learner, {name}: FAILED", words) for name, words in failed]
    extra["failed"] = failed
    if unshared is not None:
        rows.append(("learner (one copy each) / (plain LM + towers)", f"{unshared['seconds'] / yardstick:.2f}"))
        extra["learner_over_yardstick"] = unshared["seconds"] / yardstick
    else:
        rows.append(("learner / (plain LM + towers)", "n/a: needs the one-copy-each learner (without --no-unshared)"))
    if unshared is not None:
        extra["unshared_over_bare"] = unshared["seconds"] / bare["seconds"]
    if "phases" in bare:
        step = sum(bare["phases"].values())
        rows.append(("bare, profiled step (synced phases)", ", ".join(
            f"{k} {v:.3f} s ({v / step:.0%})" for k, v in bare["phases"].items())))
        print("\nbare step, torch.profiler's top operators:\n" + bare["top_ops"], flush=True)
    rows.append(("losses and gradients finite", "yes" if not problems else "NO: " + "; ".join(problems)))
    name = f"learner_{args.layout}_{args.ranks}gpu_z{args.zero_stage}_mb{args.micro_batch}" + ("_cpu" if args.cpu else "")
    # the headline compares the same work: the bare step runs one copy of each prompt per completion,
    # as the unshared learner does; shared prompts' saving is the row above, not "overhead"
    if unshared is not None:
        ratio = ("learner (one copy each) / bare fwd+bwd, step time", unshared["seconds"] / bare["seconds"])
    else:
        ratio = ("learner (shared prompts) / bare fwd+bwd (one copy each), step time", shared["seconds"] / bare["seconds"])
    common.report(name, rows, ratio, extra)
    if problems:
        raise SystemExit("timings not trusted: " + "; ".join(problems))


if __name__ == "__main__":
    main()
