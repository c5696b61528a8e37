"""Build a tiny random-weight Qwen2.5-Omni checkpoint that transformers and vLLM both load.

The folder mirrors the layout of the released checkpoint (full ``qwen2_5_omni`` config,
``thinker.``-prefixed weights, Qwen2 byte-level BPE tokenizer, Whisper feature extractor,
Qwen2-VL image/video processors, chat template) at a size that runs on a CPU in seconds.
Nothing is downloaded: the tokenizer is trained on an in-code corpus.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

import avqa
from omni.names import LM_HEAD
from omni.quiet import quiet_default_talker_warnings

__all__ = ["LAYOUTS", "SPECIAL_TOKENS", "TAG_TOKENS", "TinySizes", "build_tiny_checkpoint"]

HEAD_DIM = 64  # the only text head size the vLLM CPU attention kernel is known to accept here
SAMPLING_RATE = avqa.SAMPLE_RATE
NUM_MEL_BINS = 128
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = avqa.MIN_PIXELS  # the processor's own limits: the task's (one place for them)
MAX_PIXELS = avqa.MAX_PIXELS
BASE_VOCAB_TARGET = 2048
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# (content, special) in the released tokenizer's order, then the Qwen2-VL spellings that
# vLLM's placeholder strings use. `special=False` tokens survive `skip_special_tokens`.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|AUDIO|>", True),
    ("<|audio_bos|>", True),
    ("<|audio_eos|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_bos|>", True),
    ("<|vision_eos|>", True),
    ("<|vision_pad|>", True),
    ("<|IMAGE|>", True),
    ("<|VIDEO|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
)
# Reasoning/answer tags: plain added tokens, so decoded completions keep them for rewards.
TAG_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")

# Named tokens the Qwen2.5-Omni processor reads from the tokenizer (transformers 5 style).
_PROCESSOR_TOKENS: dict[str, str] = {
    "image_token": "<|IMAGE|>",
    "audio_token": "<|AUDIO|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
_EOS = "<|im_end|>"
_PAD = "<|endoftext|>"
# Words that must be one token each: `user_token_id` names one, the rest keep prompts short.
_SINGLE_TOKEN_WORDS: tuple[str, ...] = ("user", "assistant", "system")

# Behaves like the released Qwen2.5-Omni template (default system turn, optional
# "Picture n:"/"Audio n:"/"Video n:" labels, media placeholders, generation prompt).
# No "-" whitespace control and no newline right after a block tag: transformers renders with
# trim_blocks, and the role/turn newlines below are part of the prompt.
CHAT_TEMPLATE = (
    "{% set counts = namespace(image=0, audio=0, video=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set counts.image = counts.image + 1 %}"
    "{% if add_vision_id %}Picture {{ counts.image }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}"
    "{% set counts.audio = counts.audio + 1 %}"
    "{% if add_audio_id %}Audio {{ counts.audio }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set counts.video = counts.video + 1 %}"
    "{% if add_vision_id %}Video {{ counts.video }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


@dataclass(frozen=True)
class TinySizes:
    """Layer sizes of a random Qwen2.5-Omni thinker. The tiny default keeps every text attention
    head 64 wide (what vLLM's CPU kernels take); larger layouts set their own head size."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    intermediate_size: int = 256
    vision_depth: int = 1
    vision_hidden: int = 64
    vision_heads: int = 1
    vision_intermediate: int = 128
    audio_layers: int = 1
    audio_d_model: int = 64
    audio_heads: int = 1
    audio_ffn: int = 128
    head_dim: int = HEAD_DIM
    vocab_size: int | None = None  # None: exactly the tokenizer's size; larger pads the tokenizer
    # One matrix for the input embeddings and the LM head. Written at every level of the config:
    # transformers ties from the thinker config's flag, vLLM 0.32 from the top-level one.
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _require(
            self.hidden_size == self.head_dim * self.num_attention_heads,
            f"hidden_size must be heads × head_dim ({self.head_dim})",
        )
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "heads must be a multiple of kv heads",
        )
        _require(self.vision_hidden % self.vision_heads == 0, "vision_hidden must split into heads")
        _require(
            (self.vision_hidden // self.vision_heads) % 4 == 0,
            "vision head size must be a multiple of 4",
        )
        _require(self.audio_d_model % self.audio_heads == 0, "audio_d_model must split into heads")
        _require(self.audio_d_model % 2 == 0, "audio_d_model must be even (sinusoidal positions)")
        _require(
            min(self.num_hidden_layers, self.vision_depth, self.audio_layers) >= 1,
            "need >= 1 layer each",
        )

    @property
    def mrope_section(self) -> list[int]:
        """Temporal/height/width rotary split; sums to head_dim / 2 like the 7B's [16, 24, 24]."""
        half = self.head_dim // 2
        temporal = half // 4
        spatial = (half - temporal) // 2
        return [temporal, spatial, half - temporal - spatial]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"TinySizes: {message}")


