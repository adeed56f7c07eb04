"""The house: the package's folders (stages) and top-level modules stand on floors; each imports only from its own
floor or below, and nothing imports in a circle, between folders or between files."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "alpaca_lora"

# A unit is a folder of the package (a stage, or the shared core) or a top-level module, in pipeline order.
FLOORS = [
    ["alpaca_lora", "common"],
    ["data", "endpoint", "model_args"],
    ["model"],
    ["inference"],
    ["evaluate"],
    ["train", "plan"],
    ["merge", "generate", "app", "serve", "arena", "feedback", "export"],
    ["cli", "__main__"],
]


def unit(module: str) -> str:
    """``alpaca_lora.train.run`` -> ``train``; ``alpaca_lora.merge`` -> ``merge``; the package itself -> itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def floor(module: str) -> int:
    found = [number for number, units in enumerate(FLOORS) if unit(module) in units]
    assert found, f"{module} is on no floor: add its folder or module to FLOORS in {__file__}"
    return found[0]


def file_imports() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports (lazy imports in functions too)."""
    modules = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
               for path in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alpaca_lora"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {name for name in names if name in modules and name != module}
        graph[module] = found
    return graph


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle found by a depth-first walk, as ``a -> b -> a``."""
    state: dict[str, str] = {}
    found: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_import_goes_down_a_floor_or_stays_on_it():
    graph = file_imports()
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if floor(b) > floor(a)]
    assert upward == []


def test_no_circle_between_files():
    assert circles(file_imports()) == []


def test_no_circle_between_folders():
    folders: dict[str, set[str]] = {}
    for module, targets in file_imports().items():
        folders.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    assert circles(folders) == []


def test_the_checks_can_fail():
    """A circle and an upward import are found (the tests above would be vacuous otherwise)."""
    assert circles({"a": {"b"}, "b": {"a"}}) == ["a -> b -> a"]
    assert floor("alpaca_lora.train.run") > floor("alpaca_lora.common.settings")


def test_every_stage_is_a_module_of_its_own():
    """``python -m alpaca_lora.STAGE`` exists for every command (README: Set up), and the package runs as one."""
    from alpaca_lora import cli

    for name, (module, _) in cli.COMMANDS.items():
        path = PACKAGE.joinpath(*module.removesuffix(".__main__").split(".")[1:])
        runnable = path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()
        assert runnable or name == "recipes", f"alpaca-lora {name}: {module} cannot run with python -m"
    assert (PACKAGE / "__main__.py").is_file()
