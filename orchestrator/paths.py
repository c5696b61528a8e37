"""Paths in the run config: every path key made absolute once, in the driver, before any actor
sees it (README: "Paths in the config"), and the files a run reads checked before anything starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from orchestrator.config import ConfigError, RunConfig


def with_absolute_paths(
    config: RunConfig,
    base: str | Path | None = None,
    *,
    must_exist: list[str] | tuple[str, ...] | None = None,
) -> RunConfig:
    """A copy of ``config`` in which every path-valued key is absolute: a relative path (``~``
    expanded) is read against ``base``, by default the current directory — where `echoink train`
    or `echoink eval` was started. Done once in the driver, before any actor sees the config: Ray
    actors run in working directories of their own, where a relative path names other files.

    The keys are found by walking the config's fields by annotation (``Path`` or ``Path | None``),
    so a new path key is covered without being listed here; a field that holds paths any other way
    (``list[Path]``, …) raises ``TypeError`` until the walk handles it.

    ``must_exist``: the keys whose files must be there, checked at once (default: every path key
    but ``output_dir``; ``()``: none). A missing one raises ``ConfigError`` naming the key, the path
    as given and the absolute path tried.

    Which directory is "where echoink was started" under `ray job submit` (Ray 2.60: the job
    supervisor starts the entrypoint in the job's working_dir, `runtime_env/working_dir.py`):
    - ``--working-dir local:///abs/dir``: that folder itself, nothing uploaded. On a one-machine
      cluster (or nodes that share the checkout's path) this is the way to submit from the
      repository root with the data in it: `ray job submit --working-dir "local://$PWD" --
      echoink train --config configs/tiny_cpu.yaml` reads data/ and checkpoints/ and writes runs/
      where the user stood, as a plain `echoink train` there does.
    - ``--working-dir .`` (uploaded; `make submit`): Ray's unpacked copy of the folder,
      ``…/runtime_resources/working_dir_files/_ray_pkg_<hash>``. It holds configs/ but never the
      ``.gitignore``'d or excluded data/, checkpoints/ and runs/. Paths are still read against
      that copy, not against a guess at the submitter's folder: the job does not carry that folder
      (the package is named by its content hash) and on a remote cluster it does not exist. So a
      relative model or data path fails here, before anything starts, with the way out (the
      ``local://`` form, or absolute paths); a relative ``output_dir`` warns: the run folder would
      live in Ray's package cache, which Ray may evict, and the next upload (changed code) unpacks
      elsewhere, so ``--resume`` would not find it.
    - no working dir: the directory the head's `ray start` ran in.
    """
    import os
    import types
    import typing
    import warnings

    root = Path(os.path.abspath(Path(base).expanduser() if base is not None else Path.cwd()))

    def holds_path(annotation: Any) -> bool:
        return annotation is Path or any(holds_path(arg) for arg in typing.get_args(annotation))

    def is_path(annotation: Any) -> bool:
        if annotation is Path:
            return True
        args = set(typing.get_args(annotation))
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        return union and Path in args and args <= {Path, type(None)}

    result = config.model_copy(deep=True)
    keys: list[str] = []  # every path key, also those set to null
    given: dict[str, Path] = {}  # key → the path as written, for the keys that hold one

    def walk(model: BaseModel, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            key, value = prefix + name, getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, key + ".")
            elif is_path(field.annotation):
                keys.append(key)
                if value is not None:
                    given[key] = value
                    setattr(model, name, Path(os.path.abspath(root / Path(value).expanduser())))
            elif holds_path(field.annotation):
                raise TypeError(f"{key}: {field.annotation} holds paths that with_absolute_paths does not make absolute")

    walk(result, "")

    def value_of(key: str) -> Path:
        node: Any = result
        for part in key.split("."):
            node = getattr(node, part)
        return node

    # Ray's unpacked copy of an uploaded working_dir (see above), if this runs inside one
    package = next(
        (p for p in (root, *root.parents) if p.parent.name == "working_dir_files" and p.name.startswith("_ray_pkg_")),
        None,
    )
    required = [k for k in given if k != "output_dir"] if must_exist is None else list(must_exist)
    missing = []
    for key in required:
        if key not in keys:
            raise ValueError(f"must_exist: {key!r} is not a path key of the run config ({', '.join(keys)})")
        if key not in given:
            continue  # an optional path set to null (data.valid, data.media_root)
        if not value_of(key).exists():
            missing.append(f"  {key}: {str(given[key])!r} does not exist (tried {value_of(key)})")
    if missing:
        where = ", the current directory: where echoink was started" if base is None else ""
        lines = [f"run config paths not found (relative paths are read against {root}{where}):"]
        lines += missing
        if package is not None:
            lines.append(
                f"  This job runs in Ray's unpacked copy of its uploaded working_dir ({package}), which holds "
                "only the uploaded files: not .gitignore'd or excluded folders such as data/ and checkpoints/. "
                'On a one-machine cluster submit with --working-dir "local://$PWD" (the job then runs in that '
                "folder itself), or give absolute paths (--set model_path=/abs/path …)."
            )
        raise ConfigError("\n".join(lines))
    relative_out = "output_dir" in given and not given["output_dir"].expanduser().is_absolute()
    if package is not None and relative_out and value_of("output_dir").is_relative_to(package):
        warnings.warn(
            f"output_dir {str(given['output_dir'])!r} is {value_of('output_dir')}, inside Ray's unpacked copy of the "
            "job's working_dir: Ray may delete it with its package cache, and a new upload unpacks elsewhere "
            "(--resume would not find this run). Give an absolute output_dir, or submit with "
            '--working-dir "local://$PWD".',
            UserWarning,
            stacklevel=2,
        )
    return result