# Named layouts. "7b" is the released Qwen2.5-Omni-7B thinker (ENVIRONMENT.md); "3b" the released
# Qwen2.5-Omni-3B thinker (sources next to it); "2b" a ~1.5B language model with smaller towers
# (one-GPU learner benchmarks); "small" a GPU smoke test.
LAYOUTS: dict[str, TinySizes] = {
    "tiny": TinySizes(),
    "small": TinySizes(
        hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=1536, vision_depth=2, vision_hidden=256, vision_heads=4, vision_intermediate=512,
        audio_layers=2, audio_d_model=256, audio_heads=4, audio_ffn=1024,
    ),
    "2b": TinySizes(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=8960, vision_depth=16, vision_hidden=1024, vision_heads=16,
        vision_intermediate=2816, audio_layers=16, audio_d_model=1024, audio_heads=16, audio_ffn=4096,
        head_dim=128, vocab_size=151936,
    ),
    # Qwen2.5-Omni-3B thinker. Text model: hidden 2048, 36 layers, 16 heads, 2 KV heads (head 128),
    # intermediate 11008, vocab 151936 (issue 14; the same numbers in the Qwen2.5-3B language model
    # of Qwen2.5-VL-3B's config). Audio tower: d_model 1280, 32 layers, 20 heads, ffn 5120, 128 mel
    # bins, output 2048; text hidden 2048 and intermediate 11008 again: a thinker config in this
    # layout, https://huggingface.co/OpenMOSS-Team/RoboOmni-LIBERO-Object/blob/main/config.json
    # (architecture Qwen2_5OmniThinkerForConditionalGeneration). Vision tower: depth 32, hidden 1280,
    # 16 heads, patch 14, output 2048: https://blog.gitcode.com/37757bc995fb5e4b2f2b185522175a18.html
    # (a walk through the 3B); intermediate 3420 as in every Qwen2.5-VL tower (the 7B's here,
    # ENVIRONMENT.md; Qwen2.5-VL-3B's config).
    # Parameters (Qwen2_5OmniThinkerForConditionalGeneration on the meta device): 4,703,464,448 =
    # text 3,085,938,688 (Qwen2.5-3B's 3.09B) + head 311,164,928 + vision 668,684,288 + audio
    # 637,676,544; with a tied head 4,392,299,520.
    # Head untied, by that count: the 3B thinker extracted alone,
    # https://huggingface.co/ytaek-oh/Qwen2.5-Omni-3B-Thinker, shows "5B params", and only the
    # untied count rounds to 5B (the 7B thinker extracted alone,
    # https://huggingface.co/Tevatron/Qwen2.5-Omni-7B-Thinker, shows 9B; the 7b layout counts
    # 8,931,813,888). No copy of the released config.json was found to read tie_word_embeddings
    # from; a tied head is pushed correctly too (omni/names.py, tests/test_omni_handoff_cpu.py).
    "3b": TinySizes(
        hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
        intermediate_size=11008, vision_depth=32, vision_hidden=1280, vision_heads=16,
        vision_intermediate=3420, audio_layers=32, audio_d_model=1280, audio_heads=20, audio_ffn=5120,
        head_dim=128, vocab_size=151936,
    ),
    "7b": TinySizes(
        hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vision_depth=32, vision_hidden=1280, vision_heads=16,
        vision_intermediate=3420, audio_layers=32, audio_d_model=1280, audio_heads=20, audio_ffn=5120,
        head_dim=128, vocab_size=152064,
    ),
}


