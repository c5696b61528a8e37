"""The config's files: YAML read as a tree of keys, recipes merged over it, `--set key=value`
overrides applied to it; errors name the file or the override. No schema here: the tree becomes a
`RunConfig` (and every default comes from) `orchestrator.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot run, naming the key."""


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars or flow collections: 3, 1e-6, true, null, [1, 2], {a: 1}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = _parse_scalar(raw)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return loaded or {}


def merge_trees(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over``'s keys replace ``base``'s; sections merge key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
