"""kdqat students as Hugging Face quantized models: ``quant_method: "kdqat"`` in ``config.json``.

transformers' public extension points for quantization methods (``register_quantization_config`` /
``register_quantizer``, as torchao and compressed-tensors plug in) let ``from_pretrained`` rebuild a saved
student: the quantizer swaps in the fake-quant modules (:func:`~kdqat_dist.quant.api.prepare`) on the
skeleton before the weights load, so the learned steps load into their parameters, and marks the
activation steps as calibrated afterwards. ``import kdqat_dist`` registers it; then

    AutoModelForSequenceClassification.from_pretrained(student_dir)

returns the student ``kdqat eval`` scores, logit for logit. Without kdqat_dist imported transformers would
not know the method: it only logs "Unknown quantization type, got kdqat ... we will skip the quantization"
and builds the plain model from the latent full-precision weights, a different model. So a student's
``config.json`` also names a model type (and a problem type) plain transformers refuses
(:func:`kdqat_dist.files.guard_hf_config`, :mod:`kdqat_dist.quant.hf_config`): without kdqat_dist,
``from_pretrained`` raises instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from kdqat_dist.config import QuantConfig, build_section
from kdqat_dist.errors import ConfigError
from kdqat_dist.files import guard_config_file

# kdqat_dist.quant.api (torch, the model code) is imported where it is used: register() may run in the middle
# of transformers' own imports (kdqat_dist.quant.hf_register), where importing the model code would cycle.

QUANT_METHOD = "kdqat"
FORMAT_VERSION = 2  # 2: per-tensor LSQ steps have shape (1,); 1: they were 0-d


class KdqatQuantizationConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config``: the run's whole ``quant`` section (methods, bits,
    granularity, per-module rules, skips), so the student is rebuilt exactly as it was trained."""

    def __init__(
        self,
        quant: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        packed: str | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.quant = quant or {}
        self.format_version = format_version
        # an export folder of `kdqat export` (its codes are bit-packed, not float weights): from_pretrained
        # refuses it and names the loader
        self.packed = packed

    def quant_config(self) -> QuantConfig:
        return build_section(QuantConfig, self.quant, "quantization_config.quant")


class KdqatHfQuantizer(HfQuantizer):
    """Loads a saved kdqat student: fake-quant modules first, then the weights and learned steps."""

    requires_calibration = True  # only pre-quantized (trained) students load; nothing is quantized here
    is_trainable: bool = True
    is_qat_trainable: bool = True  # a loaded student can go on with quantization-aware training

    def validate_environment(self, *args, **kwargs):
        if self.quantization_config.packed:
            raise ConfigError(
                f"this folder is a packed kdqat export ({self.quantization_config.packed}): its weights are "
                "bit-packed integer codes, not a checkpoint from_pretrained can read; load it with "
                "kdqat_dist.export.load(folder) or run it with `kdqat predict --model folder`"
            )

    def _process_model_before_weight_loading(self, model, **kwargs):
        from kdqat_dist.quant.api import prepare

        prepare(model, self.quantization_config.quant_config())
        if self.quantization_config.format_version < 2:  # 0-d steps in the file: load them as they are
            _reshape_steps(model, (1,), ())
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from kdqat_dist.quant.api import mark_calibrated

        _reshape_steps(model, (), (1,))
        mark_calibrated(model)
        return model

    def is_serializable(self, **kwargs) -> bool:
        return True


def save_config(config, out_dir: str | Path) -> None:
    """Write a student's ``config.json`` into ``out_dir``: ``config`` (a transformers config holding the
    ``kdqat`` quantization_config) as plain transformers refuses it (:func:`kdqat_dist.files.guard_hf_config`)
    and kdqat_dist's registered model type reads it back (:mod:`kdqat_dist.quant.hf_config`)."""
    config.save_pretrained(out_dir)
    guard_config_file(Path(out_dir) / "config.json")


def register() -> None:
    """Register the method with transformers (idempotent: a second import or a reload is a no-op)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        register_quantization_config(QUANT_METHOD)(KdqatQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        register_quantizer(QUANT_METHOD)(KdqatHfQuantizer)


def _reshape_steps(model, old: tuple[int, ...], new: tuple[int, ...]) -> None:
    """Give the learned steps of shape ``old`` the shape ``new`` (same values)."""
    from kdqat_dist.quant.api import fake_quantizers

    for _, q in fake_quantizers(model):
        if q.quantizer.learned and tuple(q.step.shape) == old:
            q.step.data = q.step.data.reshape(new)
