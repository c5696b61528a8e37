"""Completion log-probs through the output layer in chunks, keeping no [positions, vocabulary]
tensor for the backward pass (``learner.fused_head``).

The plain path (`omni.forward.completion_logprobs`) runs the head on every completion position,
casts the logits to float32 and takes a log-softmax: autograd keeps the float32 logits of every
position until the backward (4 bytes × 152k vocabulary = 0.6 MB a token, 0.47 GB a 768-token
completion) and the backward makes their gradient too. That is most of a sequence's activation
memory under gradient checkpointing (RESULTS.md section 10: 15.6 bytes per token and vocabulary
entry at the peak).

Here the forward keeps only the hidden states (which the head's matmul keeps anyway) and one
log-sum-exp per position, and the backward recomputes each chunk's logits from them:
d log p(y) / d z = onehot(y) − softmax(z), divided by the temperature, then through the head's
weight to the hidden states and into the weight's gradient. The price is one more head matmul per
position (2·V·H FLOPs a token). The same forward pass also gives, without gradient, what the step
compares with vLLM (the sampling distribution's log-probs, `omni.sampling`) and the entropy.

Under ZeRO-3 the head's weight is a partition outside its module's forward: callers use the plain
path there (:func:`usable`).
"""

from __future__ import annotations

from typing import Any

import torch

from omni.sampling import SamplingDistribution, sampling_token_logprobs, tempered_logits


def usable(head: torch.nn.Module) -> bool:
    """Whether ``head``'s weight is whole here (not a ZeRO-3 partition) and it has no bias."""
    weight = getattr(head, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2 and getattr(head, "bias", None) is None
            and not hasattr(weight, "ds_id"))


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dist: SamplingDistribution, chunk: int, extras: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            z = tempered_logits(hidden[rows] @ weight.t(), dist)  # float32 [chunk, V]
            lse[rows] = torch.logsumexp(z, dim=-1)
            out[rows] = z.gather(-1, targets[rows, None]).squeeze(-1) - lse[rows]
            if "entropy" in extras:
                extras["entropy"].append(lse[rows] - (torch.softmax(z, dim=-1) * z).sum(-1))
            if "sampling" in extras:
                extras["sampling"].append(
                    sampling_token_logprobs(z, targets[rows], dist, extras.get("outside")))
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.dist, ctx.chunk = dist, chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        scale = 1.0 / ctx.dist.temperature
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h, g = hidden[rows], grad[rows].float()
            z = tempered_logits(h @ weight.t(), ctx.dist)
            dz = torch.exp(z - lse[rows, None]).mul_(-g[:, None])  # −g · softmax(z)
            dz.scatter_add_(-1, targets[rows, None], g[:, None])  # + g · onehot(y)
            dz = dz.mul_(scale).to(hidden.dtype)
            if want_hidden:
                grad_hidden[rows] = dz @ weight
            if want_weight:
                grad_weight += (dz.t() @ h).float()
        return grad_hidden, grad_weight.to(weight.dtype) if want_weight else None, None, None, None, None


def head_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    dist: SamplingDistribution,
    *,
    chunk: int = 1024,
    entropy: list[torch.Tensor] | None = None,
    sampling: list[torch.Tensor] | None = None,
    outside: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Tempered log p(target) [B, T] float32 from hidden states [B, T, H] and target ids [B, T],
    with gradients into ``hidden`` and the head's weight; with ``entropy`` / ``sampling`` /
    ``outside`` (lists) also the tempered entropy, the sampling distribution's log-probs and the
    targets the learner's truncation masks, each [B, T], without gradients."""
    b, t, width = hidden.shape
    extras: dict[str, list[torch.Tensor]] = {}
    for name, wanted in (("entropy", entropy), ("sampling", sampling), ("outside", outside)):
        if wanted is not None:
            extras[name] = []
    flat = _HeadLogprobs.apply(hidden.reshape(b * t, width), head.weight, targets.reshape(-1), dist, chunk, extras)
    for name, wanted in (("entropy", entropy), ("sampling", sampling), ("outside", outside)):
        if wanted is not None:
            parts = extras[name]
            wanted.append((torch.cat(parts) if parts else torch.zeros(0, device=hidden.device)).view(b, t).detach())
    return flat.view(b, t)
