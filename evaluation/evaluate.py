"""Evaluation that can be trusted: the same engines for any checkpoint, under a named protocol
(`evaluation.protocols`: ``fair`` — the training prompt and the reward's answer parsing, greedy
or sampled — or the paper's ``paper-base`` / ``paper-trained``), with modality ablations.

Outputs: ``results.jsonl`` (one row per question and condition), ``summary.json``, a console table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from avqa import Record, load_audio, load_image, load_video
from evaluation.protocols import Protocol, get_protocol, with_token_limit
from evaluation.stats import is_reflective, mean_interval, prediction, wilson_interval
from omni.inputs import MediaSettings
from rewards import AccuracyMatch, accuracy_reward, format_reward
from rollout.pool import EnginePool
from rollout.types import SamplingSettings

# none: as asked; audio: silence (the clip, or a video's own sound track); image: a grey picture;
# video: grey frames (a video_audio record keeps its sound); both: every medium the record reads
CONDITIONS = ("none", "audio", "image", "video", "both")
GREY = (128, 128, 128)


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate; built from the run config by `orchestrator.settings.eval_settings`."""

    mode: str = "greedy"  # greedy | sampled (the fair protocol; the paper's fix their own)
    samples: int = 1  # completions per question in sampled mode
    ablate: tuple[str, ...] = ("none",)
    sampling: SamplingSettings = SamplingSettings(seed=0)  # sampled mode; greedy keeps its limit and seed
    media: MediaSettings = MediaSettings()
    protocol: str = "fair"  # evaluation.protocols.PROTOCOLS
    accuracy_match: AccuracyMatch = "letters"  # the fair protocol's parser: the run's accuracy reward's
    token_limit: int | None = None  # replaces a paper protocol's own limit (rehearsals); summary.json says so

    def __post_init__(self) -> None:
        protocol = get_protocol(self.protocol)
        if protocol.decoding is not None and (self.mode != "greedy" or self.samples != 1):
            raise ValueError(
                f"eval protocol {self.protocol} fixes its decoding ({'greedy' if protocol.decoding.greedy else 'one sample'}): "
                f"mode {self.mode!r} / samples {self.samples} apply to the fair protocol only"
            )

    @property
    def spec(self) -> Protocol:
        """The protocol in force (with ``token_limit`` where a rehearsal replaced its own)."""
        protocol = get_protocol(self.protocol)
        return protocol if self.token_limit is None else with_token_limit(protocol, self.token_limit)

    def only_plain(self) -> EvalSettings:
        return replace(self, ablate=("none",))

    def mode_in_force(self) -> str:
        """greedy | sampled: the fair protocol's eval.mode, or a paper protocol's own."""
        decoding = self.spec.decoding
        if decoding is None:
            return self.mode
        return "greedy" if decoding.greedy else "sampled"

    def completions(self) -> int:
        """Completions per question."""
        return self.samples if self.mode == "sampled" and self.spec.decoding is None else 1

    def decoding(self) -> SamplingSettings:
        spec = self.spec
        if spec.decoding is not None:
            return spec.decoding.sampling(self.sampling.seed)
        if self.mode == "greedy":
            return replace(self.sampling, temperature=0.0, top_p=1.0, top_k=-1)
        return self.sampling


