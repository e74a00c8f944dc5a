"""``prepare`` turns a Hugging Face encoder into the fake-quant student in place; ``convert`` turns that into
its integer form (:mod:`kdqat_dist.quant.integer`).

What is quantized (docs/algorithms.md §1.1), each choice overridable per module by ``quant.rules``:

- every ``nn.Linear`` -> :class:`QuantLinear` (weight: ``quant.weight``, input: ``quant.act``), except
  modules matching ``quant.skip`` (the classifier by default);
- the word embedding table -> :class:`QuantEmbedding` (``quant.embedding``: row-wise ternary);
- the attention matmuls: Q, K, V and the probabilities through ``quant.attention`` (8-bit), inside our
  registered attention function;
- with ``quant.subln``, a fresh LayerNorm in front of each attention output and FFN down projection
  (:mod:`kdqat_dist.models.subln`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import torch
from torch import nn

from kdqat_dist.config import ActQuantConfig, QuantConfig, QuantRule, WeightQuantConfig
from kdqat_dist.models.attention import use_kdqat_attention
from kdqat_dist.models.encoders import embeddings_module, encoder_layers
from kdqat_dist.models.subln import insert_subln
from kdqat_dist.models.taps import self_attention_module
from kdqat_dist.quant.fake_quant import (
    ActFakeQuant,
    AttentionQuant,
    QuantEmbedding,
    QuantLinear,
    WeightFakeQuant,
)
from kdqat_dist.quant.integer import (
    QuantizedAct,
    QuantizedAttention,
    QuantizedEmbedding,
    QuantizedInputLinear,
    QuantizedLinear,
)


def _rule_for(name: str, cfg: QuantConfig) -> QuantRule | None:
    for rule in cfg.rules:
        if re.search(rule.pattern, name):
            return rule
    if any(re.search(p, name) for p in cfg.skip):
        return QuantRule(pattern="<skip>", quantize=False)
    return None


def _weight_cfg(base: WeightQuantConfig, rule: QuantRule | None) -> WeightQuantConfig:
    if rule is None:
        return base
    changes = {}
    if rule.weight_bits is not None:
        changes["bits"] = rule.weight_bits
        # TWN, absmean and SEQ are 1.58/2-bit only: asking for more bits on such a default means max-abs uniform.
        if rule.weight_bits != 2 and base.method in ("twn", "absmean", "seq") and rule.weight_method is None:
            changes["method"] = "sym"
    if rule.weight_method is not None:
        changes["method"] = rule.weight_method
    if rule.weight_granularity is not None:
        changes["granularity"] = rule.weight_granularity
    return dataclasses.replace(base, **changes)


def _act_cfg(base: ActQuantConfig, rule: QuantRule | None) -> ActQuantConfig:
    if rule is None:
        return base
    changes = {}
    if rule.act_bits is not None:
        changes["bits"] = rule.act_bits
    if rule.act_enabled is not None:
        changes["enabled"] = rule.act_enabled
    return dataclasses.replace(base, **changes)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def prepare(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Swap in fake-quant modules in place, reusing the Parameter objects; returns ``model``.

    Weight statistics (TWN Δ/α, max-abs) are recomputed from the latent weights at every forward, so
    they are exact under ZeRO-3 too (the full weight is gathered for the forward). LSQ steps are
    initialised here from the whole weights, so call ``prepare`` before the model is partitioned.

    Raises:
        ConfigError (a ValueError): a quantization method that does not exist, naming the allowed ones.
    """
    if not cfg.enabled:
        return model
    emb = embeddings_module(model).word_embeddings
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            continue
        if isinstance(module, nn.Linear):
            rule = _rule_for(name, cfg)
            if rule is not None and not rule.quantize:
                continue
            wcfg, acfg = _weight_cfg(cfg.weight, rule), _act_cfg(cfg.act, rule)
            wq = WeightFakeQuant(wcfg, module.weight) if wcfg.enabled else None
            aq = ActFakeQuant(acfg) if acfg.enabled else None
            _set_submodule(model, name, QuantLinear.from_linear(module, wq, aq))
        elif module is emb and cfg.quantize_embedding:
            rule = _rule_for(name, cfg)
            if rule is not None and not rule.quantize:
                continue
            wcfg = _weight_cfg(cfg.embedding, rule)
            _set_submodule(model, name, QuantEmbedding.from_embedding(module, WeightFakeQuant(wcfg, module.weight)))
    for layer in encoder_layers(model):
        attn = self_attention_module(layer)
        if not isinstance(getattr(attn, "attn_quant", None), AttentionQuant):
            attn.attn_quant = AttentionQuant(cfg.attention)
    if cfg.subln:  # after the swap, so quant.rules and quant.skip see the projections' usual names
        insert_subln(model)
    use_kdqat_attention(model)
    return model


