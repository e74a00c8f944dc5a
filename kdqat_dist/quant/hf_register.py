"""Registering ``quant_method: "kdqat"`` with transformers on ``import kdqat_dist``, without importing
transformers then.

transformers looks a quantization method up in :mod:`transformers.quantizers` (``AutoHfQuantizer``), so the
method has to be registered before ``from_pretrained`` reads a student's ``config.json``, not at
``import kdqat_dist``. Importing transformers' quantizers costs seconds of CPU (they import torch and the
auto-config tables), which every ``kdqat`` command, ``kdqat --version`` included, would pay.

So :func:`register_when_transformers_loads` registers at once when ``transformers.quantizers`` is already
imported, and otherwise puts a finder on :data:`sys.meta_path` that registers right after that package has
been executed, before any code can use it: ``from_pretrained`` cannot run without having imported it.
The registration itself (:func:`kdqat_dist.quant.hf_quantizer.register`) imports only the package just
loaded and kdqat's config types, so it is safe in the middle of transformers' own imports.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

TARGET = "transformers.quantizers"  # where transformers keeps its registry of quantization methods


def _register() -> None:
    from kdqat_dist.quant.hf_quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for :data:`TARGET` it asks the other finders, then wraps the loader so that
    :func:`_register` runs once the package has been executed. Removes itself when it has done so."""

    def find_spec(self, fullname: str, path=None, target: ModuleType | None = None):
        if fullname != TARGET:
            return None
        others = [f for f in sys.meta_path if f is not self and hasattr(f, "find_spec")]
        spec = next((s for f in others if (s := f.find_spec(fullname, path, target)) is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            loader_exec(module)
            _remove_hook()
            _register()

        spec.loader.exec_module = exec_module  # this spec's own loader object: nothing else changes
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def register_when_transformers_loads() -> None:
    """Register the ``kdqat`` method now if transformers' quantizers are loaded, else when they load."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