def ablation_applies(record: Record, condition: str) -> bool:
    """Whether ``condition`` takes something away from ``record`` (a text question has nothing to
    silence): records it does not apply to are left out of that condition, not counted twice."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown ablation {condition!r}; known: {', '.join(CONDITIONS)}")
    if condition in ("none", "both"):
        return condition == "none" or bool(record.modalities)
    return condition in record.modalities


def ablated_media(record: Record, condition: str, settings: EvalSettings) -> dict[str, Any] | None:
    """Replacement media: silence of the clip's (or the sound track's) length, a flat grey image of
    the image's size, grey frames of the video's shape (and a video's other medium as decoded).

    Same sizes keep the prompt's token count, so only the content of the medium changes.
    """
    if condition == "none" or not ablation_applies(record, condition):
        return None
    m = settings.media
    takes = set(record.modalities) if condition == "both" else {condition}
    out: dict[str, Any] = {}
    if "video" in record.modalities and takes & {"video", "audio"}:
        clip = load_video(
            record.video_path,  # type: ignore[arg-type]
            fps=m.video_fps,
            max_frames=m.max_video_frames,
            min_pixels=m.video_min_pixels,
            max_pixels=m.video_max_pixels,
            with_audio=record.data_type == "video_audio",
            sample_rate=m.sample_rate,
            max_audio_seconds=m.max_audio_seconds,
        )
        # the medium kept is passed on too, so that the engine does not decode the file again
        out["video"] = np.full_like(clip.frames, GREY[0]) if "video" in takes else clip.frames
        if clip.audio is not None:
            out["audio"] = np.zeros_like(clip.audio) if "audio" in takes else clip.audio
    elif "audio" in takes:
        clip = load_audio(record.audio_path, sample_rate=m.sample_rate, max_seconds=m.max_audio_seconds)  # type: ignore[arg-type]
        out["audio"] = np.zeros_like(clip)
    if "image" in takes:
        image = load_image(record.image_path, min_pixels=m.min_pixels, max_pixels=m.max_pixels)  # type: ignore[arg-type]
        out["image"] = Image.new("RGB", image.size, GREY)
    return out


@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path | None = None
    per_condition: dict[str, dict[str, Any]] = field(default_factory=dict)

    def flat_metrics(self) -> dict[str, float]:
        out = {}
        for condition, s in self.per_condition.items():
            prefix = "" if condition == "none" else f"ablate_{condition}/"
            out[f"{prefix}accuracy"] = s["accuracy"]
            if condition == "none":
                out["format_rate"] = s["format_rate"]
                out["completion_length"] = s["mean_completion_length"]
                out["accuracy_lenient"] = s["accuracy_lenient"]
        return out

    def table(self) -> str:
        lines = [
            f"{'condition':<10} {'accuracy':>9} {'95% CI':>17} {'lenient':>8} {'format':>7} {'length':>7} {'changed':>8}",
        ]
        for condition, s in self.per_condition.items():
            lo, hi = s["ci95"]
            changed = s.get("answer_changed_rate")
            lines.append(
                f"{condition:<10} {s['accuracy']:>9.3f} {f'[{lo:.3f}, {hi:.3f}]':>17} {s['accuracy_lenient']:>8.3f} "
                f"{s['format_rate']:>7.3f} {s['mean_completion_length']:>7.1f} "
                f"{'' if changed is None else f'{changed:.3f}':>8}"
            )
        plain = self.per_condition.get("none")
        if plain is not None:
            r = plain["reflection"]
            lines.append(
                f"questions {plain['questions']} (errors {plain['errors']}), reflective completions "
                f"{r['rate']:.3f} (accuracy {r['accuracy_reflective']:.3f} vs {r['accuracy_not_reflective']:.3f})"
            )
        return "\n".join(lines)


def _score(text: str, gold: str, protocol: Protocol, match: AccuracyMatch) -> dict[str, Any]:
    predicted, correct = protocol.score(text, gold, match)
    return {
        "prediction": predicted,
        "prediction_lenient": prediction(text, lenient=True),
        "correct": correct,  # the protocol's parser
        "correct_reward": accuracy_reward(text, gold, match=match),  # the run's accuracy reward
        "correct_lenient": accuracy_reward(text, gold, lenient=True),
        "format_ok": format_reward(text),
        "reflective": is_reflective(text),
    }


def evaluate_records(
    pool: EnginePool,
    records: Sequence[Record],
    settings: EvalSettings,
    *,
    out_dir: Path | None = None,
    checkpoint: str = "",
    config: dict[str, Any] | None = None,
) -> EvalResult:
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    per_condition: dict[str, dict[str, Any]] = {}
    baseline: dict[str, str] = {}
    protocol = settings.spec
    n = settings.completions()
    sampling = settings.decoding()
    asked = protocol.prepare(records)  # the protocol's prompt on each record (fair: as they are)
    for condition in settings.ablate:
        keep = [i for i, r in enumerate(records) if ablation_applies(r, condition)]
        chosen = [records[i] for i in keep]
        overrides = [ablated_media(r, condition, settings) for r in chosen] if condition != "none" else None
        results = pool.generate([asked[i] for i in keep], n, sampling, salt=0, media_overrides=overrides) if keep else []
        cond_rows = []
        for record, result in zip(chosen, results, strict=True):
            row: dict[str, Any] = {"id": record.id, "condition": condition, "gold": record.answer, "data_type": record.data_type}
            if not result.ok:
                row.update(error=result.error, correct=0.0, correct_reward=0.0, correct_lenient=0.0, format_ok=0.0, prediction="")
                cond_rows.append(row)
                continue
            samples = [
                {
                    **_score(c.text, record.answer, protocol, settings.accuracy_match),
                    "completion": c.text,
                    "tokens": len(c.token_ids),
                    "finish_reason": c.finish_reason,
                }
                for c in result.completions
            ]
            first = samples[0]
            row.update(
                prediction=first["prediction"],
                prediction_lenient=first["prediction_lenient"],
                correct=float(np.mean([s["correct"] for s in samples])),
                correct_reward=float(np.mean([s["correct_reward"] for s in samples])),
                correct_lenient=float(np.mean([s["correct_lenient"] for s in samples])),
                format_ok=float(np.mean([s["format_ok"] for s in samples])),
                completion=first["completion"],
                tokens=float(np.mean([s["tokens"] for s in samples])),
                cut=float(np.mean([s["finish_reason"] == "length" for s in samples])),
                prompt_tokens=len(result.prompt_token_ids),
                reflective=float(np.mean([s["reflective"] for s in samples])),
            )
            if n > 1:
                row["samples"] = samples
            cond_rows.append(row)
        if condition == "none":
            baseline = {r["id"]: r.get("prediction", "") for r in cond_rows}
        per_condition[condition] = summarise(cond_rows, settings, baseline if condition != "none" else None)
        per_condition[condition]["not_applicable"] = len(records) - len(keep)
        rows.extend(cond_rows)
    summary = {
        "checkpoint": checkpoint,
        "protocol": protocol.record_of(sampling, n, settings.accuracy_match),
        "mode": settings.mode_in_force(),
        "samples": n,
        "conditions": per_condition,
        "seconds": time.perf_counter() - started,
        "settings": asdict(settings),
        "config": config or {},
    }
    if "none" in per_condition:
        keys = ("accuracy", "accuracy_reward", "accuracy_lenient", "format_rate", "mean_completion_length", "cut_rate",
                "questions", "errors", "ci95")
        summary.update({k: per_condition["none"][k] for k in keys})
    result = EvalResult(rows=rows, summary=summary, out_dir=out_dir, per_condition=per_condition)
    if out_dir is not None:
        write_eval(result, out_dir)
    return result


def summarise(rows: Sequence[dict[str, Any]], settings: EvalSettings, baseline: dict[str, str] | None) -> dict[str, Any]:
    ok = [r for r in rows if "error" not in r]
    correct = [r["correct"] for r in rows]  # a failed question counts as wrong
    accuracy = float(np.mean(correct)) if rows else 0.0
    if settings.mode_in_force() == "sampled" and settings.spec.decoding is None:
        ci = mean_interval(correct)  # the fair protocol sampled: a mean over questions of sample means
    else:
        ci = wilson_interval(sum(correct), len(correct))
    reflective = [r for r in ok if r.get("reflective", 0) >= 0.5]
    plain = [r for r in ok if r.get("reflective", 0) < 0.5]
    out: dict[str, Any] = {
        "questions": len(rows),
        "errors": len(rows) - len(ok),
        "accuracy": accuracy,
        "accuracy_reward": float(np.mean([r["correct_reward"] for r in rows])) if rows else 0.0,
        "accuracy_lenient": float(np.mean([r["correct_lenient"] for r in rows])) if rows else 0.0,
        "ci95": [ci[0], ci[1]],
        "format_rate": float(np.mean([r["format_ok"] for r in ok])) if ok else 0.0,
        "mean_completion_length": float(np.mean([r["tokens"] for r in ok])) if ok else 0.0,
        "cut_rate": float(np.mean([r["cut"] for r in ok])) if ok else 0.0,  # stopped at the token limit
        "reflection": {
            "rate": len(reflective) / len(ok) if ok else 0.0,
            "accuracy_reflective": float(np.mean([r["correct"] for r in reflective])) if reflective else 0.0,
            "accuracy_not_reflective": float(np.mean([r["correct"] for r in plain])) if plain else 0.0,
        },
    }
    types = sorted({r.get("data_type", "image_audio") for r in rows})
    out["by_type"] = {
        t: {
            "questions": len(of),
            "accuracy": float(np.mean([r["correct"] for r in of])),
        }
        for t in types
        if (of := [r for r in rows if r.get("data_type", "image_audio") == t])
    }
    if baseline is not None:
        changed = [r for r in ok if r["id"] in baseline and r["prediction"] != baseline[r["id"]]]
        out["answer_changed_rate"] = len(changed) / len(ok) if ok else 0.0
    return out


def write_eval(result: EvalResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.jsonl", "w", encoding="utf-8") as fh:
        for row in result.rows:
            fh.write(json.dumps(row) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(result.summary, indent=2, default=str) + "\n", encoding="utf-8")


def evaluate_in_run(
    pool: EnginePool,
    records: Sequence[Record],
    settings: EvalSettings,
    *,
    subset: int,
    run_dir: Path,
    step: int,
    name: str | None,
    say: Callable[[str], None],
) -> dict[str, float]:
    """An evaluation inside a training run, on its engines. ``name`` None: the periodic check (the
    first ``subset`` questions, no ablations) into eval/step-N; else the whole split with every
    ablation into eval/NAME, printed. Returns the ``eval/*`` metrics."""
    if name is None:
        records, settings = records[:subset], settings.only_plain()
    folder = run_dir / "eval" / (name or f"step-{step:06d}")
    result = evaluate_records(pool, list(records), settings, out_dir=folder, checkpoint=str(run_dir))
    if name is not None:
        which = "starting" if name == "start" else "final"
        say(f"evaluation of the {which} weights ({folder}):\n" + result.table())
    return {f"eval/{k}": v for k, v in result.flat_metrics().items()}
