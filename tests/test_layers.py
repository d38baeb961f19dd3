"""What may import what (docs/design.md "What may import what"), read from the source with ast.

Every import counts, the lazy ones inside functions and those under TYPE_CHECKING too: a lazy
import is still a dependency, only a later one. The runtime is the bottom layer; training and
export stand on it and never on each other; the benchmark stands on all of them.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vce_deploy", "train", "export", "bench")
# package -> the packages it may import (itself included)
ALLOWED = {
    "vce_deploy": {"vce_deploy"},
    "train": {"train", "vce_deploy"},
    "export": {"export", "vce_deploy"},
    "bench": {"bench", "vce_deploy", "export"},  # export: only bench/int8_formats.py, which builds its own QDQ forms
}


def _modules() -> dict[str, Path]:
    """dotted module name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:  # `from pkg import module` names a module, not only a package
                targets.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return {t for t in targets if t.split(".")[0] in PACKAGES and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        graph[name] = set()
        for target in _imports(name, path, modules):
            while target not in modules and "." in target:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read_from_the_source():
    """The walker itself: it must see lazy and relative imports, or the checks below prove nothing."""
    graph = _graph()
    assert "vce_deploy.contract" in graph["vce_deploy.backends.base"], "a relative import (..contract)"
    assert "vce_deploy.checkpoint" in graph["vce_deploy.backends.torch"], "a lazy import inside a method"
    assert "vce_deploy.nll" in graph["train.train"], "an absolute lazy import"
    assert "vce_deploy.backends.cuda" in graph["vce_deploy.backends.tensorrt"], "`from . import cuda`"


def test_no_import_points_up_a_layer():
    upward = [f"{name} -> {target}" for name, targets in _graph().items() for target in sorted(targets)
              if target.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert not upward, "imports that point up (or sideways) a layer:\n" + "\n".join(upward)


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", ["vce_deploy", "vce_deploy.cli", "vce_deploy.verify", "vce_deploy.nll",
                                    "vce_deploy.omniglot", "vce_deploy.bundle_swap"])
def test_the_runtime_imports_without_torch(module):
    code = (f"import sys, {module}; bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'cupy', "
            "'openvino', 'fastapi', 'ray', 'train', 'export', 'bench') if m in sys.modules]; assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