def build_tiny_checkpoint(
    out_dir: str | Path, *, seed: int = 0, sizes: TinySizes = TinySizes(), weights: bool = True
) -> Path:
    """Write the checkpoint into ``out_dir`` (created if needed) and return its path.

    The same ``seed`` gives byte-identical weights; the tokenizer and configs do not depend on it.
    ``weights=False`` writes the folder without weights, for vLLM's ``load_format="dummy"`` and the
    learner's random initialisation (large layouts on GPUs).
    """
    quiet_default_talker_warnings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _save_processor(out, pad_to=sizes.vocab_size)
    ids = _token_ids(tokenizer)
    config = _omni_config(sizes, ids, vocab_size=len(tokenizer))
    config.save_pretrained(out)
    _save_generation_config(out, ids)
    if weights:
        _save_weights(out, config.thinker_config, seed, tied=sizes.tie_word_embeddings)
    return out


# --------------------------------------------------------------------------- tokenizer


def _words(text: str) -> list[str]:
    return text.split()


_COLOURS = _words(
    "red orange yellow green blue purple pink brown black white grey gray gold silver beige cyan"
)
_SHAPES = _words(
    "circle square triangle rectangle star heart oval diamond hexagon pentagon cube sphere cone "
    "cylinder pyramid line dot arrow cross ring spiral wave grid"
)
_SOUNDS = _words(
    "bark meow chirp whistle bell drum piano guitar violin flute trumpet siren horn clap knock rain "
    "thunder wind voice speech music song laugh cough sneeze engine car train plane bird dog cat cow "
    "sheep horse duck frog water ocean river fire alarm phone clock door footsteps applause crowd baby "
    "buzz hum beep ring"
)
_WORDS = _words(
    "the a an of and or in on at to for with from by is are was were be been has have had do does did "
    "what which who where when how why this that these those it its there here not no yes all any some "
    "image picture photo audio sound clip video frame scene question answer option options correct "
    "wrong true false left right top bottom middle center front back inside outside above below near "
    "far large small big tiny long short tall many few more less most least one two three four five "
    "six seven eight nine ten zero hundred first second third last next color colour shape object "
    "animal person people man woman child loud quiet soft high low fast slow bright dark number count "
    "listen look hear see watch describe choose select pick best both visual information reasoning "
    "evidence consider carefully deeply user assistant system you your we they he she helpful think "
    "thinking answer final between tags provide give then before after during while because so if as "
    "were human pondering please make sure answering based only following given shown heard played "
    "playing appears appear seems likely probably kitchen street park room forest beach city farm "
    "stage school office table chair window tree flower sky"
)


def _corpus() -> Iterator[str]:
    """English text covering the task prompt, options, colours, shapes, sounds and digits."""
    yield (
        "Please think about this question as if you were a human pondering deeply. "
        "Make sure to carefully consider both the visual and audio information before answering. "
        "Provide your reasoning between the <think> </think> tags, and then give your final answer "
        "between the <answer> </answer> tags. Options: A. B. C. D."
    )
    vocabulary = _COLOURS + _SHAPES + _SOUNDS + _WORDS
    yield " ".join(vocabulary)
    yield "\n".join(vocabulary)
    yield " ".join(word.capitalize() for word in vocabulary)
    for i, colour in enumerate(_COLOURS * 3):
        shape = _SHAPES[i % len(_SHAPES)]
        sound = _SOUNDS[(3 * i) % len(_SOUNDS)]
        letter = "ABCD"[i % 4]
        yield (
            f"Question {i}: Which {shape} is {colour}? Is the sound a {sound}? "
            f"Options: A. {colour} B. {shape} C. {sound} D. none. The answer is {letter}. "
            f"There are {i} {shape}s and {i + 1} {colour} things; the {sound} is {10 * i}% louder."
        )
    yield " ".join(str(n) for n in range(1000))
    yield "user\nassistant\nsystem\n" * 8


def _train_base_tokenizer() -> Tokenizer:
    """Byte-level BPE with Qwen2's normaliser, split regex and decoder, trained deterministically.

    transformers rebuilds `Qwen2Tokenizer`'s pipeline from vocab + merges on load, so training
    must use that very pipeline or ids would change between here and the loaded tokenizer.
    """
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_TARGET,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    added = [
        AddedToken(text, special=special, normalized=False) for text, special in SPECIAL_TOKENS
    ]
    added += [AddedToken(text, special=False, normalized=False) for text in TAG_TOKENS]
    tokenizer.add_tokens(added)
    return tokenizer


