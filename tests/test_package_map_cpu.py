"""The package map of docs/ARCHITECTURE.md, checked on the source: imports point one way and close
no circle.

echoink (the commands) → orchestrator → (evaluation, watch, rollout, learner, rewards) → (omni,
avqa); evaluation scores on
rollout's engines with rewards' parsers and reads JSON lines through watch; rollout and learner
never import each other; watch imports only omni and avqa; omni imports only avqa; avqa imports no
other package of the project. Imports inside functions count too (they are imports all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("avqa", "omni", "rewards", "rollout", "learner", "watch", "evaluation", "orchestrator", "echoink")
ALLOWED = {
    "avqa": set(),
    "omni": {"avqa"},
    "rewards": {"avqa"},
    "rollout": {"avqa", "omni"},
    "learner": {"avqa", "omni"},
    "watch": {"avqa", "omni"},
    "evaluation": {"avqa", "omni", "rewards", "rollout", "watch"},
    "orchestrator": {"avqa", "omni", "rewards", "rollout", "learner", "watch", "evaluation"},
    "echoink": {"avqa", "omni", "rewards", "rollout", "learner", "watch", "evaluation", "orchestrator"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = module_name(path)
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    found |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module)
                    found |= {f"{node.module}.{alias.name}" for alias in node.names}
            graph[name] = {m for m in found if m.split(".")[0] in PACKAGES}
    # keep only names that are modules of the project (``from omni.inputs import X`` names X too)
    return {name: {m for m in deps if m in graph} for name, deps in graph.items()}


def test_imports_follow_the_package_map() -> None:
    wrong = [
        f"{name} imports {dep}"
        for name, deps in imports().items()
        for dep in deps
        if dep.split(".")[0] != name.split(".")[0] and dep.split(".")[0] not in ALLOWED[name.split(".")[0]]
    ]
    assert not wrong, wrong


def test_no_import_circle() -> None:
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if dep == name.rsplit(".", 1)[0] or name == dep.rsplit(".", 1)[0]:
                continue  # a package and its own modules (the __init__ re-exports) are one unit
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep):], dep] if dep in path else [*path, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, circles
