"""The tiny Qwen2.5-Omni checkpoint loads in transformers (vLLM loads it in the rollout tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from omni.fixtures.processor import SPECIAL_TOKENS, TAG_TOKENS
from omni.fixtures.tiny import TinySizes, build_tiny_checkpoint

SAMPLING_RATE = 16_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_omni"), seed=0)


@pytest.fixture(scope="module")
def processor(checkpoint: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint)


def _image() -> Image.Image:
    """A fixed 64x48 RGB picture (width 64, height 48)."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _audio() -> np.ndarray:
    """Two seconds of a 440 Hz tone with a little noise, mono float32 at 16 kHz."""
    t = np.arange(2 * SAMPLING_RATE, dtype=np.float32) / SAMPLING_RATE
    noise = np.random.default_rng(1).standard_normal(t.shape).astype(np.float32)
    return (0.3 * np.sin(2 * np.pi * 440.0 * t) + 0.01 * noise).astype(np.float32)


def _messages(image: Image.Image, audio: np.ndarray) -> list[dict[str, Any]]:
    question = (
        "Please think about this question as if you were a human pondering deeply. "
        "Which shape is red? Options: A. circle B. square C. star D. heart"
    )
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "audio", "audio": audio},
                {"type": "text", "text": question},
            ],
        },
    ]


def _prompt(processor: Any, image: Image.Image, audio: np.ndarray) -> str:
    return processor.apply_chat_template(
        _messages(image, audio), tokenize=False, add_generation_prompt=True
    )


# --------------------------------------------------------------------------- transformers


