"""The package's shape, checked: layers import only downward, no cycles, small modules, no stray imports.

The dependency rule (docs/architecture.md): cli -> commands -> {state, checkpoint, runtime,
fingerprint}; state -> {checkpoint, runtime, fingerprint}; checkpoint -> {runtime,
fingerprint}; report sees only results (it imports nothing of fsdpck but errors and the
version); errors imports nothing of fsdpck. Read from the source with ``ast``, so a module
that is never imported in a test is checked too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fsdpck"
SCRIPTS = PACKAGE.parent / "scripts"
MAX_LINES = 500

# Which layers each layer may import (besides itself); every layer may read the version (__init__).
ALLOWED = {name: deps | {"__init__"} for name, deps in {
    "errors": set(),
    "fingerprint": {"errors"},
    "runtime": {"errors"},
    "checkpoint": {"errors", "runtime", "fingerprint"},
    "state": {"errors", "runtime", "fingerprint", "checkpoint"},
    "report": {"errors"},
    "commands": {"errors", "runtime", "fingerprint", "checkpoint", "state"},
    "cli": {"errors", "runtime", "report", "state", "commands"},
    "__init__": set(),
    "__main__": {"cli"},
}.items()}
# Function-level imports of fsdpck modules, each with its reason: a command's module is
# imported when the command runs (so `fsdpck --help` does not import torch), and optional
# extras are imported only where they are used.
LAZY_IMPORTS = {
    ("cli", "commands"): "a command imports its implementation when it runs: --help stays torch-free",
    ("cli", "report"): "an offline command's report (rich, its tables) is imported while its read runs, not before",
    ("checkpoint", "checkpoint.remote"): "the fsspec extra is imported only for URLs",
    ("checkpoint", "checkpoint.dcp_io"): "DCP's reader and writer import torch: opening a location does not",
    ("fingerprint", "fingerprint.triton_kernel"): "triton is optional and imported only for CUDA tensors",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        out[".".join(rel.parts)] = path
    return out


def layer(module: str) -> str:
    return module.split(".")[0]


def fsdpck_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported fsdpck module, at function level?) for every import of fsdpck in the file."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name.removeprefix("fsdpck.") or "__init__", inner) for a in child.names
                             if a.name == "fsdpck" or a.name.startswith("fsdpck."))
            elif isinstance(child, ast.ImportFrom) and child.module and (
                    child.module == "fsdpck" or child.module.startswith("fsdpck.")):
                base = child.module.removeprefix("fsdpck").lstrip(".")
                for alias in child.names:
                    target = f"{base}.{alias.name}" if base else alias.name
                    found.append((target if target.split(".")[0] in ALLOWED else (base or "__init__"), inner))
            visit(child, inner)

    visit(tree, False)
    return found


def resolve(target: str, known: dict[str, Path]) -> str:
    """The module an import names: ``state.registry.Flow`` -> ``state.registry``."""
    parts = target.split(".")
    while parts and ".".join(parts) not in known and ".".join(parts + ["__init__"]) not in known:
        parts.pop()
    return ".".join(parts) if parts else "__init__"


def test_layers_import_only_downward_and_no_stray_lazy_imports():
    known = modules()
    bad = []
    for module, path in known.items():
        for target, nested in fsdpck_imports(path):
            target_mod = resolve(target, known)
            src, dst = layer(module), layer(target_mod)
            if src != dst and dst not in ALLOWED[src]:
                bad.append(f"{module} imports {target_mod}: {src} may not import {dst}")
            if nested and src != "__init__":
                reason = LAZY_IMPORTS.get((src, dst)) or LAZY_IMPORTS.get((src, target_mod))
                if reason is None:
                    bad.append(f"{module} imports {target_mod} inside a function: import it at the top")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    known = modules()
    graph = {m: {resolve(t, known) for t, nested in fsdpck_imports(p) if not nested} - {m} for m, p in known.items()}
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    for m in graph:
        if m.endswith(".__init__") or m == "__init__":
            prefix = m.removesuffix("__init__")
            graph[m] = {t for t in graph[m] if not t.startswith(prefix) or not prefix}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def dfs(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt])
                return True
            if nxt not in state and dfs(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for m in sorted(graph):
        if m not in state and dfs(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")) + sorted(SCRIPTS.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it (limit {MAX_LINES})"


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The layer check can fail: a report module importing a command is caught."""
    fake = tmp_path / "fsdpck"
    (fake / "report").mkdir(parents=True)
    (fake / "commands").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "report" / "bad.py").write_text("from fsdpck.commands.verify import run_verify\n")
    (fake / "commands" / "verify.py").write_text("def run_verify():\n    pass\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match="report may not import commands"):
        test_layers_import_only_downward_and_no_stray_lazy_imports()
