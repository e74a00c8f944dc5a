"""BERT with SubLN, for transformers' remote code: copied as ``modeling_bert_subln.py`` beside the weights
of ``kdqat export --format hf-bitnet`` when the student has SubLN (``quant.subln``, the
``bitdistill_w158a8`` recipe). It needs torch and transformers only, never kdqat_dist.

SubLN puts a LayerNorm in front of every layer's attention output projection and FFN down projection:

    attention.output.dense:  ctx -> W_o · LN_sub(ctx) + b_o
    output.dense:            h   -> W_down · LN_sub(h) + b_down

``BertModel`` has no module there, and no other computation it has gives ``LN_sub`` (a per-token
normalisation in front of a per-token quantized input), so these models load with
``trust_remote_code=True`` only. The projections are ``nn.Linear`` here: transformers' BitNet quantization
(``quantization_config`` in ``config.json``) swaps them for its ``BitLinear`` as it does every other Linear.

Parameter names follow kdqat's ``SubLNLinear`` (``<dense>.LayerNorm.*``, ``<dense>.linear.*``). One class per
task head: sequence classification, token classification and extractive QA (``config.json``'s
``auto_map`` names the one of the export).
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

# config.json's hidden_size holds a text (BertConfig checks that it is an int: BertForSequenceClassification
# .from_pretrained on this folder fails on it instead of building BERT without the SubLNs); the real value is
# kept under this key
REAL_HIDDEN_SIZE = "subln_hidden_size"


class BertSubLNConfig(BertConfig):
    model_type = "bert_subln"

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        if REAL_HIDDEN_SIZE in config_dict:
            real = config_dict[REAL_HIDDEN_SIZE]
            config_dict = {k: v for k, v in config_dict.items() if k != REAL_HIDDEN_SIZE}
            config_dict["hidden_size"] = real
        return super().from_dict(config_dict, **kwargs)


class SubLNLinear(nn.Module):
    """``linear(LayerNorm(x))``."""

    def __init__(self, in_features: int, out_features: int, eps: float):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(in_features, eps=eps)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.LayerNorm(x))


def add_sublns(bert: BertModel, eps: float) -> None:
    """Put a SubLN in front of every layer's attention output and FFN down projection, in place."""
    for layer in bert.encoder.layer:
        for parent in (layer.attention.output, layer.output):
            dense = parent.dense
            parent.dense = SubLNLinear(dense.in_features, dense.out_features, eps)


class BertSubLNForSequenceClassification(BertForSequenceClassification):
    config_class = BertSubLNConfig

    def __init__(self, config: BertSubLNConfig):
        super().__init__(config)
        add_sublns(self.bert, config.layer_norm_eps)


class BertSubLNForTokenClassification(BertForTokenClassification):
    config_class = BertSubLNConfig

    def __init__(self, config: BertSubLNConfig):
        super().__init__(config)
        add_sublns(self.bert, config.layer_norm_eps)


class BertSubLNForQuestionAnswering(BertForQuestionAnswering):
    config_class = BertSubLNConfig

    def __init__(self, config: BertSubLNConfig):
        super().__init__(config)
        add_sublns(self.bert, config.layer_norm_eps)
