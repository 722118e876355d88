"""The import graph of service/: layers top to bottom, no cycle anywhere, the client on its own.

Every import counts, at module level or inside a function, and those only for type checkers too: a
module that names another's types depends on it as much as one that calls it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "service"

# Each package, and what it may import besides itself (the root package's `__version__` aside).
# Top to bottom: the entry points, the process, the routes, delivery and auth, the broker, telemetry,
# the domain, configuration. The Python client imports nothing of the server.
ALLOWED: dict[str, set[str]] = {
    "service.__main__": {"service.config", "service.server", "service.broker", "service.client"},
    "service.devhelp": {"service.config"},
    "service.openapi": {"service.config", "service.api"},
    "service.server": {
        "service.api",
        "service.egress",
        "service.push",
        "service.webhooks",
        "service.outbox",
        "service.delivery",
        "service.auth",
        "service.broker",
        "service.telemetry",
        "service.core",
        "service.config",
    },
    "service.api": {
        "service.egress",
        "service.push",
        "service.webhooks",
        "service.outbox",
        "service.delivery",
        "service.auth",
        "service.broker",
        "service.telemetry",
        "service.core",
        "service.config",
    },
    "service.push": {
        "service.egress",
        "service.outbox",
        "service.broker",
        "service.telemetry",
        "service.core",
        "service.config",
    },
    "service.webhooks": {
        "service.egress",
        "service.outbox",
        "service.broker",
        "service.telemetry",
        "service.core",
        "service.config",
    },
    "service.outbox": {"service.broker", "service.telemetry", "service.core", "service.config"},
    "service.delivery": {"service.broker", "service.telemetry", "service.core", "service.config"},
    # What leaves the service over HTTP (webhooks, hooks, pushes): imports none of the service.
    "service.egress": set(),
    "service.auth": {"service.core", "service.config"},
    "service.broker": {"service.telemetry", "service.core", "service.config"},
    "service.telemetry": {"service.core", "service.config"},
    "service.core": {"service.config"},
    "service.config": set(),
    "service.client": set(),
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> the service modules it imports (a name imported from a package: the package)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    targets.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _owner(module: str) -> str:
    """The ALLOWED entry a module belongs to: its longest listed prefix."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in ALLOWED:
            return ".".join(parts[:end])
    return module


def test_every_module_belongs_to_a_layer() -> None:
    strays = sorted(m for m in _graph() if m != "service" and _owner(m) not in ALLOWED)
    assert strays == [], f"modules outside every layer: {strays}"


def test_layers_import_only_downwards() -> None:
    wrong = []
    for module, targets in _graph().items():
        if module == "service":
            continue
        layer = _owner(module)
        for target in targets:
            other = _owner(target)
            if target != "service" and other != layer and other not in ALLOWED[layer]:
                wrong.append(f"{module} -> {target}")
    assert wrong == [], "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_the_client_imports_nothing_of_the_server() -> None:
    graph = _graph()
    wrong = [
        f"{m} -> {t}" for m in graph if _owner(m) == "service.client" for t in graph[m] if _owner(t) != "service.client"
    ]
    assert wrong == []


def test_no_import_cycle() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", sorted(m for m in ALLOWED if (ROOT.parent / m.replace(".", "/")).is_dir()))
def test_every_package_says_what_it_holds(package: str) -> None:
    init = ROOT.parent / package.replace(".", "/") / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc) > 60, f"{init} needs a docstring saying what the package holds and may import"
