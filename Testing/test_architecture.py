"""The engine's import contract (issue 16), read from the source with ``ast``: nothing is imported.

- Layers point down only: a module may import its own layer's package and the layers below it,
  never a layer above; two packages sharing a layer (e.g. ``networks`` and ``losses``) are
  independent of each other.
- No circles between modules, counting imports inside functions too (they are arrows all the same).
- The engine never imports the Slicer side (``DinoRegistrationLib``), Slicer, Qt, CTK or VTK.
- An import inside a function says why in a comment on its line (a heavy or optional package kept
  off start-up, or a platform-specific one), unless a ``try`` guards it.

The same rules hold for every module added later: a new top-level folder must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[1] / "DinoRegistration" / "dinoreg"

#: top (may import everything below) to bottom; "" is the package itself (dinoreg/__init__.py)
LAYERS: list[tuple[str, ...]] = [
    ("cli", "__main__"),
    ("app",),
    ("training",),
    ("data", "report"),
    ("methods",),
    ("networks", "losses"),
    ("features", "optim"),
    ("store", "io"),
    ("core",),
    ("errors", "progress", "peak_memory", "requirements", ""),
]
#: layers whose packages must not import each other (the others are one idea split in modules)
INDEPENDENT = {("data", "report"), ("networks", "losses"), ("features", "optim"), ("store", "io")}
FORBIDDEN = ("DinoRegistrationLib", "slicer", "qt", "ctk", "vtk", "PythonQt", "mrml")


def engine_modules() -> dict[str, Path]:
    """Dotted module name (``dinoreg.core.volume``) -> file."""
    modules = {}
    for path in sorted(ENGINE.rglob("*.py")):
        parts = ("dinoreg",) + path.relative_to(ENGINE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = engine_modules()


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, top-level part) of an engine module; fails for a module no layer names."""
    top = module.split(".")[1] if module.count(".") >= 1 else ""
    for index, members in enumerate(LAYERS):
        if top in members:
            return index, top
    raise AssertionError(f"{module}: its top-level part '{top}' has no layer in {__file__} (add it to LAYERS)")


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(imported dotted name, node, inside a function) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node, id(node) in in_function) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node, path.name == "__init__.py")
            found.append((target, node, id(node) in in_function))
            found += [(f"{target}.{alias.name}", node, id(node) in in_function) for alias in node.names
                      if f"{target}.{alias.name}" in MODULES]
    return found


def internal_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {module: set() for module in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in imports_of(module, path):
            if target in MODULES and target != module:
                edges[module].add(target)
    return edges


EDGES = internal_edges()


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_layers_point_down_and_siblings_are_independent():
    problems = []
    for module, targets in EDGES.items():
        own, own_top = layer_of(module)
        for target in targets:
            other, other_top = layer_of(target)
            if other < own:
                problems.append(f"{module} -> {target} (up: layer {LAYERS[own]} imports {LAYERS[other]})")
            elif other == own and other_top != own_top and LAYERS[own] in INDEPENDENT:
                problems.append(f"{module} -> {target} (sideways: {own_top} and {other_top} must be independent)")
    assert not problems, "\n".join(sorted(problems))


def test_no_circles_between_modules():
    """Tarjan's strongly connected components over every import, including those inside functions."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in EDGES[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert not cycles, f"import circles: {cycles}"


def test_the_engine_never_imports_the_slicer_side_or_a_gui():
    bad = [f"{module}: {target}" for module, path in MODULES.items() for target, _, _ in imports_of(module, path)
           if target.split(".")[0] in FORBIDDEN]
    assert not bad, bad


def test_imports_inside_functions_say_why():
    missing = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        guarded = {n.lineno for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)
                   if isinstance(n, (ast.Import, ast.ImportFrom))}
        for target, node, inside in imports_of(module, path):
            if inside and node.lineno not in guarded and not any("#" in line for line in lines[node.lineno - 1:node.end_lineno]):
                missing.append(f"{path.relative_to(ENGINE.parent)}:{node.lineno} {target}")
    assert not missing, "function-local imports without a reason:\n" + "\n".join(sorted(set(missing)))


def test_the_contract_catches_an_upward_arrow(tmp_path, monkeypatch):
    """The checker itself: a core module importing the app layer is reported."""
    module = "dinoreg.core.volume"
    fake = tmp_path / "volume.py"
    fake.write_text("from dinoreg.app.pipeline import register\n")
    monkeypatch.setitem(MODULES, module, fake)
    monkeypatch.setitem(EDGES, module, {t for t, _, _ in imports_of(module, fake) if t in MODULES})
    with pytest.raises(AssertionError, match="up: layer"):
        test_layers_point_down_and_siblings_are_independent()


def test_import_dinoreg_is_cheap_and_its_public_names_resolve():
    """``import dinoreg`` loads no torch; every public name comes from the module that defines it."""
    import subprocess
    import sys

    code = ("import sys, dinoreg; assert 'torch' not in sys.modules, 'torch loaded'; "
            "names = [getattr(dinoreg, n) for n in dinoreg.__all__]; "
            "assert dinoreg.register.__module__ == 'dinoreg.app.pipeline'; print(len(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(__import__("dinoreg").__all__)
