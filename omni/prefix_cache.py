"""Key/value caches for scoring many completions of one prompt (see omni.inputs.collate_shared).

Both are idempotent, unlike transformers' DynamicCache (which appends): under gradient
checkpointing a layer's forward runs again in the backward pass, and it must see the same keys.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


class PromptRecorder(DynamicCache):
    """The prompt pass: attends to its own tokens only (like an empty cache) and keeps each layer's
    keys and values; a second write (a checkpointed layer's recompute) replaces the first."""

    def __init__(self, config: Any) -> None:
        super().__init__(config=config)
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        self.recorded[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def ordered(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.recorded[i] for i in sorted(self.recorded)]


class ReadOnlyPrefix(DynamicCache):
    """The completion pass: each layer attends to the prompt's keys and values, then its own; nothing
    is stored, so every call (forward or recompute) returns the same."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(ddp_cache_data=prefix)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