def _tokenizer_config() -> dict[str, Any]:
    """Loader settings for `Qwen2Tokenizer`, incl. the named media tokens the processor reads."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": _EOS,
        "pad_token": _PAD,
        "unk_token": None,
        "extra_special_tokens": dict(_PROCESSOR_TOKENS),
        "errors": "replace",
        "model_max_length": 32768,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }


def _write_tokenizer_files(base: Tokenizer, out: Path) -> None:
    """tokenizer.json from the `tokenizers` library plus a clean tokenizer_config.json."""
    base.save(str(out / "tokenizer.json"))
    config = {**_tokenizer_config(), "processor_class": "Qwen2_5OmniProcessor"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of every special/tag token and of the single-token role words, checked to be single ids."""
    ids: dict[str, int] = {}
    for text in [t for t, _ in SPECIAL_TOKENS] + list(TAG_TOKENS) + list(_SINGLE_TOKEN_WORDS):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise RuntimeError(f"tiny tokenizer splits {text!r} into {encoded}")
        ids[text] = encoded[0]
    return ids


# --------------------------------------------------------------------------- processor


def _pad_vocabulary(base: Tokenizer, size: int) -> Tokenizer:
    """Grow the vocabulary to ``size``: filler tokens no merge produces take the ids after the
    trained ones, and the added (special) tokens move to the very end, so every id a large-
    vocabulary model can sample decodes and transformers rebuilds the same ids on load."""
    data = json.loads(base.to_str())
    vocab = data["model"]["vocab"]
    added = sorted(data["added_tokens"], key=lambda t: t["id"])
    first_added = size - len(added)
    for token_id in range(len(vocab), first_added):
        vocab[f"<f{token_id}>"] = token_id
    for offset, token in enumerate(added):
        token["id"] = first_added + offset
    return Tokenizer.from_str(json.dumps(data))


def _save_processor(out: Path, pad_to: int | None = None) -> Any:
    """Save tokenizer, feature extractor, image/video processors and chat template; return the tokenizer.

    Loading goes through transformers' own loaders so the saved files are exactly what
    `AutoProcessor` (and vLLM, which uses it) will read back.
    """
    from transformers import AutoTokenizer, Qwen2_5OmniProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    base = _train_base_tokenizer()
    if pad_to is not None and pad_to > base.get_vocab_size():
        base = _pad_vocabulary(base, pad_to)
    _write_tokenizer_files(base, out)
    pixels = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    vision = {
        "patch_size": PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(size=dict(pixels), **vision),
        video_processor=Qwen2VLVideoProcessor(size=dict(pixels), **vision),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=NUM_MEL_BINS,
            sampling_rate=SAMPLING_RATE,
            hop_length=160,
            chunk_length=30,
            n_fft=400,
            padding_value=0.0,
            return_attention_mask=True,
        ),
        tokenizer=AutoTokenizer.from_pretrained(out),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)  # processor_config.json (nested, v5 style) + chat_template.jinja
    _write_tokenizer_files(base, out)  # save_pretrained rewrote them with loader-only keys
    _write_legacy_processor_files(processor, out)
    return processor.tokenizer


def _write_legacy_processor_files(processor: Any, out: Path) -> None:
    """Pre-v5 single-component files (like the released checkpoint), from the same objects."""
    legacy = {
        **processor.feature_extractor.to_dict(),
        **processor.image_processor.to_dict(),
        "processor_class": "Qwen2_5OmniProcessor",
    }
    video = processor.video_processor.to_dict()
    for name, data in (
        ("preprocessor_config.json", legacy),
        ("video_preprocessor_config.json", video),
    ):
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- configs


def _text_config(sizes: TinySizes, ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": sizes.hidden_size,
        "intermediate_size": sizes.intermediate_size,
        "num_hidden_layers": sizes.num_hidden_layers,
        "num_attention_heads": sizes.num_attention_heads,
        "num_key_value_heads": sizes.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": sizes.mrope_section,
        },
        "use_sliding_window": False,
        "tie_word_embeddings": sizes.tie_word_embeddings,
        "bos_token_id": ids[_PAD],
        "eos_token_id": ids[_EOS],
        "pad_token_id": ids[_PAD],
    }


def _vision_config(sizes: TinySizes) -> dict[str, Any]:
    return {
        "depth": sizes.vision_depth,
        "hidden_size": sizes.vision_hidden,
        "num_heads": sizes.vision_heads,
        "intermediate_size": sizes.vision_intermediate,
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "window_size": 112,
        # Like the 7B, the last block attends over the full image; earlier ones use windows.
        "fullatt_block_indexes": [sizes.vision_depth - 1],
        "out_hidden_size": sizes.hidden_size,
    }


