"""kdqat-dist: quantization-aware training of BERT-class encoders with knowledge distillation.

Public API (resolved on first use, PEP 562: this file runs before any submodule is imported, so it imports
nothing heavy; ``kdqat --version`` stays a fraction of a second):

- :func:`prepare` / :func:`convert`: fake-quant student in place / its integer form (int8 codes + scales);
- :class:`DistillObjective`: the KD objective with the streaming teacher (``for_models`` builds it);
- :func:`load_config`: the typed run configuration;
- :func:`build_run` / :func:`make_backend`: a run (data, models, objective, optimizer) on its engine, as
  ``kdqat train`` builds it.
"""

from __future__ import annotations

import importlib

from kdqat_dist.quant.hf_register import register_when_transformers_loads

__version__ = "0.1.0"

# `import kdqat_dist` makes transformers' from_pretrained understand a student folder's
# quantization_config (quant_method "kdqat"): see kdqat_dist.quant.hf_quantizer. The method is registered
# when transformers' quantizers load (now, if they are loaded), so that this import stays cheap.
register_when_transformers_loads()

_LAZY = {
    "prepare": "kdqat_dist.quant.api",
    "convert": "kdqat_dist.quant.api",
    "set_quant_enabled": "kdqat_dist.quant.api",
    "DistillObjective": "kdqat_dist.distill.objective",
    "load_config": "kdqat_dist.config",
    "RunConfig": "kdqat_dist.config",
    "build_run": "kdqat_dist.engine.build",
    "make_backend": "kdqat_dist.engine.build",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdqat_dist' has no attribute {name!r}")


__all__ = list(_LAZY)
