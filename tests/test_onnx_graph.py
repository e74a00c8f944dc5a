"""The ONNX graph tidying (export/onnx_graph.py): the same numbers, fewer nodes after ONNX Runtime's fusions."""

import copy
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from kdqat_dist.config import QuantConfig
from kdqat_dist.export.artifact import probe_batches
from kdqat_dist.export.onnx_export import _trace, input_names, run_outputs, session
from kdqat_dist.export.onnx_graph import tidy
from kdqat_dist.models.encoders import load_classifier
from kdqat_dist.models.tiny import make_tiny_checkpoint
from kdqat_dist.quant.api import calibrate_activations, convert, prepare


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """The raw traced graph of a tiny W2A8 student (ternary weights, 8-bit sym activations and attention)
    with non-zero biases, so the bias fusion has something to add."""
    root = tmp_path_factory.mktemp("onnx_graph")
    make_tiny_checkpoint(root / "base")
    torch.manual_seed(0)
    model = load_classifier(str(root / "base"), 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model = prepare(model, QuantConfig())
    calibrate_activations(model, probe_batches(model.config)[0])
    path = root / "raw.onnx"
    _trace(convert(copy.deepcopy(model)).eval(), path, input_names(model.config), "sequence")
    return root, onnx.load(str(path))


def _ops_after_ort(path) -> Counter:
    opt = path.with_suffix(".opt.onnx")
    session(path, optimized_to=opt)
    return Counter((n.op_type, len(n.input)) for n in onnx.load(str(opt)).graph.node)


def test_tidy_keeps_the_numbers_and_lets_onnx_runtime_fuse_more(traced):
    root, raw = traced
    tidied = copy.deepcopy(raw)
    changes = tidy(tidied)
    layers, linears = 2, 6 * 2 + 1  # 6 Linears a layer + the pooler
    assert changes["integer_linears"] == linears and changes["shared_constants"] > 0
    onnx.checker.check_model(tidied)
    paths = {"raw": root / "a.onnx", "tidied": root / "b.onnx"}
    onnx.save(raw, str(paths["raw"]))
    onnx.save(tidied, str(paths["tidied"]))
    sessions = {k: session(p) for k, p in paths.items()}
    g = torch.Generator().manual_seed(3)
    for n, seq in ((1, 5), (6, 23)):
        ids = torch.randint(5, 250, (n, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, seq // 2 :] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        a, b = (run_outputs(s, batch)["logits"] for s in sessions.values())
        # the same codes and scales; only where the bias is added (inside the kernel) can round differently
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(np.abs(a).max()))
    before, after = _ops_after_ort(paths["raw"]), _ops_after_ort(paths["tidied"])
    assert changes["uint8_transposes"] == 3 * layers  # query, key, value heads
    opt = onnx.load(str(paths["tidied"].with_suffix(".opt.onnx"))).graph
    made_by = {o: n.op_type for n in opt.node for o in n.output}
    assert all(made_by.get(n.input[0]) != "Transpose" for n in opt.node if n.op_type == "QuantizeLinear")
    # query, key and value quantize the same LayerNorm output: one QuantizeLinear + Clip instead of three;
    # and the key's codes, transposed as uint8, are no longer dequantized and re-quantized around its kᵀ
    q = lambda c: sum(v for (op, _), v in c.items() if op == "QuantizeLinear")  # noqa: E731
    assert q(before) - q(after) == 3 * layers
    # every Linear's bias inside MatMulIntegerToFloat (its 7th input); the attention matmuls without
    assert after[("MatMulIntegerToFloat", 7)] == linears and after[("MatMulIntegerToFloat", 6)] == 2 * layers
    adds = lambda c: sum(v for (op, _), v in c.items() if op == "Add")  # noqa: E731
    assert adds(after) <= adds(before) - 4 * layers  # query/key/value/output biases no longer separate Adds
