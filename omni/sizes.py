"""How large a thinker is, read from its checkpoint's config.json alone: the shape of every
parameter, from transformers' own model class built on the meta device (no memory, no weights
read, the same names the learner uses), and the text model's dimensions. `echoink plan`'s memory
estimate (orchestrator/memory.py) starts from this.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TOWERS = ("audio_tower.", "visual.")  # the learner's names of the two encoders' parameters
LANGUAGE_MODEL = "model.layers."  # the thinker's decoder layers


def lora_target(layer: str, targets: Iterable[str], towers: bool) -> bool:
    """Whether the linear layer named ``layer`` gets LoRA adapters (learner.lora): its last name part
    is a target, and it is a decoder layer's (or, with ``towers``, anywhere)."""
    return (towers or layer.startswith(LANGUAGE_MODEL)) and layer.rsplit(".", 1)[-1] in set(targets)


@dataclass(frozen=True)
class ModelShape:
    """The thinker's parameters by learner name, and what sizes its activations."""

    shapes: dict[str, tuple[int, ...]]
    vocab: int
    hidden: int
    layers: int
    linear: frozenset[str] = frozenset()  # the names of the nn.Linear layers (what LoRA adapts)

    def count(self, names: Iterable[str] | None = None) -> int:
        """Elements of the named parameters (all by default)."""
        chosen = self.shapes if names is None else names
        total = 0
        for name in chosen:
            size = 1
            for dim in self.shapes[name]:
                size *= dim
            total += size
        return total

    def under(self, prefixes: Iterable[str]) -> list[str]:
        """The parameter names under any of ``prefixes`` (a whole name part: ``model.layers.1`` is not
        ``model.layers.10``)."""
        stems = [p.rstrip(".") for p in prefixes]
        return [n for n in self.shapes if any(n == s or n.startswith(s + ".") for s in stems)]

    @property
    def parameters(self) -> int:
        return self.count()

    @property
    def towers(self) -> int:
        return self.count(self.under(TOWERS))

    def lora_parameters(self, rank: int, targets: Iterable[str], towers: bool) -> int:
        """Elements of rank-``rank`` adapters (A: rank × in, B: out × rank) on the linear layers whose
        last name part is in ``targets``: the language model's, and the towers' too with ``towers``."""
        wanted = set(targets)
        return sum(rank * (shape[0] + shape[1]) for name, shape in self.shapes.items()
                   if name.endswith(".weight") and name[: -len(".weight")] in self.linear
                   and lora_target(name[: -len(".weight")], wanted, towers))


def model_shape(model_path: Path) -> ModelShape:
    """The shape of ``model_path``'s thinker (a checkpoint folder of either family, or its config)."""
    import torch
    from transformers import AutoConfig

    from omni.family import family_of
    from omni.quiet import quiet_default_talker_warnings

    quiet_default_talker_warnings()
    Thinker = family_of(model_path).thinker_type()  # noqa: N806 (a class)
    config = AutoConfig.from_pretrained(str(model_path), local_files_only=True)
    thinker = getattr(config, "thinker_config", config)
    with torch.device("meta"):
        model = Thinker._from_config(thinker)
    text = thinker.text_config
    return ModelShape(
        shapes={name: tuple(p.shape) for name, p in model.named_parameters()},
        # a 2-D weight is not always a linear layer's (a mixture of experts' router is a bare matrix)
        linear=frozenset(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)),
        vocab=int(text.vocab_size),
        hidden=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
    )
