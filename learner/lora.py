"""LoRA on the learner: low-rank adapters (peft's) on the thinker's projections, the base frozen.

What changes when ``learner.lora.rank`` > 0, and why it is enough for the rest of the system not
to know:

- The reference policy is the policy with its adapters switched off (:func:`adapters_off`): one
  model in memory, not two. The reference's weights are the starting model's, as without LoRA.
- Only the adapters train, so only they have gradients and optimizer states.
- Outwards the model is the plain thinker: :func:`export_weights` lists every weight under its
  original name, a target's value being the merged ``W + s·B·A`` (:func:`merged`), computed one
  weight at a time when a bucket is sent or written and never stored in the model. The engines,
  the weight push (both transports) and the checkpoint's model folder are the same as for a full
  fine-tune, so vLLM, transformers and ``echoink eval`` load a LoRA run's checkpoints unchanged.
- A checkpoint also holds the adapters as a peft folder (:func:`write_adapter`:
  ``adapter_config.json`` and ``adapter_model.safetensors``, which ``PeftModel.from_pretrained``
  loads over the starting model), and its train state holds the adapters and their optimizer
  states only (the frozen base is the starting model, rebuilt at resume).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from learner.types import LoraSettings
from omni.sizes import LANGUAGE_MODEL, lora_target

ADAPTER_DIR = "adapter"  # in a checkpoint folder
ADAPTER = "default"  # peft's adapter name; one adapter per run


def target_modules(model: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """The full names of the linear layers that get adapters: those whose last name part is one of
    ``settings.targets``, in the language model (and with ``towers`` in the towers too). A target
    name that matches no linear layer is a typo, not a no-op: it fails naming the ones there are."""
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    allowed = [n for n in linear if settings.towers or n.startswith(LANGUAGE_MODEL)]
    chosen = [n for n in allowed if lora_target(n, settings.targets, settings.towers)]  # the count of echoink plan too
    present = {n.rsplit(".", 1)[-1] for n in allowed}
    missing = sorted(set(settings.targets) - present)
    if missing:
        where = "the thinker" if settings.towers else "the language model (learner.lora.towers is false)"
        experts = any(name.endswith(".mlp.experts") for name, _ in model.named_modules())
        hint = (" (this language model's MLPs are mixtures of experts, fused 3-D parameters with no linear "
                "layers, which LoRA does not adapt here: leave their projections out of the targets, e.g. "
                "[q_proj, k_proj, v_proj, o_proj])") if experts else ""
        raise ValueError(
            f"learner.lora.targets: {missing} name no linear layer of {where}; its linear layers end in "
            f"{sorted(present)}{hint}"
        )
    return chosen


def add_adapters(model: torch.nn.Module, settings: LoraSettings, seed: int) -> int:
    """Inject ``settings``' adapters into ``model`` in place (peft), freeze everything else, and
    return the number of trainable parameters. B starts at zero (peft's default), so the policy
    starts equal to the model it was built from; A is drawn from ``seed`` (every rank the same)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules(model, settings),
        bias="none",
    )
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    trainable = 0
    for name, param in model.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        param.requires_grad_(is_adapter)
        trainable += param.numel() if is_adapter else 0
    return trainable


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Each adapted layer (peft's LoRA ``Linear``) by its module name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


@contextlib.contextmanager
def adapters_off(layers: Iterable[torch.nn.Module]) -> Iterator[None]:
    """The reference policy: the model with every adapter of ``layers`` (its :func:`lora_layers`,
    found once: this runs for every micro-batch) switched off — the starting model's function.
    peft's switch also clears the adapters' ``requires_grad`` and sets it back on the way out, so
    use it outside a graph that will be back-propagated (under ``torch.no_grad``)."""
    layers = list(layers)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@dataclass
class Exported:
    """One weight as the engines and the model folder name it (the learner's name, peft's
    ``base_layer`` removed), and where its value comes from: ``base``, plus ``scale · B·A`` for an
    adapted layer's weight."""

    name: str
    base: torch.nn.Parameter
    lora_a: torch.nn.Parameter | None = None
    lora_b: torch.nn.Parameter | None = None
    scale: float = 0.0

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The parameters its value is computed from (ZeRO-3 gathers them together)."""
        return [p for p in (self.base, self.lora_a, self.lora_b) if p is not None]


def export_weights(model: torch.nn.Module) -> list[Exported]:
    """Every weight of the plain thinker, in the model's parameter order, each with the
    parameters its value comes from. Without adapters: each parameter under its own name."""
    layers = lora_layers(model)
    adapted = {f"{name}.base_layer.weight": layer for name, layer in layers.items()}
    out = []
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            continue  # folded into their layer's weight
        layer = adapted.get(name)
        plain = name.replace(".base_layer.", ".")
        if layer is None:
            out.append(Exported(plain, param))
        else:
            out.append(Exported(plain, param, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                                float(layer.scaling[ADAPTER])))
    return out


def merged(weight: Exported, dtype: torch.dtype) -> torch.Tensor:
    """``weight``'s value in ``dtype``: the base alone, or ``W + scale · B·A`` computed in float32
    (a bf16 product would round the small update away) and rounded once."""
    base = weight.base.data
    if weight.lora_a is None or weight.lora_b is None:
        return base.to(dtype) if base.is_floating_point() else base
    delta = weight.lora_b.data.float() @ weight.lora_a.data.float()
    return (base.float() + weight.scale * delta).to(dtype)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under the names peft's ``PeftModel`` gives them in its files."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.data
        out[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.data
    return out


def write_adapter(model: torch.nn.Module, dest: Path) -> Path:
    """The peft folder ``dest/adapter`` of ``model``'s adapters (whole on every rank: LoRA runs
    under ZeRO-2)."""
    from safetensors.torch import save_file

    folder = dest / ADAPTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER].save_pretrained(str(folder))
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state(model).items()}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder
