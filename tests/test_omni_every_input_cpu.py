"""Every omni input — video with its sound, video, audio, image, text, image + audio — through real
vLLM (CPU) and the learner's transformers thinker, in one mixed batch.

Token identity by construction: both sides start from `omni.inputs.prepare_prompt`, vLLM runs the
checkpoint's own processor with the prompt's processor arguments, and the learner computes each
prompt's rotary positions with the thinker's own rope index (one prompt at a time, so one batch can
mix prompts with and without ``use_audio_in_video``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from avqa import DATA_TYPES, load_records
from omni.forward import completion_logprobs
from omni.inputs import (
    add_positions,
    collate,
    collate_shared,
    encode_prompt,
    load_processor,
    media_token_ids,
    prepare_prompt,
)
from rollout.engine import RolloutEngine
from rollout.types import EngineSettings, SamplingSettings

SAMPLING = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=10, seed=3)
# vLLM 0.32's interleaved video + sound positions differ from transformers' (the reference, whose
# rope index the learner uses): it gives the paired <|vision_bos|><|audio_bos|> (and the paired
# ends) two positions where transformers gives one, and orders a chunk's frame tokens differently.
# Prompt tokens are identical; the log-probs differ by ~1e-3 on the tiny model (measured 1.2e-3),
# which the run reports as mismatch/* and rollout correction weighs. The other types: rounding.
ROUNDING = 1e-4
VIDEO_AUDIO_GAP = 2e-2


@pytest.fixture(scope="module")
def sampled(ray_local, tiny_checkpoint: Path, mixed):
    def start(index: int, **limits):
        settings = EngineSettings(model_path=tiny_checkpoint, max_model_len=1024, enforce_eager=True, **limits)
        return ray_local.remote(RolloutEngine).options(num_cpus=1).remote(settings, index)

    engines = [start(0), start(1, media_per_prompt=(("audio", 1), ("image", 1), ("video", 0)))]
    try:
        results = ray_local.get(engines[0].generate.remote(mixed, 2, SAMPLING))
        refused = ray_local.get(engines[1].generate.remote(mixed, 1, SAMPLING))
    finally:
        for engine in engines:
            ray_local.kill(engine)
    return results, refused


@pytest.fixture(scope="module")
def learner_side(tiny_checkpoint: Path):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    return model.eval(), load_processor(tiny_checkpoint)


def test_each_type_gives_vllm_and_the_learner_the_same_prompt_tokens(sampled, learner_side, mixed) -> None:
    results, _ = sampled
    model, processor = learner_side
    vocab = processor.tokenizer.get_vocab()
    for record, result in zip(mixed, results, strict=True):
        assert result.ok, f"{record.data_type}: {result.error}"
        features = encode_prompt(processor, prepare_prompt(record, processor))
        assert result.prompt_token_ids == features.input_ids.tolist(), record.data_type
        ids = features.input_ids.tolist()
        # each type carries the placeholders of what it reads and no others
        holds = {m: vocab[t] in ids for m, t in (("image", "<|IMAGE|>"), ("audio", "<|AUDIO|>"), ("video", "<|VIDEO|>"))}
        assert holds == {m: m in record.modalities for m in holds}, (record.data_type, holds)


def test_video_with_its_sound_gets_time_aligned_positions(learner_side, mixed) -> None:
    model, processor = learner_side
    record = mixed[list(DATA_TYPES).index("video_audio")]
    prompt = prepare_prompt(record, processor)
    assert prompt.use_audio_in_video and prompt.video is not None and prompt.audio is not None
    features = add_positions(model, encode_prompt(processor, prompt))
    vocab = processor.tokenizer.get_vocab()
    ids = features.input_ids
    time = features.positions[0]
    video, audio = time[ids == vocab["<|VIDEO|>"]], time[ids == vocab["<|AUDIO|>"]]
    # frame pair k sits at k · (seconds per pair) · 25 positions a second; the sound's token j at j
    # (25 a second): both start at the same position, so second s of sound and second s of video meet
    per_pair = int(round(2 / prompt.video_fps * 25))
    pairs = prompt.video.shape[0] // 2
    assert video.min() == audio.min()
    assert sorted(set((video - video.min()).tolist())) == [k * per_pair for k in range(pairs)]
    assert (audio.diff() == 1).all()
    # and the two are interleaved in chunks of 2 s in the token order, not one after the other
    order = [int(t) for t in ids if t in (vocab["<|VIDEO|>"], vocab["<|AUDIO|>"])]
    assert order[0] == vocab["<|VIDEO|>"] and order[-1] == vocab["<|AUDIO|>"]


@pytest.mark.parametrize("share", [False, True], ids=["one-copy", "shared-prompts"])
def test_a_mixed_batch_scores_what_vllm_sampled(sampled, learner_side, mixed, share: bool) -> None:
    results, _ = sampled
    model, processor = learner_side
    tok = processor.tokenizer
    prompts, keys, completions, sampler, types = [], [], [], [], []
    for record, result in zip(mixed, results, strict=True):
        features = add_positions(model, encode_prompt(processor, prepare_prompt(record, processor)))
        for completion in result.completions:
            prompts.append(features)
            keys.append(record.id)
            completions.append(completion.token_ids)
            sampler.append(completion.logprobs)
            types.append(record.data_type)
    common = dict(pad_id=tok.pad_token_id, eos_ids=[tok.convert_tokens_to_ids("<|im_end|>")], forbidden_ids=media_token_ids(tok))
    batch = collate_shared(prompts, keys, completions, **common) if share else collate(prompts, completions, **common)
    if share:
        assert batch.inputs["input_ids"].shape[0] == len(mixed)  # six prompts of six types, each once
        assert batch.inputs["pixel_values_videos"].shape[0] > 0 and batch.inputs["input_features"].shape[0] == 3
    # the engine's sampling distribution, its media-placeholder bias included (omni.sampling)
    sampling: list[torch.Tensor] = []
    with torch.no_grad():
        completion_logprobs(model, batch, distribution=SAMPLING.distribution(media_token_ids(tok)), sampling=sampling)
    learner = sampling[0]
    worst: dict[str, float] = {}
    for row, ref in enumerate(sampler):
        n = int(batch.completion_mask[row].sum())
        gap = float((learner[row, :n] - torch.tensor(ref[:n])).abs().max())
        worst[types[row]] = max(worst.get(types[row], 0.0), gap)
    for kind, gap in worst.items():
        bound = VIDEO_AUDIO_GAP if kind == "video_audio" else ROUNDING
        assert gap < bound, f"{kind}: max |Δ log p| = {gap:.2e} (bound {bound:.0e}); all: {worst}"


def test_an_engine_without_video_refuses_those_records_alone(sampled, mixed) -> None:
    _, refused = sampled
    for record, result in zip(mixed, refused, strict=True):
        if "video" in record.modalities:
            assert not result.ok and "raise media.per_prompt.video" in result.error, result.error
            assert f"record {record.id} ({record.data_type})" in result.error
        else:
            assert result.ok, f"{record.data_type}: {result.error}"


def test_ablations_replace_each_medium_by_its_blank(mixed) -> None:
    from PIL import Image

    from evaluation.evaluate import CONDITIONS, EvalSettings, ablated_media, ablation_applies

    settings = EvalSettings()
    by_type = {r.data_type: r for r in mixed}
    applies = {c: sorted(t for t, r in by_type.items() if ablation_applies(r, c)) for c in CONDITIONS}
    assert applies["video"] == ["video", "video_audio"]
    assert applies["audio"] == ["audio", "image_audio", "video_audio"]
    assert applies["image"] == ["image", "image_audio"]
    assert applies["both"] == sorted(set(DATA_TYPES) - {"text"})
    both = ablated_media(by_type["video_audio"], "both", settings)
    assert set(both) == {"video", "audio"} and not both["audio"].any()
    assert both["video"].dtype == np.uint8 and (both["video"] == 128).all() and both["video"].shape[0] % 2 == 0
    sound_only = ablated_media(by_type["video_audio"], "audio", settings)
    assert not sound_only["audio"].any() and sound_only["video"].std() > 0  # the frames stay, decoded once
    frames_only = ablated_media(by_type["video_audio"], "video", settings)
    assert (frames_only["video"] == 128).all() and np.abs(frames_only["audio"]).max() > 0.1  # the sound stays
    grey = ablated_media(by_type["image"], "image", settings)["image"]
    assert isinstance(grey, Image.Image) and grey.getextrema() == ((128, 128),) * 3
    assert ablated_media(by_type["text"], "both", settings) is None


def test_a_micro_batch_without_media_still_gives_every_tower_a_zero_gradient(learner_side, mixed) -> None:
    """Ranks of one mixed step must reduce gradients of the same parameters (see unused_tower_term):
    the towers' parameters a picture-and-sound prompt trains get a gradient, of zero, from a
    text-only one."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omni.forward import unused_tower_term

    _, processor = learner_side
    tok = processor.tokenizer
    answer = [tok.encode("<answer>A</answer>")]

    def tower_grads(record, with_idle: bool) -> dict[str, torch.Tensor]:
        model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            str(learner_side[0].name_or_path), dtype=torch.float32
        )
        features = add_positions(model, encode_prompt(processor, prepare_prompt(record, processor)))
        batch = collate([features], answer, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id])
        loss = completion_logprobs(model, batch).sum()
        idle = unused_tower_term(model, batch.inputs) if with_idle else None
        if idle is not None:
            assert float(idle) == 0.0
            loss = loss + idle
        loss.backward()
        return {
            name: p.grad
            for name, p in model.named_parameters()
            if name.startswith(("visual.", "audio_tower.")) and p.grad is not None
        }

    by_type = {r.data_type: r for r in mixed}
    trained = tower_grads(by_type["image_audio"], with_idle=False)
    idle = tower_grads(by_type["text"], with_idle=True)
    assert any(n.startswith("visual.") for n in trained) and any(n.startswith("audio_tower.") for n in trained)
    assert set(trained) <= set(idle), sorted(set(trained) - set(idle))[:5]
    assert all(float(g.abs().max()) == 0.0 for g in idle.values()), "the term moved a weight"
    assert tower_grads(by_type["text"], with_idle=False) == {}  # without it: nothing, the mismatch
    both_used = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "pixel_values": torch.zeros(1), "input_features": torch.zeros(1)}
    assert unused_tower_term(learner_side[0], both_used) is None  # nothing idle, nothing added


