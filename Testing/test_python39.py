"""The engine must import on Python 3.9 (Slicer 5.6/5.8), Windows and macOS (issue 7 bug 5).

Checks: vermin finds no construct newer than 3.9; no ``X | Y`` of types is evaluated at runtime
(vermin cannot tell a type union from an integer ``|`` outside annotations, so the AST is read
here); platform-only modules are imported only inside functions or ``try`` blocks; and, where a
Python 3.9 interpreter is installed, every file compiles with it.
"""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parent.parent / "DinoRegistration"
SOURCES = sorted(ENGINE.rglob("*.py"))
PLATFORM_ONLY = {"resource", "fcntl", "termios", "pwd", "grp", "winreg", "msvcrt", "_winapi"}


def vermin_command() -> list[str] | None:
    local = Path(sys.executable).with_name("vermin")
    if local.exists():
        return [str(local)]
    found = shutil.which("vermin")
    return [found] if found else None


def test_vermin_finds_nothing_newer_than_python_39():
    command = vermin_command()
    if command is None:
        pytest.skip("vermin is not installed (pip install vermin)")
    result = subprocess.run([*command, "--target=3.9-", "--no-tips", "--violations", "--no-parse-comments", str(ENGINE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def runtime_type_unions(tree: ast.AST) -> list[int]:
    """Lines where ``A | B`` joins type-like names (capitalised names, None, builtin types) outside
    annotations, e.g. ``Step = AffineMap | DenseField``, which raises TypeError before 3.10."""
    annotations = set()
    for node in ast.walk(tree):
        for child in [getattr(node, "annotation", None), getattr(node, "returns", None)]:
            if child is not None:
                annotations.update(id(n) for n in ast.walk(child))
    builtin_types = {"int", "float", "str", "bool", "bytes", "list", "dict", "tuple", "set", "type"}

    def type_like(node: ast.AST) -> bool:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return type_like(node.left) or type_like(node.right)
        if isinstance(node, ast.Constant):
            return node.value is None
        if isinstance(node, ast.Subscript):
            return type_like(node.value)
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        return name in builtin_types or (name[:1].isupper() and not name.isupper())

    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and id(node) not in annotations
            and type_like(node.left) and type_like(node.right)]


def unguarded_platform_imports(tree: ast.Module) -> list[int]:
    """Lines importing a platform-only module at module level outside a ``try`` block."""
    lines = []
    for node in tree.body:  # only top-level statements: function bodies and try blocks are guarded
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        if PLATFORM_ONLY.intersection(names):
            lines.append(node.lineno)
    return lines


def test_no_runtime_type_unions_and_no_unguarded_platform_modules():
    problems = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        problems += [f"{path.relative_to(ENGINE)}:{line}: X | Y of types at runtime" for line in runtime_type_unions(tree)]
        problems += [f"{path.relative_to(ENGINE)}:{line}: unguarded platform-only import"
                     for line in unguarded_platform_imports(tree)]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_broke_slicer_56():
    bad = ast.parse("import resource\nclass Affine: pass\nclass Dense: pass\nStep = Affine | Dense\nflags = 1 | 2\n"
                    "def f(x: Affine | None) -> int | None:\n    import fcntl\n    return None\n")
    assert runtime_type_unions(bad) == [4]
    assert unguarded_platform_imports(bad) == [1]


def python39() -> str | None:
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9"))) + [shutil.which("python3.9")]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "--version"], capture_output=True, text=True)
        if probe.returncode == 0 and "3.9" in probe.stdout + probe.stderr:
            return candidate
    return None


def test_every_file_compiles_with_python_39():
    interpreter = python39()
    if interpreter is None:
        pytest.skip("no Python 3.9 interpreter on this machine")
    script = ("import sys\nfor path in sys.argv[1:]:\n    compile(open(path, encoding='utf-8').read(), path, 'exec')\n")
    result = subprocess.run([interpreter, "-c", script, *map(str, SOURCES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_peak_memory_is_reported_in_megabytes():
    from dinoreg.peak_memory import peak_rss_mb

    import numpy as np

    block = np.ones(64 * 2**20 // 8)  # 64 MB touched
    peak = peak_rss_mb()
    assert peak is not None and 64 < peak < 100_000
    del block
