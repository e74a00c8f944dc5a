"""The model type of a kdqat student's ``config.json`` (:data:`~kdqat_dist.files.KDQAT_MODEL_TYPE`), as
``AutoConfig`` reads it once kdqat_dist is imported.

A student folder's ``config.json`` names the model type ``kdqat_dist`` (its real one, e.g. ``bert``, under
``kdqat_model_type``): plain transformers does not know that type and refuses the folder
(:func:`kdqat_dist.files.guard_hf_config`). :class:`KdqatModelConfig` is registered under that type and
hands back the real config class's config (``BertConfig`` ...), ``quantization_config`` included; so
``AutoConfig`` / ``AutoModelFor*.from_pretrained`` see the same config as before and the ``kdqat``
quantizer (:mod:`kdqat_dist.quant.hf_quantizer`) rebuilds the student.

Imported by :mod:`kdqat_dist.quant.hf_register` right after transformers' ``configuration_auto`` has been
executed: this module imports only transformers' config base class, which that module has loaded.
"""

from __future__ import annotations

import sys

from transformers.configuration_utils import PreTrainedConfig

from kdqat_dist.files import KDQAT_MODEL_TYPE, unguard_hf_config

_AUTO = "transformers.models.auto.configuration_auto"


class KdqatModelConfig(PreTrainedConfig):
    """Never instantiated: :meth:`from_dict` returns the config of the real model type."""

    model_type = KDQAT_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        mapping = sys.modules[_AUTO].CONFIG_MAPPING
        real = unguard_hf_config(config_dict)
        kind = real.get("model_type")
        if kind == KDQAT_MODEL_TYPE or kind not in mapping:
            raise ValueError(
                f"config.json: a kdqat student of model type {kind!r}, which this transformers does not know "
                "(the folder is damaged, or needs a newer transformers)"
            )
        return mapping[kind].from_dict(real, **kwargs)


def register() -> None:
    """Register :class:`KdqatModelConfig` with ``AutoConfig`` (idempotent)."""
    sys.modules[_AUTO].AutoConfig.register(KDQAT_MODEL_TYPE, KdqatModelConfig, exist_ok=True)
