"""The components meant for upstreaming into Lightly are self-contained.

Each imports, transitively within ``lightly_cotap``, only the standard library,
torch, torchvision, lightly, timm and other such components (no command-line,
data, evaluation, training or mmseg code), and its source runs on Python 3.8,
the oldest Python that Lightly supports. Components are named by their public
names, so the check follows them wherever their modules move.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

# PIL: transforms take PIL images, as Lightly's and torchvision's do (both need it).
ALLOWED_PACKAGES = {"torch", "torchvision", "lightly", "timm", "PIL"}
# Parts of lightly_cotap that a component must not import (directly or not).
RECIPE_MODULES = (
    "lightly_cotap.atomic_write",
    "lightly_cotap.cli",
    "lightly_cotap.data",
    "lightly_cotap.eval",
    "lightly_cotap.export",
    "lightly_cotap.mmseg",
    "lightly_cotap.mmseg_config",
    "lightly_cotap.train",
    "lightly_cotap.user_errors",
)
COMPONENTS = {
    "lightly_cotap.loss": (
        "ContinuousAPLoss",
        "CoTAPLoss",
        "DSALoss",
        "CoSSLLoss",
        "MultiPatchVICRegLoss",
        "ClassAwareNTXentLoss",
    ),
    "lightly_cotap.models.modules": (
        "CoTAPPatchProjectionHead",
        "CoTAPClsProjectionHead",
        "CoSSLLocalProjectionHead",
        "CoSSLLocalPredictionHead",
        "ObjectAwareFilter",
        "DSARegulator",
        "BagOfPatchesAggregator",
        "PrototypeBank",
    ),
    "lightly_cotap.models": ("cap_receptive_field",),
    "lightly_cotap.transforms": ("CoTAPTransform", "BagSSLTransform"),
}
ROOT = Path(__file__).resolve().parents[1]
COMPONENT_NAMES = [(pkg, name) for pkg, names in COMPONENTS.items() for name in names]
# Builtin and collections.abc generics: subscripting them at run time needs 3.9.
BUILTIN_GENERICS = {"dict", "frozenset", "list", "set", "tuple", "type"}
ABC_GENERICS = {"Callable", "Iterable", "Iterator", "Mapping", "Sequence"}
RUNTIME_UNION_OPERANDS = {"None", "bool", "bytes", "float", "int", "str"}


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _imports(module: str) -> list[tuple[str, int]]:
    """Modules that ``module`` imports, with the line; names resolved to modules.

    ``from package import Name`` of a lightly_cotap package counts as an import of
    the module that defines ``Name``.
    """
    path = _module_file(module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if base.split(".")[0] != "lightly_cotap":
                    found.append((base, node.lineno))
                elif _is_module(target):
                    found.append((target, node.lineno))
                else:
                    obj = getattr(importlib.import_module(base), alias.name)
                    found.append((getattr(obj, "__module__", base), node.lineno))
    return found


def _closure(module: str) -> tuple[list[str], list[str]]:
    """lightly_cotap modules reached from ``module``, and the import violations."""
    seen: list[str] = []
    violations: list[str] = []
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        for imported, line in _imports(current):
            top = imported.split(".")[0]
            where = (
                f"{_module_file(current).relative_to(ROOT)}:{line} imports {imported}"
            )
            if top == "lightly_cotap":
                if imported == "lightly_cotap" or imported.startswith(
                    tuple(m for r in RECIPE_MODULES for m in (r + ".", r))
                ):
                    violations.append(where)
                else:
                    todo.append(imported)
            elif top not in ALLOWED_PACKAGES and top not in sys.stdlib_module_names:
                violations.append(where)
    return seen, violations


def _defining_module(package: str, name: str) -> str:
    module: str = getattr(importlib.import_module(package), name).__module__
    return module


@pytest.mark.parametrize(("package", "name"), COMPONENT_NAMES, ids=lambda v: v)
def test_component_imports_only_lightly_torch_timm(package: str, name: str) -> None:
    _, violations = _closure(_defining_module(package, name))
    assert not violations, "\n".join(violations)


def _runtime_violations(path: Path) -> list[str]:
    """Python >= 3.9 syntax evaluated at run time, which vermin does not report.

    Annotations are skipped: with ``from __future__ import annotations`` they are
    never evaluated.
    """
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        annotations: list[ast.expr | None] = []
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            every_arg = [*args.posonlyargs, *args.args, *args.kwonlyargs]
            every_arg += [arg for arg in (args.vararg, args.kwarg) if arg is not None]
            annotations += [node.returns, *(arg.annotation for arg in every_arg)]
        for annotation in annotations:
            if annotation is not None:
                skip.update(id(sub) for sub in ast.walk(annotation))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Subscript):
            value = node.value
            name = value.id if isinstance(value, ast.Name) else None
            attr = value.attr if isinstance(value, ast.Attribute) else None
            if name in BUILTIN_GENERICS or (name or attr) in ABC_GENERICS:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)} (3.9)")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            operands = [ast.unparse(node.left), ast.unparse(node.right)]
            if RUNTIME_UNION_OPERANDS & set(operands):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)} (3.10)")
    return found


@pytest.mark.parametrize(("package", "name"), COMPONENT_NAMES, ids=lambda v: v)
def test_component_source_runs_on_python_3_8(package: str, name: str) -> None:
    modules, _ = _closure(_defining_module(package, name))
    files = [_module_file(module) for module in modules]
    for path in files:
        assert "from __future__ import annotations" in path.read_text(), path
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from vermin import main; sys.exit(main())",
            "-t=3.8-",
            "--no-tips",
            "--violations",
            "--no-parse-comments",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    runtime = [v for path in files for v in _runtime_violations(path)]
    assert not runtime, "\n".join(runtime)


def test_checks_find_what_they_forbid(tmp_path: Path) -> None:
    path = tmp_path / "new_syntax.py"
    path.write_text(
        "from __future__ import annotations\n"
        "Box = tuple[int, int]\n"
        "def f(x: int | None) -> list[int]:\n"
        "    return isinstance(x, int | None)\n"
    )
    assert [v.split(": ")[1] for v in _runtime_violations(path)] == [
        "tuple[int, int] (3.9)",
        "int | None (3.10)",
    ]
    _, violations = _closure("lightly_cotap.train.cotap_module")
    assert any(v.endswith("imports pytorch_lightning") for v in violations)
    _, violations = _closure("lightly_cotap.cli")
    assert any(v.split(" imports ")[1].startswith(RECIPE_MODULES) for v in violations)


@pytest.mark.parametrize(("package", "name"), COMPONENT_NAMES, ids=lambda v: v)
def test_every_module_a_component_needs_is_mapped_in_upstream_md(
    package: str, name: str
) -> None:
    upstream = (ROOT / "docs" / "upstream.md").read_text()
    modules, _ = _closure(_defining_module(package, name))
    files = [
        str(_module_file(m).relative_to(ROOT))
        for m in modules
        if not _module_file(m).name == "__init__.py"
    ]
    unmapped = [f for f in files if f"`{f}`" not in upstream]
    assert not unmapped, f"{name} needs files docs/upstream.md does not map: {unmapped}"
