"""Registering kdqat with transformers on ``import kdqat_dist``, without importing transformers then.

Two registrations, each needed before ``from_pretrained`` reads a student's ``config.json``:

- the model type ``kdqat_dist`` with ``AutoConfig`` (:mod:`kdqat_dist.quant.hf_config`: a student's
  config.json names it, so that transformers without kdqat_dist refuses the folder);
- ``quant_method: "kdqat"`` with :mod:`transformers.quantizers` (:mod:`kdqat_dist.quant.hf_quantizer`).

Importing transformers' quantizers costs seconds of CPU (they import torch and the auto-config tables), which
every ``kdqat`` command, ``kdqat --version`` included, would pay. So :func:`register_when_transformers_loads`
registers at once what transformers has already imported, and otherwise puts a finder on
:data:`sys.meta_path` that registers right after the module in question has been executed, before any code
can use it: ``from_pretrained`` cannot run without having imported both. Each registration imports only the
module just loaded (and what it has loaded) and kdqat's own light modules, so it is safe in the middle of
transformers' own imports.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType


def _register_config() -> None:
    from kdqat_dist.quant.hf_config import register

    register()


def _register_quantizer() -> None:
    from kdqat_dist.quant.hf_quantizer import register

    register()


# module transformers keeps a registry in -> what registers kdqat there
TARGETS = {
    "transformers.models.auto.configuration_auto": _register_config,  # AutoConfig's model types
    "transformers.quantizers": _register_quantizer,  # the quantization methods
}


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module of :data:`TARGETS` it asks the other finders, then wraps the loader
    so that the module's registration runs once the module has been executed. Removes itself when every
    target is registered."""

    def find_spec(self, fullname: str, path=None, target: ModuleType | None = None):
        if fullname not in TARGETS:
            return None
        others = [f for f in sys.meta_path if f is not self and hasattr(f, "find_spec")]
        spec = next((s for f in others if (s := f.find_spec(fullname, path, target)) is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            loader_exec(module)
            if all(name in sys.modules for name in TARGETS):
                _remove_hook()
            TARGETS[fullname]()

        spec.loader.exec_module = exec_module  # this spec's own loader object: nothing else changes
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def register_when_transformers_loads() -> None:
    """Register kdqat's model type and quantization method now where transformers has loaded their
    registries, else when it loads them."""
    for name, register in TARGETS.items():
        if name in sys.modules:
            register()
    if not all(name in sys.modules for name in TARGETS) and not any(
        isinstance(f, _RegisterAfterImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterAfterImport())
