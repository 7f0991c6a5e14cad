"""The house rules of shared/DESIGN.md, measured on src/lowbit: import circles, private names imported across
modules, target names compared outside their registry, long functions, and imports of torch/onnx below the
front ends. tests/test_house.py asserts them; run this to see the numbers:

    python tools/house.py
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src"
TARGET_NAMES = ("ort", "trt", "qdq")
NUMPY_ONLY = ("lowbit.core", "lowbit.calib", "lowbit.recipe")  # never import torch or onnx
FRAMEWORKS = ("torch", "onnx", "onnxruntime")


def modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted((ROOT / "lowbit").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (path, ast.parse(path.read_text()))
    return out


def _imports(name: str, path: Path, tree: ast.Module):
    """(module imported, names, line) of every import in a module, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base) if node.level else node.module or ""
            yield module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def import_graph(mods) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, (path, tree) in mods.items():
        for module, names, _ in _imports(name, path, tree):
            for imported in names or [""]:
                full = f"{module}.{imported}" if imported else module
                target = full if full in mods else module
                if target in mods and target != name:
                    edges[name].add(target)
    return edges


def circles(mods) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    edges, index, low, stack, on, out = import_graph(mods), {}, {}, [], set(), []
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in mods:
        if v not in index:
            visit(v)
    return out


def private_imports(mods) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} {n}"
        for name, (path, tree) in mods.items()
        for module, names, line in _imports(name, path, tree)
        if module.startswith("lowbit")
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]


def target_comparisons(mods) -> list[str]:
    """Comparisons with a target's name (``== "trt"``, ``in ("ort", "trt")``) outside the targets' own files."""
    out = []
    for name, (path, tree) in mods.items():
        if name.startswith("lowbit.recipe.targets"):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            values = []
            for c in (node.left, *node.comparators):
                values += [e for e in getattr(c, "elts", [c]) if isinstance(e, ast.Constant)]
            if any(v.value in TARGET_NAMES for v in values):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def long_functions(mods, limit: int = 80) -> list[tuple[int, str]]:
    out = []
    for _, (path, tree) in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((n, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(out, reverse=True)


def framework_imports(mods) -> list[str]:
    """torch or onnx imported by a module that must stay NumPy-only."""
    return [
        f"{path.relative_to(ROOT)}:{line} {module}"
        for name, (path, tree) in mods.items()
        if name.startswith(NUMPY_ONLY)
        for module, _, line in _imports(name, path, tree)
        if module.split(".")[0] in ("torch", "onnx", "onnxruntime")
        or module.startswith(("lowbit.onnx", "lowbit.torch"))
    ]


def main() -> int:
    mods = modules()
    report = {
        "import circles": [" <-> ".join(c) for c in circles(mods)],
        "private names imported across modules": private_imports(mods),
        "target names compared outside lowbit/recipe/targets": target_comparisons(mods),
        "functions over 80 lines": [f"{n} lines: {where}" for n, where in long_functions(mods)],
        "torch/onnx imported below the front ends": framework_imports(mods),
    }
    for title, rows in report.items():
        print(f"{title}: {len(rows)}")
        for row in rows:
            print(f"  {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
