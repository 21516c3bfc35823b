"""The house rules of the layout: each side imports without the other, and no module imports itself in a circle."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"vera_engine": REPO / "engine" / "vera_engine", "vera_plugin": REPO / "plugin" / "vera_plugin"}


def module_names(package: str) -> list[str]:
    root = PACKAGES[package]
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif parts[-1] == "__main__":
            continue
        names.append(".".join(parts))
    return names


def imports_of(path: Path, module: str) -> set[str]:
    """Every vera_* module `path` imports, at module level or inside functions (a lazy import is still a use)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def test_no_module_imports_itself_through_others() -> None:
    graph: dict[str, set[str]] = {}
    for package, root in PACKAGES.items():
        for name in module_names(package):
            relative = Path(*name.split(".")[1:])
            path = root / relative / "__init__.py" if (root / relative).is_dir() else root / f"{relative}.py"
            graph[name] = imports_of(path, name)
    # Resolve "from package import module" to the module, and drop names that are not modules.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if t in graph and t != name}
    # A package's __init__ may re-export its own modules: those edges are the package's own business.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not t.startswith(name + ".")}

    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


BLOCKER = """
import importlib, importlib.abc, json, sys
BLOCKED = set({blocked!r})

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or any(name.startswith(b + ".") for b in BLOCKED):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Block())
failed = {{}}
for module in {modules!r}:
    try:
        importlib.import_module(module)
    except Exception as exc:
        failed[module] = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps(failed))
"""


def import_with_blocked(modules: list[str], blocked: list[str]) -> dict[str, str]:
    script = BLOCKER.format(blocked=blocked, modules=modules)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_engine_imports_no_host() -> None:
    # The engine may use the TD client (vera_plugin.client: grpcio + protobuf), never a host application or the
    # host adapters and panel built on them.
    hosts = ["nuke", "nukescripts", "DaVinciResolveScript", "fusionscript", "PySide6", "vera_plugin.hosts"]
    hosts.append("vera_plugin.panel")
    assert import_with_blocked(module_names("vera_engine"), hosts) == {}


def test_the_plugin_imports_no_engine_or_torch() -> None:
    # A DCC's Python has grpcio and protobuf; the plugin must not reach for the engine's stack. The Nuke adapter
    # needs `nuke` and the panel PySide6, so they are left out here (tests/test_nuke.py and test_panel.py).
    modules = [
        m
        for m in module_names("vera_plugin")
        if not m.startswith(("vera_plugin.hosts.nuke", "vera_plugin.panel"))
    ]
    engine_side = [
        "torch",
        "diffusers",
        "transformers",
        "vera_engine",
        "OpenImageIO",
        "PyOpenColorIO",
        "safetensors",
    ]
    assert import_with_blocked(modules, engine_side) == {}
