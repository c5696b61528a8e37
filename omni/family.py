"""Model families: what differs between Qwen2.5-Omni and Qwen3-Omni, in one table.

A run never names its family: it is read from the checkpoint's ``config.json`` (its top-level
``model_type``, or a thinker config's own), so a folder is enough. Everything else in EchoInk goes
through the same calls for both — the processor (`omni.inputs.load_processor`), the thinker's
``get_rope_index`` (the same signature in both families), vLLM's ``thinker.``-prefixed weight names
(`omni.names`), the tied-head rule (`omni.names.head_is_tied`). What a family changes:

- the transformers classes of its thinker and of its full config;
- the architecture vLLM registers it under (the full model's: vLLM reads ``thinker_config``);
- the media placeholders a completion must never hold (their spellings differ);
- whether its language model routes tokens to experts (Qwen3-Omni's thinker is a mixture of
  experts: fused 3-D expert parameters, a router per layer, an optional balance loss,
  `learner.router_aux_loss_coef`, which a dense family refuses);
- the vision tower's extra outputs that must reach the loss on a rank without pictures
  (Qwen3's deepstack mergers, `omni.forward.unused_tower_term`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni.names import field_of


@dataclass(frozen=True)
class ModelFamily:
    name: str  # what `echoink model tiny --family` and the docs call it
    title: str  # how people write it
    model_type: str  # config.json's top-level model_type (the full omni model)
    thinker_model_type: str  # the thinker config's own model_type
    thinker_class: str  # transformers class of the thinker
    config_class: str  # transformers class of the full config
    vllm_architecture: str  # vLLM's registry name for the full config's architectures
    media_tokens: tuple[str, ...]  # placeholders the processor expands; never in a completion
    moe: bool  # the language model's MLPs are experts behind a router

    def thinker_type(self) -> type:
        """The thinker's transformers class (imported on use: no import-time cost)."""
        import transformers

        return getattr(transformers, self.thinker_class)

    def config_type(self) -> type:
        """The full (thinker + talker) config's transformers class."""
        import transformers

        return getattr(transformers, self.config_class)


QWEN2_5_OMNI = ModelFamily(
    name="qwen2_5_omni",
    title="Qwen2.5-Omni",
    model_type="qwen2_5_omni",
    thinker_model_type="qwen2_5_omni_thinker",
    thinker_class="Qwen2_5OmniThinkerForConditionalGeneration",
    config_class="Qwen2_5OmniConfig",
    vllm_architecture="Qwen2_5OmniModel",
    media_tokens=(
        "<|AUDIO|>", "<|IMAGE|>", "<|VIDEO|>", "<|audio_bos|>", "<|audio_eos|>",
        "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
        # Qwen2-VL's spellings are in the same tokenizer (vLLM's placeholder strings)
        "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>",
    ),
    moe=False,
)
QWEN3_OMNI = ModelFamily(
    name="qwen3_omni",
    title="Qwen3-Omni",
    model_type="qwen3_omni_moe",
    thinker_model_type="qwen3_omni_moe_thinker",
    thinker_class="Qwen3OmniMoeThinkerForConditionalGeneration",
    config_class="Qwen3OmniMoeConfig",
    # vLLM 0.32 registers the thinker under the full model's name only
    vllm_architecture="Qwen3OmniMoeForConditionalGeneration",
    media_tokens=(
        "<|audio_pad|>", "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>",
        "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    ),
    moe=True,
)
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (QWEN2_5_OMNI, QWEN3_OMNI)}


def family_of(config: Any) -> ModelFamily:
    """The family of a checkpoint folder, its config.json, a config object or its dict: by the
    top-level ``model_type``, or a thinker config's. Anything else is refused with what is known."""
    source = config
    if isinstance(config, (str, Path)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json to read the model family from")
        config = json.loads(path.read_text())
    model_type = field_of(config, "model_type")
    for family in FAMILIES.values():
        if model_type in (family.model_type, family.thinker_model_type):
            return family
    known = sorted(t for f in FAMILIES.values() for t in (f.model_type, f.thinker_model_type))
    where = f"{source}: " if isinstance(source, (str, Path)) else ""
    raise ValueError(f"{where}model_type {model_type!r} is no model family EchoInk knows ({', '.join(known)})")


def all_media_tokens() -> tuple[str, ...]:
    """Every family's placeholders (a tokenizer holds only its own family's; the rest are absent)."""
    seen: dict[str, None] = {}
    for family in FAMILIES.values():
        seen.update(dict.fromkeys(family.media_tokens))
    return tuple(seen)