def fake_quantizers(model: nn.Module) -> Iterator[tuple[str, WeightFakeQuant | ActFakeQuant]]:
    for name, m in model.named_modules():
        if isinstance(m, (WeightFakeQuant, ActFakeQuant)):
            yield name, m


def set_quant_enabled(model: nn.Module, enabled: bool, weights: bool = True, acts: bool = True) -> None:
    """Switch fake quantization on or off (off gives back the full-precision model exactly)."""
    for _, q in fake_quantizers(model):
        if (isinstance(q, WeightFakeQuant) and weights) or (isinstance(q, ActFakeQuant) and acts):
            q.enabled = enabled and q.cfg.enabled


def mark_calibrated(model: nn.Module) -> None:
    """Mark every LSQ activation step as calibrated: a loaded student's steps are learned values, which a
    first forward must not re-initialise."""
    for m in model.modules():
        if isinstance(m, ActFakeQuant) and hasattr(m, "initialized"):
            m.initialized.fill_(True)


def is_prepared(model: nn.Module) -> bool:
    return any(True for _ in fake_quantizers(model))


def quant_param_names(model: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """Learned step sizes and the top level Q_P of their quantizers: ({weight step name: Q_P},
    {activation step name: Q_P}), for their own learning rates."""
    w, a = {}, {}
    for name, q in fake_quantizers(model):
        if q.quantizer.learned:
            (w if isinstance(q, WeightFakeQuant) else a)[f"{name}.step"] = q.quantizer.levels[1]
    return w, a


@torch.no_grad()
def calibrate_activations(model: nn.Module, batch: dict) -> int:
    """Initialise every LSQ activation step on one batch (KDLSQ-BERT calibrates on one batch).

    Returns the number of quantizers initialised. Sym (dynamic) quantizers need no calibration.
    """
    lsq = [q for _, q in fake_quantizers(model) if isinstance(q, ActFakeQuant) and q.quantizer.learned]
    for q in lsq:
        q.initialized.fill_(False)
    was_training = model.training
    model.eval()
    model(**{k: v for k, v in batch.items() if k != "labels"})
    model.train(was_training)
    return len(lsq)


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """Swap every fake-quant module of a prepared student for its integer form, in place; returns ``model``.

    As torchao's ``QATConfig(step="convert")``: each :class:`QuantLinear` becomes a
    :class:`~kdqat_dist.quant.integer.QuantizedLinear` holding integer codes, scales, the bias and its input's
    activation quantizer (a :class:`~kdqat_dist.quant.integer.QuantizedInputLinear` when a rule left the
    weight in full precision), the quantized word embedding a
    :class:`~kdqat_dist.quant.integer.QuantizedEmbedding`, and each attention's quantizers a
    :class:`~kdqat_dist.quant.integer.QuantizedAttention`. The converted model computes the fake-quant
    student's logits (bit for bit where training multiplies codes by the scale, within float rounding
    where it divides: max-abs weights), holds no latent float weights and no autograd quantizers, and
    traces with ``torch.export`` and ``torch.onnx.export``. Quantizers switched off (``set_quant_enabled``)
    stay off: their modules keep full precision. ``to_linear()`` / ``to_embedding()`` on the new modules give
    plain float modules back. Learned steps are read as they are: an uncalibrated LSQ activation step is a
    bug of the caller (see :func:`mark_calibrated`).
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            wq, aq = m.weight_quant, QuantizedAct.from_fake_quant(m.act_quant)
            if wq is not None and wq.enabled:
                new = QuantizedLinear.from_fake_quant(m)
            elif aq is not None:
                new = QuantizedInputLinear.from_fake_quant(m, aq)
            else:
                new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                new.weight, new.bias = m.weight, m.bias
            _set_submodule(model, name, new)
        elif isinstance(m, QuantEmbedding):
            wq = m.weight_quant
            if wq is not None and wq.enabled:
                if m.max_norm is not None:  # renormalising rows in place cannot work on integer codes
                    raise ValueError(f"convert: {name} has max_norm set; an integer embedding cannot renormalise")
                _set_submodule(model, name, QuantizedEmbedding.from_fake_quant(m))
            else:
                emb = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
                emb.weight = m.weight
                _set_submodule(model, name, emb)
        elif isinstance(m, AttentionQuant):
            _set_submodule(model, name, QuantizedAttention.from_fake_quant(m))
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` holds integer-form modules (:func:`convert` ran on it)."""
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding, QuantizedAttention)) for m in model.modules())
