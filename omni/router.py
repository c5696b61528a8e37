"""Mixture-of-experts routers (Qwen3-Omni's thinker): what they decided during a forward, and the
balance loss of those decisions (`learner.router_aux_loss_coef`).

transformers computes the Switch Transformer balance loss inside the thinker's own forward, and
adds it to the loss only when labels are passed — an RL loss passes none, and the learner's shared
prompt forward (`omni.forward`) runs the language model in two passes of its own. So the router
logits are captured here from every router call of a forward (prompt pass and completion pass
alike) and given to transformers' own formula (``load_balancing_loss_func``: number of experts ×
Σ over experts of the routing slots an expert got per token × its mean router probability; the
experts per token (top-k) when balanced, more when a few experts take most tokens). Every token position a
pass computes counts, padding included, as in transformers' forward without an attention mask.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's expert routers: each MoE layer's ``mlp.gate`` (a module with ``top_k`` and
    ``num_experts``; a dense MLP's ``gate_proj`` is not one)."""
    return [
        module for name, module in model.named_modules()
        if name.endswith(".mlp.gate") and hasattr(module, "top_k") and hasattr(module, "num_experts")
    ]


class RouterCapture:
    """Within this context every router call's logits are kept; :meth:`balance_loss` reads them.
    Made once for a model (it finds the routers) and entered for each forward.

    Leave the context before the backward: a checkpointed layer recomputes its forward there, and
    those calls are not part of the step's routing.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = routers(model)
        if not self.routers:
            raise ValueError("learner.router_aux_loss_coef: the model has no mixture-of-experts routers to balance "
                             "(a dense thinker such as Qwen2.5-Omni's): set it to 0")
        self.logits: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def _keep(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        self.logits.append(output[0] if isinstance(output, tuple) else output)

    def __enter__(self) -> RouterCapture:
        self._handles = [router.register_forward_hook(self._keep) for router in self.routers]
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def balance_loss(self) -> torch.Tensor:
        """The balance loss over every token position the captured forward routed (a scalar with
        gradient to the routers)."""
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
            load_balancing_loss_func,
        )

        if not self.logits:
            raise RuntimeError("no router ran inside the capture")
        first = self.routers[0]
        loss = load_balancing_loss_func(tuple(self.logits), int(first.num_experts), int(first.top_k))
        self.logits = []
        return loss