def test_transformers_forward_with_image_and_audio(checkpoint: Path, processor: Any) -> None:
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    assert isinstance(processor, Qwen2_5OmniProcessor)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(checkpoint).eval()
    assert isinstance(model.config, Qwen2_5OmniThinkerConfig)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    image, audio = _image(), _audio()
    text = _prompt(processor, image, audio)
    assert text.endswith("<|im_start|>assistant\n")
    assert (
        "<|vision_bos|><|IMAGE|><|vision_eos|>" in text
        and "<|audio_bos|><|AUDIO|><|audio_eos|>" in text
    )
    inputs = processor(text=text, images=[image], audio=[audio], return_tensors="pt")

    ids = inputs["input_ids"][0].tolist()
    config = model.config
    # 64x48 is lifted to the 4*28*28 minimum -> 56x56 -> 4x4 patches -> 4 merged tokens.
    assert ids.count(config.image_token_id) == 4
    # 2 s -> 200 mel frames -> 100 after conv stride 2 -> 50 after pooling.
    assert ids.count(config.audio_token_id) == 50

    with torch.no_grad():
        logits = model(**inputs).logits
    vocab_size = config.text_config.vocab_size
    assert vocab_size == len(processor.tokenizer)
    assert logits.shape == (1, len(ids), vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_config_layout(checkpoint: Path, processor: Any) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni"
    assert config["architectures"] == ["Qwen2_5OmniModel"]
    assert config["enable_audio_output"] is False
    thinker = config["thinker_config"]
    text = thinker["text_config"]
    assert thinker["tie_word_embeddings"] is False and text["tie_word_embeddings"] is False
    assert text["hidden_size"] // text["num_attention_heads"] == 64
    assert sum(text["rope_parameters"]["mrope_section"]) == 32
    assert (
        thinker["audio_config"]["num_mel_bins"] == processor.feature_extractor.feature_size == 128
    )

    vocab = processor.tokenizer.get_vocab()
    expected = {
        "audio_token_index": "<|AUDIO|>",
        "image_token_index": "<|IMAGE|>",
        "video_token_index": "<|VIDEO|>",
        "audio_start_token_id": "<|audio_bos|>",
        "audio_end_token_id": "<|audio_eos|>",
        "vision_start_token_id": "<|vision_bos|>",
        "vision_end_token_id": "<|vision_eos|>",
        "user_token_id": "user",
    }
    for key, token in expected.items():
        assert thinker[key] == vocab[token], key
    assert (
        text["eos_token_id"] == vocab["<|im_end|>"]
        and text["pad_token_id"] == vocab["<|endoftext|>"]
    )

    size = processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (4 * 28 * 28, 256 * 28 * 28)

    with safe_open(checkpoint / "model.safetensors", framework="pt") as handle:
        names = list(handle.keys())
    assert names and all(name.startswith("thinker.") for name in names)
    for prefix in (
        "thinker.model.layers.0.",
        "thinker.lm_head.",
        "thinker.audio_tower.",
        "thinker.visual.",
    ):
        assert any(name.startswith(prefix) for name in names), prefix


def test_same_seed_gives_identical_weights(checkpoint: Path, tmp_path: Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    reference = load_file(checkpoint / "model.safetensors")
    same = load_file(again / "model.safetensors")
    different = load_file(other / "model.safetensors")

    assert (again / "model.safetensors").read_bytes() == (
        checkpoint / "model.safetensors"
    ).read_bytes()
    assert reference.keys() == same.keys() == different.keys()
    assert all(torch.equal(reference[name], same[name]) for name in reference)
    assert not torch.equal(reference["thinker.lm_head.weight"], different["thinker.lm_head.weight"])
    for name in ("tokenizer.json", "config.json", "processor_config.json"):
        assert (again / name).read_bytes() == (checkpoint / name).read_bytes(), name


def test_special_tokens_are_single_ids(processor: Any) -> None:
    tokenizer = processor.tokenizer
    tokens = [text for text, _ in SPECIAL_TOKENS] + list(TAG_TOKENS)
    ids = [tokenizer.encode(token, add_special_tokens=False) for token in tokens]
    assert all(len(encoded) == 1 for encoded in ids), dict(zip(tokens, ids, strict=True))
    assert len({encoded[0] for encoded in ids}) == len(tokens)

    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for name in (
        "image_token",
        "audio_token",
        "video_token",
        "vision_bos_token",
        "vision_eos_token",
    ):
        assert getattr(processor, name) in tokens
    # The tags stay in decoded completions (rewards parse them); media tokens do not.
    completion = "<think> red circle </think><answer>A</answer><|im_end|>"
    decoded = tokenizer.decode(
        tokenizer.encode(completion, add_special_tokens=False), skip_special_tokens=True
    )
    assert decoded == "<think> red circle </think><answer>A</answer>"


def test_sizes_are_validated() -> None:
    assert TinySizes().head_dim == 64
    with pytest.raises(ValueError, match="64"):
        TinySizes(hidden_size=96)


# --------------------------------------------------------------------------- tied head, 3B layout


def test_a_tied_checkpoint_stores_one_matrix_and_says_so_everywhere(
    checkpoint: Path, tmp_path: Path
) -> None:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from omni.names import head_is_tied

    tied = build_tiny_checkpoint(tmp_path / "tied", seed=0, sizes=TinySizes(tie_word_embeddings=True))
    config = json.loads((tied / "config.json").read_text())
    # vLLM ties from the top level, transformers from the thinker config: all must say the same
    assert config["tie_word_embeddings"] is True
    assert config["thinker_config"]["tie_word_embeddings"] is True
    assert config["thinker_config"]["text_config"]["tie_word_embeddings"] is True
    names = set(load_file(tied / "model.safetensors"))
    assert "thinker.lm_head.weight" not in names and "thinker.model.embed_tokens.weight" in names
    assert names | {"thinker.lm_head.weight"} == set(load_file(checkpoint / "model.safetensors"))
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(tied), dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert head_is_tied(tied) is True and head_is_tied(checkpoint) is False
    assert json.loads((checkpoint / "config.json").read_text())["tie_word_embeddings"] is False


def test_head_is_tied_refuses_configs_the_two_sides_read_differently() -> None:
    from omni.names import head_is_tied

    thinker = {"tie_word_embeddings": True, "text_config": {"tie_word_embeddings": True}}
    assert head_is_tied({"tie_word_embeddings": True, "thinker_config": thinker}) is True
    assert head_is_tied(thinker) is True  # a thinker config alone: the learner's view
    assert head_is_tied({"text_config": {"tie_word_embeddings": False}}) is False
    with pytest.raises(ValueError, match=r"tie_word_embeddings=False but thinker_config.tie_word_embeddings=True"):
        head_is_tied({"tie_word_embeddings": False, "thinker_config": thinker})
    with pytest.raises(ValueError, match="no tie_word_embeddings"):
        head_is_tied({"thinker_config": {"text_config": {}}})


def test_a_tied_head_is_left_out_of_a_push() -> None:
    from omni.names import without_tied_head

    embed, head, layer = torch.ones(2), torch.ones(2), torch.zeros(1)
    learner = [("model.embed_tokens.weight", embed), ("model.layers.0.w", layer), ("lm_head.weight", head)]
    assert [n for n, _ in without_tied_head(learner, tied=True)] == ["model.embed_tokens.weight", "model.layers.0.w"]
    assert without_tied_head(learner, tied=False) == learner
    engine = [("thinker.lm_head.weight", head), ("module.thinker.model.embed_tokens.weight", embed)]
    assert [n for n, _ in without_tied_head(engine, tied=True)] == ["module.thinker.model.embed_tokens.weight"]
    assert without_tied_head([("model.layers.0.w", layer)], tied=True) == [("model.layers.0.w", layer)]
    with pytest.raises(ValueError, match=r"'lm_head.weight' is pushed without 'model.embed_tokens.weight'"):
        without_tied_head([("thinker.lm_head.weight", head), ("model.layers.0.w", layer)], tied=True)


def test_the_3b_layout_is_the_released_thinker(tmp_path: Path) -> None:
    from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from omni.fixtures.tiny import LAYOUTS

    folder = build_tiny_checkpoint(tmp_path / "3b", sizes=LAYOUTS["3b"], weights=False)
    assert not list(folder.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(folder)
    text = config.thinker_config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (2048, 36, 16)
    assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (2, 11008, 151936)
    assert config.thinker_config.vision_config.out_hidden_size == 2048
    assert config.thinker_config.audio_config.output_dim == 2048
    with torch.device("meta"):
        model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config.thinker_config)
    # the count omni/fixtures/tiny.py's comment gives, untied head included
    assert sum(p.numel() for p in model.parameters()) == 4_703_464_448
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_the_cli_offers_every_layout_of_every_family(tmp_path, capsys) -> None:
    from echoink.cli import MODEL_LAYOUTS, main
    from omni.family import FAMILIES
    from omni.fixtures.tiny import LAYOUTS
    from omni.fixtures.tiny_qwen3 import QWEN3_LAYOUTS

    assert sorted(MODEL_LAYOUTS) == sorted(FAMILIES)
    assert sorted(MODEL_LAYOUTS["qwen2_5_omni"]) == sorted(LAYOUTS)
    assert sorted(MODEL_LAYOUTS["qwen3_omni"]) == sorted(QWEN3_LAYOUTS)
    # a layout of the other family is refused, naming the family's own
    assert main(["model", "tiny", "--family", "qwen3_omni", "--layout", "7b", "--out", str(tmp_path / "x")]) == 2
    assert "not a qwen3_omni layout; its layouts: tiny, 30b-a3b" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
