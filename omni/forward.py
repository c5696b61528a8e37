"""The learner's forward: log-probs (and entropy) of completion tokens, with each prompt run once
for its completions (the shared-prefix forward), and the zero-weighted pass through idle towers.

The batches come from `omni.inputs` (`collate`, `collate_shared`); the two key/value caches here
are idempotent, unlike transformers' DynamicCache (which appends): under gradient checkpointing a
layer's forward runs again in the backward pass, and it must see the same keys.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from omni.head import head_logprobs, usable
from omni.inputs import ModelBatch
from omni.sampling import SamplingDistribution, sampling_token_logprobs, tempered_logits


def unused_tower_term(thinker: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """0 × a minimal pass through each encoder tower that ``inputs`` leave unused, or None.

    In a mixed batch one rank's micro-batch may hold no picture or video (the vision tower idles)
    or no sound (the audio tower idles) while another rank's does: their gradient reductions then
    cover different parameters, and the collective fails (gloo: "Received data size doesn't match
    expected size"). Added to the loss, this term gives every tower a gradient on every rank —
    exactly zero, so the update is unchanged. Every output a tower gives the language model counts
    (Qwen3-Omni's vision tower also gives one per deepstack level, from mergers of their own).
    """
    parts = []
    weight = next(thinker.parameters())
    like = dict(device=inputs["input_ids"].device, dtype=weight.dtype if weight.is_floating_point() else torch.float32)
    if "pixel_values" not in inputs and "pixel_values_videos" not in inputs:
        vc = thinker.config.vision_config
        merge = int(vc.spatial_merge_size)
        pixels = torch.zeros(merge * merge, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, **like)
        grid = torch.tensor([[1, merge, merge]], device=like["device"])  # one merged token's patches
        out = thinker.get_image_features(pixels, grid, return_dict=True)
        parts.append(sum(o.sum() for o in out.pooler_output))
        # Qwen3-Omni's deepstack mergers feed the language model from inner vision blocks
        for level in getattr(out, "deepstack_features", None) or ():
            parts.append(sum(o.sum() for o in level))
    if "input_features" not in inputs:
        frames = 2 * int(thinker.config.audio_config.n_window)  # one window of the audio tower
        features = torch.zeros(1, thinker.config.audio_config.num_mel_bins, frames, **like)
        mask = torch.ones(1, frames, dtype=torch.long, device=like["device"])
        parts.append(thinker.get_audio_features(features, mask, return_dict=True).last_hidden_state.sum())
    if not parts:
        return None
    return 0.0 * sum(parts).float()


class keep_last_positions:
    """Within this context the model's ``lm_head`` sees only the last ``k`` positions.

    The full-vocabulary logits of the prompt are never needed (only completion tokens are scored)
    and are the largest tensor of a step for a 152k vocabulary.
    """

    def __init__(self, lm_head: torch.nn.Module, k: int) -> None:
        self.lm_head = lm_head
        self.k = k
        self.handle: Any = None

    def __enter__(self) -> keep_last_positions:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0][:, -self.k :, :], *args[1:])

        self.handle = self.lm_head.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def completion_logprobs(
    model: Any,
    batch: ModelBatch,
    *,
    lm_head: torch.nn.Module | None = None,
    distribution: SamplingDistribution | None = None,
    chunk: int = 1024,
    entropy: list[torch.Tensor] | None = None,
    entropy_grad: bool = False,
    sampling: list[torch.Tensor] | None = None,
    outside: list[torch.Tensor] | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """log π(token) for every completion position, [B, C] float32 (0 where masked out), under the
    *tempered* ``distribution`` (its temperature alone, over the whole vocabulary; default: the
    model's own softmax), with gradients: the loss's log-probs (``learner/worker.py`` says why).

    ``model`` is the thinker or a wrapper that calls it (a DeepSpeed engine); ``lm_head`` is the
    thinker's output layer, by default ``model.lm_head``. With ``entropy`` (a list), the tempered
    policy's entropy at every completion position is appended to it as one [B, C] tensor (masked
    like the log-probs), computed ``ENTROPY_CHUNK`` positions at a time so that no [B, C, V]
    probability tensor is kept; with ``entropy_grad`` it carries gradients (an entropy bonus).
    With ``sampling`` (a list), the log-probs under the whole sampling distribution (the media
    bias, top-k and top-p too: what vLLM reports, ``omni.sampling``) are appended as one detached
    [B, C] tensor, and with ``outside`` the [B, C] bool tensor of the tokens that the learner's own
    truncation masks. All come from the same tempered logits, ``chunk`` positions at a time.
    With ``fused`` (learner.fused_head) and shared prompts the completions' positions go through
    the head in chunks without keeping their logits for the backward (`omni.head`; not with an
    entropy bonus, nor under ZeRO-3): the same values to float noise, less memory.
    """
    dist = distribution if distribution is not None else SamplingDistribution()
    c = batch.completion_len
    head = lm_head if lm_head is not None else model.lm_head
    targets = batch.completion_ids
    entropies: list[torch.Tensor] | None = [] if entropy is not None else None
    sampled: list[torch.Tensor] | None = [] if sampling is not None else None
    masked: list[torch.Tensor] | None = [] if outside is not None else None
    views = dict(entropy=entropies, sampling=sampled, outside=masked)
    if batch.prompt_rows is not None:
        first, hidden = _shared_prompt_parts(model, batch, head)
        if fused and hidden is not None and not entropy_grad and usable(head):
            # position 0 from the prompt pass's logits, the rest through the head in chunks
            out = torch.cat([_logprobs_of_logits(first, targets[:, :1], dist, chunk, entropy_grad, **views),
                             head_logprobs(hidden, head, targets[:, 1:], dist, chunk=chunk, **views)], dim=1)
            return _finish(out, batch.completion_mask, entropy, sampling, outside, views)
        logits = first if hidden is None else torch.cat([first, head(hidden)], dim=1)
    else:
        with keep_last_positions(head, c + 1):
            logits = model(**batch.inputs, use_cache=False).logits  # [B, C + 1, V]
        logits = logits[:, :-1, :]  # position t predicts completion token t
    out = _logprobs_of_logits(logits, targets, dist, chunk, entropy_grad, **views)
    return _finish(out, batch.completion_mask, entropy, sampling, outside, views)


def _logprobs_of_logits(
    logits: torch.Tensor, targets: torch.Tensor, dist: SamplingDistribution, chunk: int, entropy_grad: bool,
    entropy: list[torch.Tensor] | None, sampling: list[torch.Tensor] | None, outside: list[torch.Tensor] | None,
) -> torch.Tensor:
    """Tempered log p(target) [B, T] from [B, T, V] logits, ``chunk`` positions at a time; the
    entropy, sampling log-probs and masked targets of each chunk are appended to the lists given."""
    out = []
    for start in range(0, logits.shape[1], chunk):
        part = tempered_logits(logits[:, start : start + chunk, :], dist)  # float32 [B, chunk, V]
        chosen = targets[:, start : start + chunk]
        token_logits = part.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        out.append(token_logits - torch.logsumexp(part, dim=-1))
        if entropy is not None:
            entropy.append(_entropy(part, entropy_grad))
        if sampling is not None:
            sampling.append(sampling_token_logprobs(part, chosen, dist, outside))
    return torch.cat(out, dim=1)


def _finish(out: torch.Tensor, mask: torch.Tensor, entropy: list[torch.Tensor] | None,
            sampling: list[torch.Tensor] | None, outside: list[torch.Tensor] | None,
            views: dict[str, list[torch.Tensor] | None]) -> torch.Tensor:
    """The [B, C] results masked, the views' parts joined into the caller's lists."""
    if entropy is not None:
        entropy.append(torch.cat(views["entropy"], dim=1) * mask)
    if sampling is not None:
        sampling.append(torch.cat(views["sampling"], dim=1) * mask)
        if outside is not None:
            outside.append(torch.cat(views["outside"], dim=1) & (mask > 0))
    return out * mask


ENTROPY_CHUNK = 128  # positions per softmax: B × 128 × V floats at a time


def _entropy(logits: torch.Tensor, grad: bool) -> torch.Tensor:
    """H = logsumexp(z) − Σ softmax(z)·z per position of [B, T, V] float32 logits."""
    parts = []
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for start in range(0, logits.shape[1], ENTROPY_CHUNK):
            z = logits[:, start : start + ENTROPY_CHUNK]
            z = z if grad else z.detach()
            parts.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.cat(parts, dim=1)


def _shared_prompt_parts(model: Any, batch: ModelBatch, head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [B, 1, V] logits predicting each completion's first token (from its prompt's pass) and
    the [B, C − 1, H] hidden states predicting the others (None for one-token completions): the
    distinct prompts run once, then every completion runs on its prompt's keys and values
    (gradients flow back into the prompt pass).

    Positions are given explicitly: the thinker's multimodal rotary positions of a prompt end at
    its last text token, and completion token t sits t + 1 past it on all three axes. Both caches
    are idempotent (a write replaces, a read stores nothing), so a checkpointed layer's recompute
    in the backward pass sees exactly what its forward saw: sharing works under gradient
    checkpointing, where transformers would otherwise drop the cache.
    """
    thinker = getattr(model, "module", model)
    for layer in thinker.model.layers:
        layer._can_checkpoint_with_cache = True  # safe with the two caches below, see their docstrings
    inputs = batch.inputs
    positions = inputs["position_ids"]
    recorder = PromptRecorder(config=thinker.config.get_text_config())
    with keep_last_positions(head, 1):
        # use_cache=False: the layers use the cache object passed in either way; nothing is returned
        first = model(**inputs, past_key_values=recorder, use_cache=False).logits  # [K, 1, V]
    rows = batch.prompt_rows
    if batch.completion_len == 1:
        return first[rows], None
    prefix = ReadOnlyPrefix([(k[rows], v[rows]) for k, v in recorder.ordered()])  # K prompts → B rows
    c = batch.completion_len
    start = positions.amax(dim=(0, 2))[rows] + 1  # [B]: as continuation_positions
    steps = torch.arange(c - 1, device=start.device)
    completion_positions = (start[:, None] + steps[None, :]).unsqueeze(0).expand(3, -1, -1)
    attention = torch.cat([inputs["attention_mask"][rows], batch.completion_mask[:, :-1].long()], dim=1)
    # The completions are text only: the thinker's forward would just embed them, run its text model
    # and its head. Calling those directly keeps the two passes inside one call of the root module,
    # which is where DeepSpeed ZeRO-3 starts its per-forward trace of module order: two root calls
    # of different orders per micro-batch invalidate that trace every time, and every parameter
    # is then released and gathered again (measured: the shared path slower than no sharing).
    hidden = thinker.model(
        input_ids=batch.completion_ids[:, :-1],
        attention_mask=attention,
        position_ids=completion_positions,
        past_key_values=prefix,
        use_cache=False,
        return_dict=True,
    ).last_hidden_state  # [B, C - 1, H]: completion token t predicts token t + 1
    return first[rows], hidden


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
