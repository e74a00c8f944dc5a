"""The package's dependency order, checked on the source: no module imports a layer above its own.

Bottom-up: errors (the exception types), config and files (leaf utilities), data, models, quant, distill,
engine, then the tools (tune, analysis, export), pipeline, cli, and the package root. A module may import
its own package and any lower layer; the tools do not import one another. Every import statement counts, also one inside
a function, and ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.
Only ``engine/`` imports DeepSpeed or ``torch.distributed``, and only ``tune/`` imports Ray.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kdqat_dist"

LAYERS = {
    "config": 0,
    "files": 0,
    "errors": -1,  # the exception types: a leaf that imports nothing of ours
    "data": 1,
    "run_folder": 1.5,  # a model folder's run and its config.yaml: task names from data, used by the tools
    "models": 2,
    "quant": 3,  # above models: prepare() walks the encoder's structure
    "distill": 4,
    "engine": 5,
    "tune": 6,
    "analysis": 6,
    "export": 6,
    "pipeline": 7,
    "cli": 8,
    "precheck": 8,  # the launch scripts' check before any rank starts (loads the config, not the models)
    "__init__": 9,  # kdqat_dist/__init__.py: the public facade
}
ONLY_IN = {"deepspeed": "engine", "torch.distributed": "engine", "ray": "tune"}


def _module_name(path: Path, pkg: Path = PKG) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The layer unit of a kdqat_dist module name: its subpackage, or ``__init__`` for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, pkg: Path = PKG) -> list[tuple[int, str, str | None]]:
    """(line, imported module, enclosing top-level function or None) of every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path, pkg)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = func
            if func is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and node is tree:
                inner = child.name
            if isinstance(child, ast.Import):
                out.extend((child.lineno, a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:  # `from pkg import sub` imports the submodule pkg.sub
                    sub = f"{base}.{a.name}"
                    file = pkg.parent / sub.replace(".", "/")
                    is_module = file.with_suffix(".py").exists() or (file / "__init__.py").exists()
                    external = not base.startswith("kdqat_dist")  # `from torch import distributed`
                    out.append((child.lineno, sub if is_module or external else base, inner))
            elif (
                isinstance(child, ast.Call)
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and (
                    (isinstance(child.func, ast.Name) and child.func.id == "__import__")
                    or (isinstance(child.func, ast.Attribute) and child.func.attr == "import_module")
                )
            ):
                if isinstance(child.args[0].value, str):
                    out.append((child.lineno, child.args[0].value, inner))
            visit(child, inner)

    visit(tree, None)
    return out


def violations(pkg: Path = PKG) -> list[str]:
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        me = _module_name(path, pkg)
        my_unit = _unit(me)
        rel = path.relative_to(pkg.parent)
        for line, target, _func in _imports(path, pkg):
            for banned, home in ONLY_IN.items():
                if (target == banned or target.startswith(banned + ".")) and my_unit != home:
                    bad.append(f"{rel}:{line}: imports {target} (only {home}/ may)")
            if not target.startswith("kdqat_dist") or target == "kdqat_dist":  # the root: __version__
                continue
            unit = _unit(target)
            if unit == my_unit:
                continue
            if LAYERS[unit] >= LAYERS[my_unit]:
                bad.append(f"{rel}:{line}: {my_unit} (layer {LAYERS[my_unit]}) imports {target} (layer {LAYERS[unit]})")
    return bad


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in PKG.rglob("*.py")}
    assert units <= set(LAYERS), f"add these to LAYERS: {sorted(units - set(LAYERS))}"


def test_no_module_imports_a_higher_layer():
    assert violations() == []


@pytest.mark.parametrize(
    "where,line,expected",
    [
        (
            "engine/loop.py",
            "def h():\n    from kdqat_dist import pipeline\n",
            "engine (layer 5) imports kdqat_dist.pip",
        ),
        ("models/attention.py", "from kdqat_dist.quant import api\n", "models (layer 2) imports kdqat_dist.quant.api"),
        ("export/cli.py", "from .. import pipeline\n", "export (layer 6) imports kdqat_dist.pipeline"),
        ("analysis/norms.py", "from kdqat_dist.export import load\n", "analysis (layer 6) imports kdqat_dist.export"),
        ("distill/losses.py", "import torch.distributed as dist\n", "imports torch.distributed (only engine/ may)"),
        ("data/loaders.py", "from torch import distributed\n", "imports torch.distributed (only engine/ may)"),
        ("quant/api.py", "def f():\n    import deepspeed\n", "imports deepspeed (only engine/ may)"),
        ("engine/loop.py", "import ray\n", "imports ray (only tune/ may)"),
        (
            "models/student.py",
            "def g():\n    from kdqat_dist.quant import student\n",
            "imports kdqat_dist.quant.student",
        ),
    ],
)
def test_the_check_catches_a_bad_import(tmp_path, where, line, expected):
    copy = tmp_path / "kdqat_dist"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / where
    target.write_text(target.read_text() + "\n\n" + line)
    found = violations(copy)
    assert any(expected in v for v in found), found
