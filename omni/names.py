"""Parameter names: the learner's thinker names ↔ what vLLM's `load_weights` and checkpoints take.

vLLM loads Qwen2.5-Omni's thinker from weights named ``thinker.…`` (the full model's layout); the
learner's `Qwen2_5OmniThinkerForConditionalGeneration` names the same tensors without the prefix.
Checkpoints on disk use the vLLM names, so transformers and vLLM load the same folder.
"""

from __future__ import annotations

from pathlib import Path

THINKER_PREFIX = "thinker."
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
