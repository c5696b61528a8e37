"""A learner rank's model inputs: each experience's prompt prepared as the engines prepare it (the
same media path, `omni.inputs`), encoded once per step and question, with its rotary positions;
the completions padded after it, or continuing one shared prompt pass (`learner.share_prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from learner.types import Experience, LearnerSettings
from omni.inputs import (
    ModelBatch,
    PromptFeatures,
    add_positions,
    collate,
    collate_shared,
    encode_prompt,
    media_token_ids,
    prepare_prompt,
)


class BatchBuilder:
    """Model batches for ``thinker`` (the rank's module: its rotary positions) on ``device``."""

    def __init__(self, processor: Any, thinker: torch.nn.Module, settings: LearnerSettings,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.processor, self.thinker, self.settings, self.device, self.dtype = processor, thinker, settings, device, dtype
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id} - {None})
        self.media_ids = media_token_ids(tokenizer)  # placeholders a completion never holds

    def features(self, experiences: Sequence[Experience], cache: dict[str, PromptFeatures]) -> list[PromptFeatures]:
        """Each experience's encoded prompt; ``cache`` keeps them by question for the step."""
        out = []
        for exp in experiences:
            key = exp.record.id
            if key not in cache:
                prompt = prepare_prompt(
                    exp.record, self.processor, media=self.settings.media, system_prompt=self.settings.system_prompt
                )
                cache[key] = add_positions(self.thinker, encode_prompt(self.processor, prompt))
            out.append(cache[key])
        return out

    def __call__(self, experiences: Sequence[Experience], cache: dict[str, PromptFeatures]) -> ModelBatch:
        prompts = self.features(experiences, cache)
        completions = [e.completion_ids for e in experiences]
        common = dict(pad_id=self.pad_id, eos_ids=self.eos_ids, forbidden_ids=self.media_ids)
        if self.settings.share_prompts:
            batch = collate_shared(prompts, [e.record.id for e in experiences], completions, **common)
        else:
            batch = collate(prompts, completions, **common)
        batch = batch.to(self.device, float_dtype=self.dtype)
        batch.completion_mask = batch.completion_mask.float()
        return batch
