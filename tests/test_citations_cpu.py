"""What the README, the docs and the code cite lives in the repository.

A user who clones the repository follows every citation: a file path (`orchestrator/plan.py`,
`configs/tiny_cpu.yaml`, `docs/ENVIRONMENT.md`), a bare document name (`RESULTS.md`) or a dotted
module name (`orchestrator.plan.make_plan`, `omni.inputs`). Each must name something that exists:
a file, or a module of the project (and, for a dotted name past the module, an attribute it
defines). Renames leave stale citations behind; this finds them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("avqa", "omni", "rewards", "rollout", "learner", "watch", "evaluation", "orchestrator", "echoink")
FOLDERS = (*PACKAGES, "configs", "docs", "benchmarks", "tests", "docker")
# files written by a run, a command or a test, not kept in the repository
WRITTEN = re.compile(r"^(benchmarks/records/|configs/job\.yaml$)")

_FOLDERS, _PACKAGES = "|".join(FOLDERS), "|".join(PACKAGES)
PATH = re.compile(rf"(?<![\w./-])((?:{_FOLDERS})/[\w./-]*\w\.(?:py|md|yaml|yml|json|png|sh|txt))")
DOC = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]+\.md)\b")
MODULE = re.compile(rf"`((?:{_PACKAGES})(?:\.\w+)+)")


def sources() -> list[Path]:
    files = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "benchmarks").glob("*.md"))
    for folder in (*PACKAGES, "benchmarks", "tests", "configs", "docker"):
        files += sorted(p for p in (REPO / folder).rglob("*") if p.suffix in {".py", ".yaml", ".yml", ".md"})
    return [f for f in files if f.is_file() and f.name != Path(__file__).name]  # this file cites stale names on purpose


def config_keys() -> set[str]:
    """Every section and key of the run config (``learner.share_prompts`` is a key, not a module)."""
    from pydantic import BaseModel

    from orchestrator.config import RunConfig

    keys: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            keys.add(prefix + name)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")

    walk(RunConfig, "")
    return keys


def module_names() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def defined_names(path: Path) -> set[str]:
    """Names a module defines at its top level, and the names its classes define."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(target) if isinstance(n, ast.Attribute)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def stale() -> list[str]:
    modules, keys = module_names(), config_keys()
    docs = {p.name for p in REPO.rglob("*.md") if ".venv" not in p.parts and ".git" not in p.parts}
    found: list[str] = []
    for source in sources():
        text = source.read_text(encoding="utf-8")
        where = source.relative_to(REPO)
        for match in PATH.finditer(text):
            cited = match.group(1).rstrip(".")
            if not WRITTEN.search(cited) and not (REPO / cited).exists():
                found.append(f"{where}: {cited} does not exist")
        for match in DOC.finditer(text):
            if match.group(1) not in docs:
                found.append(f"{where}: {match.group(1)} is in no folder of the repository")
        for match in MODULE.finditer(text):
            dotted = match.group(1)
            if dotted in keys:
                continue
            parts = dotted.split(".")
            prefix = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None)
            if prefix is None:
                found.append(f"{where}: {dotted} names no module")
                continue
            rest = parts[len(prefix.split(".")):]
            if rest and rest[0] not in defined_names(modules[prefix]):
                found.append(f"{where}: {dotted}: {prefix} defines no {rest[0]}")
    return found


def test_every_citation_names_something_that_exists() -> None:
    assert not stale(), "\n".join(stale())


def test_the_check_finds_a_stale_citation(tmp_path: Path) -> None:
    # the patterns themselves: a renamed module, a missing file and a missing document are caught
    text = "see `orchestrator.metrics.MetricsLogger`, orchestrator/evalrun.py and DESIGNS.md"
    assert PATH.findall(text) == ["orchestrator/evalrun.py"]
    assert DOC.findall(text) == ["DESIGNS.md"]
    assert MODULE.findall(text) == ["orchestrator.metrics.MetricsLogger"]
    assert "orchestrator.metrics" not in module_names() and "watch.metrics_log" in module_names()
    assert "MetricsLogger" in defined_names(module_names()["watch.metrics_log"])
