"""The model family: tiny checkpoints, model inputs, parameter names and the weight-sync protocol."""

from omni.inputs import (
    MediaSettings,
    ModelBatch,
    Prompt,
    PromptFeatures,
    collate,
    collate_shared,
    completion_logprobs,
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


def _quiet_default_talker_warnings() -> None:
    """transformers 5 builds a *default* talker config whenever it serialises a Qwen2.5-Omni config
    and then warns that the default's own token ids lie outside the default's 8,448-token vocabulary.
    The warning is about transformers' defaults, not this checkpoint; drop exactly that one."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "integer within the vocabulary (between 0 and 8447)" not in record.getMessage()

    logging.getLogger("transformers.configuration_utils").addFilter(_Filter())


_quiet_default_talker_warnings()
