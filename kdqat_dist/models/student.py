"""Building the student from the fine-tuned teacher's checkpoint (before it is quantized).

Saving and loading the quantized student is :mod:`kdqat_dist.quant.student` (quant/ sits above models/).
"""

from __future__ import annotations

from torch import nn

from kdqat_dist.models.encoders import encoder_layers, load_classifier
from kdqat_dist.models.layer_map import layer_map


def init_student(
    path: str, num_labels: int, num_layers: int | None, strategy, auto_class: type | None = None
) -> nn.Module:
    """Load the FP checkpoint at ``path``; keep only the mapped layers when ``num_layers`` is set.

    Weights are copied from the full checkpoint *before* any sharding, so a ZeRO-3 student never
    copies an empty partition (the DeepSpeed ``student_initialization`` bug). ``auto_class``: the task
    head's model class (None: sequence classification).
    """
    kwargs = {"auto_class": auto_class} if auto_class is not None else {}
    model = load_classifier(path, num_labels, attn_implementation="eager", **kwargs)
    if num_layers is None:
        return model
    layers = encoder_layers(model)
    name = next(n for n, m in model.named_modules() if m is layers)  # "<prefix>.encoder.layer"
    parent = model.get_submodule(name.rpartition(".")[0])
    parent.layer = nn.ModuleList([layers[t] for _, t in layer_map(len(layers), num_layers, strategy)])
    model.config.num_hidden_layers = num_layers
    return model
