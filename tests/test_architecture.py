"""The layers of ARCHITECTURE.md, checked on the import graph of xmgie_core and nodes (every import statement,
also those inside functions): the core imports no host adapter and no application, a host adapter no application
and no other host, and no two modules import each other, directly or around a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("xmgie_core", "nodes")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The pack's modules `path` imports (relative imports resolved; `from pkg import mod` counted as pkg.mod)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                if anchor and anchor[0] == "nodes" and base.startswith("xmgie_core"):
                    anchor = []  # nodes/ reaches xmgie_core as a sibling package (..xmgie_core)
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


MODULES = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def layer(module: str) -> str:
    if module.startswith("nodes"):
        return "nodes"
    if module.startswith("xmgie_core.apps") or module == "xmgie_core.__main__":  # `python -m xmgie_core`
        return "apps"
    if module.startswith("xmgie_core.hosts.comfy"):
        return "hosts.comfy"
    if module.startswith("xmgie_core.hosts.diffusers"):
        return "hosts.diffusers"
    return "core"


ALLOWED = {
    "core": {"core"},
    "hosts.comfy": {"core", "hosts.comfy"},
    "hosts.diffusers": {"core", "hosts.diffusers"},
    "apps": {"core", "hosts.comfy", "hosts.diffusers", "apps"},
    "nodes": {"core", "hosts.comfy", "nodes"},
}


def test_the_graph_sees_the_pack():
    assert "xmgie_core.cam" in GRAPH["xmgie_core.hosts.comfy.cam"]
    assert "xmgie_core.hosts.comfy.pfb" in GRAPH["nodes.pfb"]
    assert len(MODULES) > 80


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_its_own_layer_and_below(module):
    wrong = sorted(m for m in GRAPH[module] if layer(m) not in ALLOWED[layer(module)])
    assert not wrong, f"{module} ({layer(module)}) imports {wrong}: see ARCHITECTURE.md for what may import what"


def test_no_import_cycles():
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    cycles = [c for c in cycles if not _package_init_cycle(c)]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _package_init_cycle(cycle: list[str]) -> bool:
    """A package's __init__ importing its own submodules, which import the package: Python's normal layout."""
    return any(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:]))
