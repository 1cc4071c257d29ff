"""The package's import structure: no import cycle, and no package importing one above it.

Layers, lowest first (docs/architecture.md explains each room)::

    utils < config < data < ops, layers < backbones, heads, losses, dataloaders < models
      < training, inference, evaluation < experiments < serving < pipelines < cli (and the
      ``python -m tf_agg3d.<command>`` modules at the top level)

A module may import modules of its own layer or below. Packages of one layer must not import
each other in a circle, and no module may import one that imports it back. Entry points are
exempt: ``__main__`` modules and ``if __name__ == "__main__":`` blocks only hand ``python -m``
over to the CLI layer, so they may import from any layer.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tf_agg3d"

LAYERS = (
    ("utils",),
    ("config",),
    ("data",),
    ("ops", "layers"),
    ("backbones", "heads", "losses", "dataloaders"),
    ("models",),
    ("training", "inference", "evaluation"),
    ("experiments",),
    ("serving",),
    ("pipelines",),
    ("cli",),
)
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}
COMMANDS_RANK = len(LAYERS) - 1  # tf_agg3d/<command>.py: thin entry points, like cli/


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module that ``import name`` loads (``a.b.func`` -> ``a.b``)."""
    while name not in MODULES:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(
            isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators
        )
    )


def _imports(module: str) -> set[str]:
    """Every tf_agg3d module that `module` imports, at top level or inside functions.

    Imports under an ``if __name__ == "__main__":`` guard are the entry point's, not the
    module's: they are left out.
    """
    found = set()
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    tree.body = [node for node in tree.body if not _is_main_guard(node)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.startswith("tf_agg3d") else None
            if target and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "tf_agg3d"
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "config" if parts[1] == "config" else "<command>"


def _rank(module: str) -> int:
    room = _room(module)
    if room == "tf_agg3d":
        return 0
    if room == "<command>":
        return COMMANDS_RANK
    assert room in RANK, f"{module}: package '{room}' has no layer in tests/test_architecture.py"
    return RANK[room]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_package_has_a_layer():
    for module in MODULES:
        _rank(module)


def test_no_module_imports_a_layer_above_it():
    upward = [
        f"{module} ({_room(module)}) imports {target} ({_room(target)})"
        for module, targets in GRAPH.items()
        if not module.endswith("__main__")
        for target in targets
        if _rank(target) > _rank(module)
    ]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_module_import_cycle():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_package_import_cycle():
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        if module.endswith("__main__"):
            continue
        room = _room(module)
        packages.setdefault(room, set()).update(
            _room(t) for t in targets if _room(t) != room and _room(t) != "tf_agg3d"
        )
    cycle = _cycle(packages)
    assert cycle is None, "package import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"a2"}, "a2": set(), "b": {"b"}}, ["b", "b"]),
    ],
)
def test_cycle_finder(graph, expected):
    assert _cycle(graph) == expected


def test_the_walk_sees_imports_inside_functions():
    # training/abs.py imported the checkpoint layout inside a function; a walk of top-level
    # imports only would have missed the cycle that made.
    assert any(GRAPH.values())
    inner = [
        m
        for m, path in MODULES.items()
        if "\n    from tf_agg3d" in path.read_text(encoding="utf-8")
    ]
    assert all(GRAPH[m] for m in inner)
