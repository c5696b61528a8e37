"""Parameter names: the learner's thinker names ↔ what vLLM's `load_weights` and checkpoints take.

vLLM loads Qwen2.5-Omni's thinker from weights named ``thinker.…`` (the full model's layout); the
learner's `Qwen2_5OmniThinkerForConditionalGeneration` names the same tensors without the prefix.
Checkpoints on disk use the vLLM names, so transformers and vLLM load the same folder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

THINKER_PREFIX = "thinker."
LM_HEAD = "lm_head.weight"  # learner names of the output matrix and the input embeddings
EMBED_TOKENS = "model.embed_tokens.weight"
# wrappers that frameworks put in front of parameter names (DeepSpeed, DDP, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def to_vllm_name(learner_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` → ``thinker.model.layers.0.mlp.up_proj.weight``."""
    name = learner_name
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    if name.startswith(THINKER_PREFIX):
        return name
    return THINKER_PREFIX + name


def to_learner_name(vllm_name: str) -> str:
    """``thinker.lm_head.weight`` → ``lm_head.weight``; other prefixes (talker, token2wav) raise."""
    if not vllm_name.startswith(THINKER_PREFIX):
        raise ValueError(f"{vllm_name!r} is not a thinker weight (expected the prefix {THINKER_PREFIX!r})")
    return vllm_name[len(THINKER_PREFIX) :]


PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def require_safetensors(folder: str | Path) -> list[Path]:
    """The checkpoint's safetensors files; a folder that holds only pickled weights is refused
    (unpickling runs code), as is one with no config."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder (no config.json)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
        hint = f" (found pickled weights {pickled}: convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{folder}: no .safetensors weights; only safetensors are loaded{hint}")
    return files


# --------------------------------------------------------------------------- tied LM head

T = TypeVar("T")


def field_of(config: Any, name: str) -> Any:
    """``config[name]`` of a config dict, else the attribute of a config object (None if absent)."""
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def head_is_tied(config: Any) -> bool:
    """Whether the thinker's LM head is its input-embedding matrix, as the learner builds it.

    ``config`` is a checkpoint folder, the full ``qwen2_5_omni`` config, its ``thinker_config``,
    or any of these as the dict read from config.json. transformers ties the thinker's head from
    ``thinker_config.tie_word_embeddings`` (else its ``text_config``'s); vLLM 0.32 ties its
    language model's head from the full config's top-level ``tie_word_embeddings`` (copied over
    the text config's). A full config on which the two disagree is refused: one side would compute
    logits with a matrix the other never has (seen on vLLM CPU: a head tied only in the thinker
    config is built untied, finds no ``lm_head`` in the checkpoint and stays uninitialised).
    """
    if isinstance(config, (str, Path)):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        config = json.loads(path.read_text())
    thinker = field_of(config, "thinker_config")
    full = thinker is not None
    thinker = thinker if full else config
    text = field_of(thinker, "text_config")
    learner = field_of(thinker, "tie_word_embeddings")
    if learner is None and text is not None:
        learner = field_of(text, "tie_word_embeddings")
    if learner is None:
        raise ValueError("config: no tie_word_embeddings in the thinker config or its text_config")
    engine = field_of(config, "tie_word_embeddings") if full else None
    if engine is not None and bool(engine) != bool(learner):
        raise ValueError(
            f"config: tie_word_embeddings={engine} but thinker_config.tie_word_embeddings={learner}; "
            "vLLM ties the LM head from the first and transformers from the second, so the engines "
            "and the learner would compute different logits: set both to the same value"
        )
    return bool(learner)


def _bare(name: str) -> str:
    """A learner or vLLM name without wrapper or thinker prefixes."""
    return to_learner_name(to_vllm_name(name))


def without_tied_head(named: Iterable[tuple[str, T]], *, tied: bool) -> list[tuple[str, T]]:
    """The tensors to push into an engine: all of ``named`` (learner or ``thinker.`` names), less
    a tied ``lm_head.weight``.

    vLLM's head of a tied model shares the embeddings' storage, so pushing the embeddings updates
    both. A pushed head is skipped by vLLM's loader, which raises when the push does not carry the
    embeddings too (``load_weights``, the GPU path; seen on vLLM 0.32). Leaving the head out keeps
    every push valid on every path and spares a copy of the largest matrix; the CPU engine, which
    keeps a repacked copy of the head, refeeds it from the embeddings itself
    (``rollout.receive.load_named_weights``). A head given without the embeddings is refused:
    dropping it would lose its update.
    """
    items = list(named)
    if not tied:
        return items
    kept = [(name, value) for name, value in items if _bare(name) != LM_HEAD]
    dropped = len(items) - len(kept)
    if dropped and not any(_bare(name) == EMBED_TOKENS for name, _ in kept):
        raise ValueError(
            f"tied LM head: {LM_HEAD!r} is pushed without {EMBED_TOKENS!r}, the matrix it shares; "
            "a tied engine loads the head only through the embeddings, so push those instead"
        )
    return kept