def test_three_steps_on_all_six_types_train_and_evaluate(ray_local, tiny_checkpoint, mixed_dir, tmp_path) -> None:
    """The whole loop on a mixed set: two learner ranks whose micro-batches hold different types
    (a text-only one beside one with a video), every ablation at the end."""
    from orchestrator.config import load_config
    from orchestrator.trainer import train
    from watch.jsonl import read_metrics

    config = load_config(
        None,
        [
            f"model_path={tiny_checkpoint}",
            f"output_dir={tmp_path / 'run'}",
            f"data.train={mixed_dir / 'train' / 'omni_rl_format_train.json'}",
            f"data.valid={mixed_dir / 'valid' / 'omni_rl_format_valid.json'}",
            "total_steps=3",
            "grpo.group_size=4",
            "grpo.questions_per_step=6",
            "sampling.max_new_tokens=12",
            "media.max_video_frames=4",
            "rollout.max_model_len=1024",
            "rollout.enforce_eager=true",
            "rollout.cpus_per_engine=1",
            "learner.num_ranks=2",
            "learner.zero_stage=2",
            "learner.micro_batch_size=4",  # one question's group: micro-batches of one type each
            "learner.gradient_checkpointing=false",
            "sync.bucket_mb=1",
            "checkpoint.every=0",
            "eval.at_end=true",
            "eval.ablate=[none,audio,image,video,both]",
        ],
    )
    train(config, console=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    # a random checkpoint earns no reward yet (zero advantages, zero gradient): the step itself ran
    # on every rank, through every micro-batch, with finite numbers
    assert all(r["rollout/failed_questions"] == 0 and math.isfinite(r["grad_norm"]) and r["learner/tokens"] > 0 for r in rows), [
        {k: r.get(k) for k in ("rollout/failed_questions", "grad_norm", "learner/tokens")} for r in rows
    ]
    asked = [json.loads(line) for line in (tmp_path / "run" / "questions.jsonl").read_text().splitlines()]
    types = {r.id: r.data_type for r in load_records(mixed_dir / "train" / "omni_rl_format_train.json")}
    assert {types[i] for step in asked for i in step["ids"]} == set(DATA_TYPES), asked
    final = json.loads((tmp_path / "run" / "eval" / "final" / "summary.json").read_text())["conditions"]
    assert sorted(final["none"]["by_type"]) == sorted(DATA_TYPES) and final["none"]["errors"] == 0
    # each condition asks the questions that have its medium: 12 questions, two of each type
    assert {c: final[c]["questions"] for c in final} == {"none": 12, "audio": 6, "image": 4, "video": 4, "both": 10}
    assert all(final[c]["errors"] == 0 for c in final)