def _audio_config(sizes: TinySizes) -> dict[str, Any]:
    return {
        "num_mel_bins": NUM_MEL_BINS,
        "encoder_layers": sizes.audio_layers,
        "encoder_attention_heads": sizes.audio_heads,
        "encoder_ffn_dim": sizes.audio_ffn,
        "d_model": sizes.audio_d_model,
        "max_source_positions": 1500,  # 30 s of 10 ms mel frames after the stride-2 conv
        "n_window": 100,
        "output_dim": sizes.hidden_size,
    }


def _media_ids(ids: dict[str, int]) -> dict[str, int]:
    """Media token ids under the names both the thinker and talker configs use."""
    return {
        "audio_token_index": ids["<|AUDIO|>"],
        "image_token_index": ids["<|IMAGE|>"],
        "video_token_index": ids["<|VIDEO|>"],
        "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"],
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
    }


def _talker_config(sizes: TinySizes, ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    """Never built (`enable_audio_output` is false); small and in range so it parses cleanly."""
    return {
        **_media_ids(ids),
        "vocab_size": vocab_size,  # codec vocab; as large as the thinker's so every id is in range
        "embedding_size": sizes.hidden_size,
        "hidden_size": sizes.head_dim,
        "intermediate_size": 2 * sizes.head_dim,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": sizes.head_dim,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": sizes.mrope_section,
        },
        "tts_codec_pad_token_id": 60,
        "tts_codec_start_token_id": 61,
        "tts_codec_end_token_id": 62,
        "tts_codec_mask_token_id": 63,
        # The tiny tokenizer has no TTS text tokens; point them at padding.
        "tts_text_start_token_id": ids[_PAD],
        "tts_text_end_token_id": ids[_PAD],
        "tts_text_pad_token_id": ids[_PAD],
        "spatial_merge_size": MERGE_SIZE,
    }


def _token2wav_config() -> dict[str, Any]:
    """Never built; shrunk so the JSON stays honest about a tiny model."""
    return {
        "dit_config": {
            "hidden_size": HEAD_DIM,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "head_dim": HEAD_DIM,
            "look_ahead_layers": [0],
            "look_backward_layers": [0],
        },
        "bigvgan_config": {},
    }


def _omni_config(sizes: TinySizes, ids: dict[str, int], vocab_size: int) -> Any:
    """The full ``qwen2_5_omni`` config: vLLM keys on it and loads only the thinker."""
    from transformers import Qwen2_5OmniConfig

    thinker = {
        "text_config": _text_config(sizes, ids, vocab_size),
        "vision_config": _vision_config(sizes),
        "audio_config": _audio_config(sizes),
        **_media_ids(ids),
        "user_token_id": ids["user"],
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
        "initializer_range": 0.02,
        "tie_word_embeddings": sizes.tie_word_embeddings,
        "bos_token_id": ids[_PAD],
        "eos_token_id": ids[_EOS],
        "pad_token_id": ids[_PAD],
    }
    config = Qwen2_5OmniConfig(
        thinker_config=thinker,
        talker_config=_talker_config(sizes, ids, vocab_size),
        token2wav_config=_token2wav_config(),
        enable_audio_output=False,
        # vLLM (0.32) ties its language model's head from this top-level flag, not the thinker's
        tie_word_embeddings=sizes.tie_word_embeddings,
    )
    config.architectures = ["Qwen2_5OmniModel"]
    config.dtype = torch.float32
    return config


def _save_generation_config(out: Path, ids: dict[str, int]) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=ids[_PAD],
        eos_token_id=[ids[_EOS], ids[_PAD]],
        pad_token_id=ids[_PAD],
    ).save_pretrained(out)


# --------------------------------------------------------------------------- weights


def _save_weights(out: Path, thinker_config: Any, seed: int, *, tied: bool = False) -> None:
    """Instantiate the HF thinker under ``seed`` and save its state dict as ``thinker.*`` float32.

    A tied head is left out, as transformers' own save does: its state dict names the shared
    matrix twice, and both loaders rebuild the head from the embeddings.
    """
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config).to(torch.float32)
    tensors = {
        f"thinker.{name}": t.detach().clone().contiguous()
        for name, t in model.state_dict().items()
        if not (tied and name == LM_HEAD)
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
