"""The import graph of the package as its source states it (every import, at module level
or inside a function), for the architecture tests."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

# Third-party packages whose import takes a noticeable part of a second or more: a module that
# imports them inside a function, and not at its top, defers them (a good reason to).
HEAVY = frozenset({"torch", "torchvision", "torch_pruning", "mlflow", "optuna", "onnx", "onnxruntime", "sklearn",
                   "timm", "matplotlib", "sqlalchemy", "scipy", "PIL", "safetensors", "numpy"})
IMPLIED = {"torch": {"numpy"}, "torchvision": {"torch", "numpy", "PIL"}, "torch_pruning": {"torch", "numpy"},
           "mlflow": {"numpy", "sqlalchemy"}, "optuna": {"numpy", "sqlalchemy"}, "onnxruntime": {"numpy"},
           "onnx": {"numpy"}, "sklearn": {"numpy", "scipy"}, "timm": {"torch", "torchvision"},
           "matplotlib": {"numpy", "PIL"}}


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@dataclass
class Import:
    module: str  # the importing module
    line: int
    targets: tuple[str, ...]  # mcp modules it imports
    function: str  # '' at module level


@dataclass
class Graph:
    modules: dict[str, Path]
    imports: list[Import] = field(default_factory=list)
    third_party: dict[str, set[str]] = field(default_factory=dict)  # module -> packages imported at its top

    def top(self, module: str) -> set[str]:
        """The mcp modules ``module`` imports at module level (its parent packages too)."""
        parts = module.split(".")
        parents = {".".join(parts[:i]) for i in range(1, len(parts))} & set(self.modules)
        return {t for i in self.imports if i.module == module and not i.function for t in i.targets} | parents

    def heavy(self, module: str, seen: set[str] | None = None) -> set[str]:
        """The heavy third-party packages importing ``module`` loads."""
        seen = set() if seen is None else seen
        if module in seen:
            return set()
        seen.add(module)
        found = {p for p in self.third_party.get(module, ()) if p in HEAVY}
        for target in self.top(module) - {module}:
            found |= self.heavy(target, seen)
        for package in list(found):
            found |= IMPLIED.get(package, set())
        return found


def _lazy_names(path: Path) -> dict[str, str]:
    """A package's ``_LAZY = {name: submodule}`` (names its ``__getattr__`` loads on use)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def build(root: Path, package: str = "mcp") -> Graph:
    modules = {module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}
    lazy = {m: _lazy_names(p) for m, p in modules.items() if p.name == "__init__.py"}
    graph = Graph(modules)
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        third: set[str] = set()
        functions = {id(n): f.name for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                     for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        checking = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and getattr(i.test, "id", "") ==
                    "TYPE_CHECKING" for n in ast.walk(i)}
        for node in ast.walk(tree):
            if id(node) in checking:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] == package:
                    for alias in node.names:
                        full = f"{node.module}.{alias.name}"
                        sub = lazy.get(node.module, {}).get(alias.name)
                        targets.append(full if full in modules else f"{node.module}.{sub}" if sub else node.module)
                elif id(node) not in functions:
                    third.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in modules]
                if id(node) not in functions:
                    third.update(a.name.split(".")[0] for a in node.names if a.name.split(".")[0] != package)
            if targets:
                graph.imports.append(Import(module, node.lineno, tuple(sorted(set(targets))), functions.get(id(node), "")))
        graph.third_party[module] = third
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected groups of two or more modules, counting every import (a
    module's implicit import of its parent packages aside)."""
    edges: dict[str, set[str]] = {m: set() for m in graph.modules}
    for i in graph.imports:
        parents = {".".join(i.module.split(".")[:k]) for k in range(1, i.module.count(".") + 1)}
        edges[i.module] |= set(i.targets) - parents - {i.module}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def needless_deferrals(graph: Graph) -> list[Import]:
    """Imports of mcp modules inside functions that defer no heavy third-party package: the
    importing module loads everything the imported one does already."""
    return [i for i in graph.imports if i.function and not (
        set().union(*(graph.heavy(t) for t in i.targets)) - graph.heavy(i.module))]
