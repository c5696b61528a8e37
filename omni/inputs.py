"""Records → what the model reads: the rendered prompt, the media, and the learner's tensor batch.

The rollout engines and the learner both start from :func:`prepare_prompt`, so the text, pixels and
samples they see are identical; the learner's prompt tokens come from the checkpoint's own
processor, which is also what vLLM runs on the same folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import avqa
from omni.family import all_media_tokens


@dataclass(frozen=True)
class MediaSettings:
    min_pixels: int = avqa.MIN_PIXELS
    max_pixels: int = avqa.MAX_PIXELS
    max_audio_seconds: float = avqa.MAX_AUDIO_SECONDS
    sample_rate: int = avqa.SAMPLE_RATE
    video_fps: float = avqa.VIDEO_FPS
    max_video_frames: int = avqa.MAX_VIDEO_FRAMES
    video_min_pixels: int = avqa.VIDEO_MIN_PIXELS  # per frame
    video_max_pixels: int = avqa.VIDEO_MAX_PIXELS  # per frame


@dataclass
class Prompt:
    """One question as the model sees it: chat text with placeholders and the media it reads.

    A medium is None where the record's data_type has none. ``audio`` of a video_audio record is the
    video's own sound track (``use_audio_in_video``: the processor interleaves its tokens with the
    frames' in time, and both sides compute the positions from that flag).
    """

    record_id: str
    text: str
    image: Image.Image | None = None
    audio: np.ndarray | None = None
    sample_rate: int = avqa.SAMPLE_RATE
    video: np.ndarray | None = None  # uint8 [T, H, W, 3], sampled at video_fps
    video_fps: float = avqa.VIDEO_FPS
    use_audio_in_video: bool = False
    video_pixels: tuple[int, int] = (avqa.VIDEO_MIN_PIXELS, avqa.VIDEO_MAX_PIXELS)

    def processor_kwargs(self) -> dict[str, Any]:
        """The processor arguments beyond the media, the same for vLLM's processor and the learner's.

        The video processor's own defaults would resize frames to at least 128·28² pixels and could
        resample them: the frames were already sampled and sized by `avqa.load_video`, so the same
        limits make its resize the identity, and ``fps`` gives the time axis (seconds per frame pair).
        """
        if self.video is None:
            return {}
        low, high = self.video_pixels
        return {
            "use_audio_in_video": self.use_audio_in_video,
            "fps": self.video_fps,
            "do_sample_frames": False,
            "size": {"shortest_edge": low, "longest_edge": high},
            "cap_pixels_per_frame": False,  # no total-video budget beyond max_video_frames
        }

    def vllm_input(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.image is not None:
            data["image"] = self.image
        if self.video is not None:
            data["video"] = self.video
        if self.audio is not None:
            data["audio"] = (self.audio, self.sample_rate)
        out: dict[str, Any] = {"prompt": self.text}
        if data:
            out["multi_modal_data"] = data
        kwargs = self.processor_kwargs()
        if self.use_audio_in_video:
            # vLLM (0.32) interleaves a video's frames with its sound by the seconds per frame pair
            # given here, and takes 1.0 where none is given (what 2 fps gives): at any other rate
            # its prompt tokens would differ from the processor's. transformers ignores the key.
            kwargs["second_per_grid_ts"] = [avqa.media.TEMPORAL_PATCH / self.video_fps]
        if kwargs:
            out["mm_processor_kwargs"] = kwargs
        return out

    @property
    def media_counts(self) -> dict[str, int]:
        """How many of each medium the prompt holds (what an engine's per-prompt limits must allow)."""
        return {
            "image": int(self.image is not None),
            "video": int(self.video is not None),
            "audio": int(self.audio is not None),
        }


# Placeholders the processor expands into media features: a completion must never contain them
# (the model's forward would look for media that is not there). Every family's spellings: a
# tokenizer holds its own family's, and the others are simply absent from its vocabulary.
MEDIA_TOKENS = all_media_tokens()


def media_token_ids(tokenizer: Any) -> list[int]:
    vocab = tokenizer.get_vocab()
    return sorted({vocab[t] for t in MEDIA_TOKENS if t in vocab})


def load_processor(model_path: str | Path) -> Any:
    """The checkpoint's own processor, from the local folder only (nothing is downloaded)."""
    from transformers import AutoProcessor

    from omni.quiet import quiet_default_talker_warnings

    quiet_default_talker_warnings()
    return AutoProcessor.from_pretrained(str(model_path), local_files_only=True)


def prepare_prompt(
    record: avqa.Record,
    processor: Any,
    *,
    media: MediaSettings = MediaSettings(),
    system_prompt: str | None = None,
    image: Image.Image | None = None,
    audio: np.ndarray | None = None,
    video: np.ndarray | None = None,
) -> Prompt:
    """Load (or take) the media the record's data_type reads, with the run's limits, and render the
    chat text. ``image`` / ``audio`` / ``video`` replace a medium the record has (ablations); for a
    video_audio record ``audio`` replaces the video's sound track."""
    reads = record.modalities
    for name, given in (("image", image), ("audio", audio), ("video", video)):
        if given is not None and name not in reads:
            raise ValueError(f"record {record.id!r} ({record.data_type}) has no {name} to replace")
    if "image" in reads:
        if image is None:
            image = avqa.load_image(record.image_path, min_pixels=media.min_pixels, max_pixels=media.max_pixels)
        else:
            image = avqa.prepare_image(image, min_pixels=media.min_pixels, max_pixels=media.max_pixels)
    if "video" in reads:
        limits = dict(min_pixels=media.video_min_pixels, max_pixels=media.video_max_pixels)
        needs_track = record.data_type == "video_audio" and audio is None
        if video is None or needs_track:
            clip = avqa.load_video(
                record.video_path,
                fps=media.video_fps,
                max_frames=media.max_video_frames,
                with_audio=needs_track,
                sample_rate=media.sample_rate,
                max_audio_seconds=media.max_audio_seconds,
                **limits,
            )
            if needs_track:
                audio = clip.audio
            if video is None:
                video = clip.frames
        else:
            video = avqa.prepare_video(video, media.video_fps, **limits).frames
    elif "audio" in reads and audio is None:
        audio = avqa.load_audio(record.audio_path, sample_rate=media.sample_rate, max_seconds=media.max_audio_seconds)
    messages = avqa.build_messages(record, image=image, audio=audio, video=video, system_prompt=system_prompt)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return Prompt(
        record.id,
        text,
        image=image,
        audio=None if audio is None else np.asarray(audio, dtype=np.float32),
        sample_rate=media.sample_rate,
        video=video,
        video_fps=media.video_fps,
        use_audio_in_video=record.data_type == "video_audio",
        video_pixels=(media.video_min_pixels, media.video_max_pixels),
    )


# What the thinker's forward takes for each medium (None where a prompt has none of it)
IMAGE_KEYS = ("pixel_values", "image_grid_thw")
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")
AUDIO_KEYS = ("input_features", "feature_attention_mask")


@dataclass
class PromptFeatures:
    """The processor's output for one prompt, and its multimodal rotary positions."""

    input_ids: torch.Tensor  # [P]
    pixel_values: torch.Tensor | None = None  # [patches, dim]
    image_grid_thw: torch.Tensor | None = None  # [1, 3]
    input_features: torch.Tensor | None = None  # [1, mel, frames]
    feature_attention_mask: torch.Tensor | None = None  # [1, frames]
    pixel_values_videos: torch.Tensor | None = None  # [patches, dim]
    video_grid_thw: torch.Tensor | None = None  # [1, 3]
    video_second_per_grid: torch.Tensor | None = None  # [1]
    use_audio_in_video: bool = False
    # [3, P]: set by add_positions. Each prompt gets its own: one batch may mix prompts with and
    # without use_audio_in_video, which the thinker's batch-wide rope index cannot express
    positions: torch.Tensor | None = None


def encode_prompt(processor: Any, prompt: Prompt) -> PromptFeatures:
    out = processor(
        text=[prompt.text],
        images=None if prompt.image is None else [prompt.image],
        videos=None if prompt.video is None else [prompt.video],
        audio=None if prompt.audio is None else [prompt.audio],
        return_tensors="pt",
        padding=False,
        **prompt.processor_kwargs(),
    )
    second = out.get("video_second_per_grid")
    return PromptFeatures(
        input_ids=out["input_ids"][0],
        pixel_values=out.get("pixel_values"),
        image_grid_thw=out.get("image_grid_thw"),
        input_features=out.get("input_features"),
        feature_attention_mask=out.get("feature_attention_mask"),
        pixel_values_videos=out.get("pixel_values_videos"),
        video_grid_thw=out.get("video_grid_thw"),
        video_second_per_grid=None if second is None else torch.as_tensor(second, dtype=torch.float32).reshape(-1),
        use_audio_in_video=prompt.use_audio_in_video,
    )


def add_positions(thinker: Any, features: PromptFeatures) -> PromptFeatures:
    """Set ``features.positions`` from the thinker's own rope index for this one prompt (its config
    decides the time scale; no weights are read, so a ZeRO-3 partitioned thinker works)."""
    ids = features.input_ids.unsqueeze(0)
    audio_lengths = None if features.feature_attention_mask is None else features.feature_attention_mask.sum(dim=1)
    positions, _ = thinker.get_rope_index(
        ids,
        features.image_grid_thw,
        features.video_grid_thw,
        torch.ones_like(ids),
        features.use_audio_in_video,
        audio_lengths,
        features.video_second_per_grid,
    )
    features.positions = positions[:, 0, :].to(torch.long)
    return features


def completion_mask(completion_ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """1 up to and including the first end-of-turn token, 0 after it."""
    eos = set(eos_ids)
    mask = []
    ended = False
    for token in completion_ids:
        mask.append(0 if ended else 1)
        if token in eos:
            ended = True
    return mask


@dataclass
class ModelBatch:
    """Prompt + completion sequences: prompts left-padded, completions right-padded, so every
    completion starts at the same column and its log-probs come from the last ``C + 1`` positions."""

    inputs: dict[str, torch.Tensor]  # what the thinker's forward takes, position_ids included
    completion_ids: torch.Tensor  # [B, C]
    completion_mask: torch.Tensor  # [B, C], float
    # shared prompts (collate_shared): ``inputs`` holds each distinct prompt once, row r of the
    # completions continues prompt ``prompt_rows[r]``
    prompt_rows: torch.Tensor | None = None  # [B] long

    @property
    def completion_len(self) -> int:
        return self.completion_ids.shape[1]

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> ModelBatch:
        def move(t: torch.Tensor) -> torch.Tensor:
            if float_dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=float_dtype)
            return t.to(device)

        return ModelBatch(
            {k: move(v) for k, v in self.inputs.items()},
            self.completion_ids.to(device),
            self.completion_mask.to(device),
            None if self.prompt_rows is None else self.prompt_rows.to(device),
        )

    @property
    def input_tokens(self) -> torch.Tensor:
        """Tokens each completion row costs the forward, [B]: a shared prompt is split over its rows."""
        attended = self.inputs["attention_mask"].sum(dim=1).float()
        if self.prompt_rows is None:
            return attended
        sharing = torch.bincount(self.prompt_rows, minlength=attended.numel()).float()
        return (attended / sharing)[self.prompt_rows] + self.completion_mask.sum(dim=1)


def collate(
    prompts: Sequence[PromptFeatures],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    forbidden_ids: Sequence[int] = (),
) -> ModelBatch:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        raise ValueError("empty batch")
    prompt_ids, prompt_attention, prompt_positions = _pad_prompts(prompts, pad_id)
    comp_ids, comp_mask = _pad_completions(completions, pad_id, eos_ids, forbidden_ids)
    # tokens after the first end-of-turn are not attended either: they are not part of the turn
    inputs = {
        "input_ids": torch.cat([prompt_ids, comp_ids], dim=1),
        "attention_mask": torch.cat([prompt_attention, comp_mask.long()], dim=1),
        "position_ids": torch.cat([prompt_positions, continuation_positions(prompts, comp_ids.shape[1])], dim=2),
        **_media_inputs(prompts),
    }
    return ModelBatch(inputs, comp_ids, comp_mask)


def collate_shared(
    prompts: Sequence[PromptFeatures],
    keys: Sequence[str],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    forbidden_ids: Sequence[int] = (),
) -> ModelBatch:
    """Like :func:`collate`, but rows with the same prompt ``key`` share one copy of it.

    GRPO scores G completions per question: run as G full sequences, the prompt (and its image and
    audio encoders) is computed G times. Here each distinct prompt runs once, left-padded, and the
    completions continue from its keys and values (:func:`completion_logprobs`).
    """
    if not (len(prompts) == len(keys) == len(completions)):
        raise ValueError(f"{len(prompts)} prompts, {len(keys)} keys, {len(completions)} completions")
    if not prompts:
        raise ValueError("empty batch")
    index: dict[str, int] = {}
    unique: list[PromptFeatures] = []
    for key, prompt in zip(keys, prompts, strict=True):
        if key not in index:
            index[key] = len(unique)
            unique.append(prompt)
    prompt_ids, prompt_attention, prompt_positions = _pad_prompts(unique, pad_id)
    comp_ids, comp_mask = _pad_completions(completions, pad_id, eos_ids, forbidden_ids)
    inputs = {
        "input_ids": prompt_ids,
        "attention_mask": prompt_attention,
        "position_ids": prompt_positions,
        **_media_inputs(unique),
    }
    rows = torch.tensor([index[key] for key in keys], dtype=torch.long)
    return ModelBatch(inputs, comp_ids, comp_mask, rows)


def _pad_prompts(prompts: Sequence[PromptFeatures], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids, their attention mask [N, P] and positions [3, N, P]: every prompt
    ends in the last column. Padding gets position 1, as the thinker's own rope index gives it."""
    missing = [i for i, p in enumerate(prompts) if p.positions is None]
    if missing:
        raise ValueError(f"prompt features {missing} have no positions: call omni.inputs.add_positions(thinker, features)")
    p_max = max(p.input_ids.numel() for p in prompts)
    ids = torch.full((len(prompts), p_max), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), p_max), dtype=torch.long)
    positions = torch.ones((3, len(prompts), p_max), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        p = prompt.input_ids.numel()
        ids[row, p_max - p :] = prompt.input_ids
        attention[row, p_max - p :] = 1
        positions[:, row, p_max - p :] = prompt.positions
    return ids, attention, positions


def continuation_positions(prompts: Sequence[PromptFeatures], length: int) -> torch.Tensor:
    """[3, N, length]: text after prompt n sits 1, 2, … past its largest position on all three axes
    (what the thinker's generation does with its rope deltas, and so what vLLM sampled with)."""
    start = torch.stack([p.positions.max() for p in prompts]) + 1  # type: ignore[union-attr]
    steps = torch.arange(length, dtype=torch.long)
    return (start[:, None] + steps[None, :]).unsqueeze(0).expand(3, -1, -1).contiguous()


def _pad_completions(
    completions: Sequence[Sequence[int]], pad_id: int, eos_ids: Sequence[int], forbidden_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids and their float mask (1 through the first end-of-turn), [B, C]."""
    c_max = max(1, max(len(c) for c in completions))
    ids = torch.full((len(completions), c_max), pad_id, dtype=torch.long)
    mask = torch.zeros((len(completions), c_max), dtype=torch.float32)
    for row, completion in enumerate(completions):
        if not completion:
            continue
        bad = set(completion).intersection(forbidden_ids)
        if bad:
            raise ValueError(f"completion {row} contains media placeholder token(s) {sorted(bad)}")
        ids[row, : len(completion)] = torch.as_tensor(list(completion), dtype=torch.long)
        mask[row, : len(completion)] = torch.as_tensor(completion_mask(completion, eos_ids), dtype=torch.float32)
    return ids, mask


def _media_inputs(prompts: Sequence[PromptFeatures]) -> dict[str, torch.Tensor]:
    """The prompts' image, video and audio tensors, concatenated in row order (the thinker scatters
    each medium's features into its placeholders in that order); a medium no prompt has is left out."""
    out: dict[str, torch.Tensor] = {}
    for key in (*IMAGE_KEYS, *VIDEO_KEYS, *AUDIO_KEYS):
        parts = [getattr(p, key) for p in prompts if getattr(p, key) is not None]
        if key in AUDIO_KEYS:
            parts = _pad_frames(parts)
        if parts:
            out[key] = torch.cat(parts, dim=0)
    return out


def _pad_frames(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Audio features (or their masks) padded with zeros to the longest clip's frames: Qwen2.5-Omni's
    processor pads every clip to 30 s already, Qwen3-Omni's to the longest of one call only. The
    mask's zeros keep the padding out of the tower (both thinkers select frames by the mask)."""
    frames = max((t.shape[-1] for t in parts), default=0)
    return [t if t.shape[-1] == frames else torch.nn.functional.pad(t, (0, frames - t.shape[-1])) for t in parts]
