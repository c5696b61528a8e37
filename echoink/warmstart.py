"""A short supervised warm start for tiny checkpoints: teach the answer format, not the answer.

Targets are ``<think>`` reasoning that names no option, then a uniformly random option letter: after
the warm start the format reward is high and the accuracy is at chance, so what GRPO adds later is
visible. Supervised fine-tuning is the learner's own GRPO step with every advantage 1, no KL term
and token-mean aggregation (its gradient is the negative log-likelihood's).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from avqa import Record, load_records
from learner.group import LearnerGroup
from learner.types import Experience, LearnerSettings
from omni.inputs import MediaSettings, load_processor
from orchestrator.placement import Layout, place
from orchestrator.ray_connect import connect
from orchestrator.teardown import end_actors

# Names no option and no cue value: it says what to look at, not what was seen.
REASONING = "let me match the colour and the tone"


def target_text(record: Record, rng: random.Random) -> str:
    letter = rng.choice(record.letters)  # uniformly random: the warm start must not teach the task
    return f"<think>{REASONING}</think><answer>{letter}</answer>"


def warm_start(
    model: Path,
    data: Path,
    out: Path,
    *,
    steps: int = 60,
    batch: int = 32,
    lr: float = 2e-3,
    ranks: int = 2,
    seed: int = 0,
    console: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``model`` on format targets for the records of ``data``; write the result to ``out``."""
    if steps < 1 or batch < 1 or ranks < 1 or lr <= 0:
        raise ValueError(f"warm start needs steps, batch, ranks ≥ 1 and lr > 0 (got {steps}, {batch}, {ranks}, {lr})")
    if (out / "config.json").exists():
        raise ValueError(f"{out} already holds a checkpoint; choose another --out or remove it")
    records = load_records(data)
    if not records:
        raise ValueError(f"{data}: no records to warm-start on")
    tokenizer = load_processor(model).tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rng = random.Random(seed)
    connect(None, None, ranks * 0.5)
    placement = place(Layout(use_gpus=False, engines=0, tensor_parallel_size=1, ranks=ranks,
                             cpus_per_engine=0.5, cpus_per_rank=0.5))
    settings = LearnerSettings(
        model_path=model, num_ranks=ranks, zero_stage=2, dtype="float32", gradient_checkpointing=False,
        micro_batch_size=max(1, -(-batch // ranks)), lr=lr, weight_decay=0.0, lr_schedule="constant",
        total_steps=steps, grad_clip=1.0, beta=0.0, loss_agg="token-mean", max_new_tokens=64, seed=seed,
        media=MediaSettings(),
    )
    started = time.perf_counter()
    group = LearnerGroup(settings, placement.learner_options)
    losses = []
    try:
        for step in range(1, steps + 1):
            chosen = [records[rng.randrange(len(records))] for _ in range(batch)]
            experiences = [
                Experience(r, tokenizer.encode(target_text(r, rng), add_special_tokens=False) + [end], advantage=1.0)
                for r in chosen
            ]
            metrics = group.train_step(experiences)
            losses.append(-metrics["logprob_mean"])
            if console and (step == 1 or step % 10 == 0 or step == steps):
                print(f"[echoink] warm start step {step}/{steps}: NLL per token {losses[-1]:.3f}", flush=True)
        group.save(str(out), train_state=False)  # a model folder, not a run to resume
    finally:
        end_actors(group.workers, f"the warm start of {out}")  # returns once their GPUs are free
        placement.remove()
    summary = {
        "source": str(model), "data": str(data), "records": len(records), "steps": steps, "batch": batch,
        "lr": lr, "seed": seed, "target": f"<think>{REASONING}</think><answer>(random letter)</answer>",
        "nll_first": losses[0], "nll_last": losses[-1], "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "warmstart.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
