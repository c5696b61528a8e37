"""The model family: model inputs, the learner's forward, parameter names and the weight-sync protocol
(tiny random checkpoints and fault injection for tests: `omni.fixtures`)."""

from omni.forward import completion_logprobs
from omni.inputs import (
    MediaSettings,
    ModelBatch,
    Prompt,
    PromptFeatures,
    add_positions,
    collate,
    collate_shared,
    completion_mask,
    encode_prompt,
    load_processor,
    prepare_prompt,
)
from omni.names import THINKER_PREFIX, to_learner_name, to_vllm_name

__all__ = [
    "THINKER_PREFIX",
    "MediaSettings",
    "ModelBatch",
    "Prompt",
    "PromptFeatures",
    "add_positions",
    "collate",
    "collate_shared",
    "completion_logprobs",
    "completion_mask",
    "encode_prompt",
    "load_processor",
    "prepare_prompt",
    "to_learner_name",
    "to_vllm_name",
]

