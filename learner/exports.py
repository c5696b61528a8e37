"""A rank's weights as the engines and a checkpoint's model folder see them: the plain thinker,
each weight under its vLLM name, in buckets; under LoRA a target's value is its merged
``W + s·B·A`` (`learner.lora`). Gathered bucket by bucket under ZeRO-3 (a collective every rank
joins), whole already under ZeRO-2.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from learner.lora import export_weights, merged
from omni.names import head_is_tied, to_vllm_name, without_tied_head
from omni.weightsync import BucketSpec, plan_buckets


class WeightExport:
    """The weights of ``module`` (the rank's DeepSpeed module) as they leave the learner, in
    ``dtype``; ``model_path`` says whether the head is tied (then it is not sent: vLLM's head
    shares the embedding's storage)."""

    def __init__(self, module: torch.nn.Module, model_path: Path, dtype: torch.dtype, *, zero3: bool) -> None:
        self.weights = {to_vllm_name(w.name): w for w in export_weights(module)}
        self.tied = head_is_tied(model_path)
        self.dtype = dtype
        self.zero3 = zero3

    def parameters(self) -> int:
        """The plain thinker's parameter count (adapters folded in, not counted)."""
        return sum(numel(w.base) for w in self.weights.values())

    def specs(self, bucket_bytes: int) -> list[BucketSpec]:
        plain = without_tied_head([(w.name, w.base) for w in self.weights.values()], tied=self.tied)
        return plan_buckets(
            ((to_vllm_name(n), full_shape(p), self.dtype if p.is_floating_point() else p.dtype) for n, p in plain),
            bucket_bytes,
        )

    def gathered(self, specs: Sequence[BucketSpec], mine: bool) -> Iterator[list[torch.Tensor] | None]:
        """Per bucket, its full tensors where ``mine`` (None elsewhere: that rank only joins the
        gathers)."""
        import deepspeed

        for spec in specs:
            weights = [self.weights[t.name] for t in spec.tensors]
            params = [p for w in weights for p in w.params]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero3):
                yield [merged(w, self.dtype) for w in weights] if mine else None

    def named(self, specs: Sequence[BucketSpec], mine: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """(vLLM name, full tensor) for every weight of ``specs`` where ``mine``; every rank must
        run it to the end (under ZeRO-3 each bucket is a gather)."""
        for spec, tensors in zip(specs, self.gathered(specs, mine), strict=True):
            if tensors is not None:
                yield from ((ts.name, t) for ts, t in zip(spec.tensors, tensors, strict=True))


def numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    shape = getattr(param, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(param.shape)
