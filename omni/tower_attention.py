"""The towers' attention as one variable-length call per layer instead of one call per window.

Qwen2.5-Omni's vision tower attends within windows of 8 × 8 merged patches (all but four of its
layers) and its audio tower within chunks of 100 encoder frames. transformers passes a layer the
windows' cumulative lengths (``cu_seqlens``), and unless the attention implementation is a flash
one it splits the tensors and calls attention once per window: a 448-px picture is 16 windows, a
10-s clip 10 chunks, so a step of 32 sequences made 21,096 small calls (issue 27, measured on an
H200), each a few µs of device time behind ~70 µs of host time. Given an implementation whose name
contains "flash", transformers (``is_flash_attention_requested``) instead hands over the whole
packed sequence with ``cu_seq_lens_q`` / ``cu_seq_lens_k``: one call per layer. This module is that
implementation:

- on a GPU with torch's FlashAttention ``varlen_attn`` (torch ≥ 2.11): one kernel over every window;
- elsewhere (CPUs, float32): the same math through ``scaled_dot_product_attention`` with a
  block-diagonal mask, one call per layer (tests compare it with the per-window path).

Only the towers use it (``set_tower_attention``): the language model keeps its own implementation.
Both signatures of ``varlen_attn`` that we have met take (q, k, v, cu_q, cu_k, max_q, max_k)
positionally, with full attention by default; ``_flash_varlen`` is the one place that calls it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

NAME = "echoink_flash_varlen"  # "flash" in the name: what makes transformers pass cu_seqlens


@cache
def _varlen_attn() -> Any:
    """torch's varlen FlashAttention function, or None where this torch has none (looked up once)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_kernel_usable(query: torch.Tensor) -> bool:
    """Whether torch's FlashAttention varlen kernel runs on this tensor (CUDA, half precision)."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                  scale: float) -> torch.Tensor:
    """[T, H, D] → [T, H, D] through torch's varlen FlashAttention (non-causal, within each span)."""
    varlen_attn = _varlen_attn()
    cu = cu.to(torch.int32)
    if abs(scale - q.shape[-1] ** -0.5) < 1e-12:  # the kernel's default scale
        return varlen_attn(q, k, v, cu, cu, longest, longest)
    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale)


def block_diagonal_mask(cu: torch.Tensor, length: int) -> torch.Tensor:
    """[T, T] bool: position i may attend to j when both lie in the same span of ``cu``."""
    span = torch.searchsorted(cu[1:].to(torch.long), torch.arange(length, device=cu.device), right=True)
    return span[:, None] == span[None, :]


def _block_diagonal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """[T, H, D] → [T, H, D]: one sdpa call with a block-diagonal mask (the same math, any device)."""
    mask = block_diagonal_mask(cu, q.shape[0])
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | torch.Tensor | None = None,
    max_length_k: int | torch.Tensor | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for the towers: [1, H, T, D] query/key/value → [1, T, H, D].

    Called with ``cu_seq_lens_q`` (the flash branch) it attends within each span in one call;
    called without (a transformers version that splits the windows itself) it attends over what it
    is given, which is then one window — correct either way, fast only in the first.
    """
    if dropout:
        raise ValueError(f"{NAME}: the towers' attention has no dropout in training (got {dropout})")
    if is_causal:
        raise ValueError(f"{NAME}: the towers attend both ways; a causal call is not theirs")
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    length = q.shape[0]
    cu = cu_seq_lens_q if cu_seq_lens_q is not None else torch.tensor([0, length], device=q.device)
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu and not torch.equal(cu_seq_lens_k, cu):
        raise ValueError(f"{NAME}: the towers' self-attention has the same spans for queries and keys")
    if varlen_kernel_usable(q):
        longest = max_length_q if max_length_q is not None else (cu[1:] - cu[:-1]).max()
        out = _flash_varlen(q, k, v, cu, int(longest), scale)  # int(): older transformers pass a tensor
    else:
        out = _block_diagonal(q, k, v, cu, scale)
    return out.unsqueeze(0), None


def set_tower_attention(thinker: torch.nn.Module, mode: str) -> torch.nn.Module:
    """The thinker's audio and vision towers on :func:`varlen_attention` (``mode`` "varlen") or back
    on the language model's own implementation, transformers' call per window ("per_window");
    learner.tower_attention. Each tower's layers read the tower's own config object."""
    if mode not in ("varlen", "per_window"):
        raise ValueError(f"tower attention {mode!r}: expected varlen or per_window")
    if mode == "varlen":
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, varlen_attention)
    implementation = NAME if mode == "varlen" else thinker.model.config._attn_implementation
    for name in ("audio_tower", "visual"):
        tower = getattr(thinker, name, None)
        if tower is not None:
            tower.config._attn_implementation = implementation
    return thinker
