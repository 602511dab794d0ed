"""The package's import graph, read from the source with ``ast``: no cycles, and each layer
imports only the layers below it (cli -> fs, server, narbridge -> services -> castore, store -> protos).

Imports under ``if TYPE_CHECKING:`` count too: a cycle hidden there is still two modules
that each need the other. Pure, fast, no imports of the package itself, so a cycle fails here
with its path rather than somewhere at start-up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tvixfs"

# What each layer may import from the package, besides itself (and the top-level modules).
ALLOWED = {
    "protos": set(),
    "castore": {"protos"},
    "store": {"castore", "protos"},
    "services": {"castore", "store", "protos"},
    "fs": {"services", "castore", "store", "protos"},
    "server": {"services", "castore", "store", "protos"},
    "narbridge": {"services", "castore", "store", "protos"},  # a server too: Nix's HTTP protocol
    "cli": {"fs", "server", "narbridge", "services", "castore", "store", "protos"},
}
# The pure model does no I/O and starts no threads: these modules have no business there.
IMPURE = {"threading", "concurrent", "multiprocessing", "subprocess", "socket", "sqlite3", "grpc", "trio"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _import_statements(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(modules of the package, top-level names of other packages) that ``module`` imports."""
    tree = ast.parse(MODULES[module].read_text())
    ours: set[str] = set()
    theirs: set[str] = set()
    for node in _import_statements(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: -node.level] if module in MODULES else []
                base = ".".join([*package, base] if base else package)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            if name == "tvixfs" or name.startswith("tvixfs."):
                known = name
                while known not in MODULES:
                    known = known.rpartition(".")[0]
                ours.add(known)
            else:
                theirs.add(name.partition(".")[0])
    ours.discard(module)
    return ours, theirs


GRAPH = {module: _imports(module)[0] for module in MODULES}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def test_the_import_graph_was_read() -> None:
    assert "tvixfs.fs.reader" in GRAPH
    assert "tvixfs.fs.chunkmap" in GRAPH["tvixfs.fs.reader"]


def test_no_import_cycles() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) is not None))
def test_layers_import_only_downwards(module: str) -> None:
    layer = _layer(module)
    assert layer is not None
    wrong = {
        target
        for target in GRAPH[module]
        if (other := _layer(target)) is not None and other != layer and other not in ALLOWED[layer]
    }
    assert not wrong, f"{module} ({layer}) imports {sorted(wrong)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in ("castore", "store")))
def test_the_model_is_pure(module: str) -> None:
    assert not _imports(module)[1] & IMPURE, f"{module} imports {sorted(_imports(module)[1] & IMPURE)}"
