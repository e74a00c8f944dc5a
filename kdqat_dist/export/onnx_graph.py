"""Graph tidying of a traced ONNX export: the same arithmetic in a shape ONNX Runtime's fusions recognise.

``torch.onnx.export`` writes what the student's modules emit, one module at a time; two things in that
shape cost time in ONNX Runtime without changing any number:

- **a constant per use**: every quantizer writes its own zero point (uint8 128) and code bound (uint8 1).
  ONNX Runtime's constant sharing merges only float and int32/int64 scalars, so its common-subexpression
  elimination sees three different ``QuantizeLinear`` nodes where the query, key and value Linears
  quantize the same LayerNorm output with the same scale. :func:`share_constants` makes the constants
  initializers and keeps one of each distinct value: those nodes merge (one ``QuantizeLinear`` + ``Clip``
  instead of three);
- **the bias after the integer matmul**: ONNX Runtime's QDQ fusion turns
  ``DequantizeLinear(codes) -> MatMul <- DequantizeLinear(weight)`` into ``MatMulIntegerToFloat`` but
  leaves the bias as a separate ``Add`` over the whole output. :func:`integer_linears` writes a Linear
  whose activation is quantized as ``MatMulInteger(codes, weight codes) -> Cast -> Mul(a_scale · w_scale)
  -> Add(bias)``, the form ONNX Runtime's ``MatMulIntegerToFloatFusion`` fuses with its bias
  (``MatMulIntegerToFloat(codes, weight, a_scale, w_scale, zero points, bias)``): the same kernel, the bias
  added in its output pass;
- **float transposes around the attention quantizers**: the query, key and value are quantized after the
  heads' ``Transpose`` (and the key's codes dequantized before its ``kᵀ`` Transpose, which ONNX Runtime then
  re-quantizes). With one scale per tensor the codes do not depend on the element order, so
  :func:`transpose_codes` quantizes first and transposes the uint8 codes (a quarter of the bytes; for the
  key both permutations in one).

Codes, scales, zero points and clamp bounds are those of the QDQ form.

Not done, measured (bench/results/runtime.md, "Graph overhead"): ``SkipLayerNormalization`` (ONNX Runtime
fuses residual Add + LayerNorm into it once the graph carries symbolic shapes) was several times slower than
``Add`` + ``LayerNormalization`` on the 2-core AVX2 CPU (its CPU kernel is a scalar loop, one pass
E[x²] − E[x]² for the variance); and ``ReduceMax(Abs(x))`` in place of ``ReduceMax`` + ``ReduceMin`` for
the dynamic scales was no faster.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHARE_MAX_ELEMENTS = 64  # constants up to this size are compared by value (zero points, bounds, shapes)
_INT8_TYPES = (TensorProto.INT8, TensorProto.UINT8)


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Every ``Constant`` node holding a tensor (``value``) becomes an initializer of the same name: the
    same value, available to every node (so one copy can serve all of them)."""
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def share_constants(model: onnx.ModelProto, max_elements: int = SHARE_MAX_ELEMENTS) -> int:
    """Keep one initializer per distinct small constant (data type, shape, bytes); returns how many
    duplicates were dropped. Graph inputs and large tensors (weights) are left alone."""
    graph = model.graph
    _constants_to_initializers(graph)
    inputs = {i.name for i in graph.input}
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    kept = []
    for t in graph.initializer:
        if t.name not in inputs and int(np.prod(t.dims, dtype=np.int64)) <= max_elements:
            key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
            if key in first:
                rename[t.name] = first[key]
                continue
            first[key] = t.name
        kept.append(t)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return len(rename)


def integer_linears(model: onnx.ModelProto) -> int:
    """Rewrite every ``DequantizeLinear(uint8 codes) -> MatMul <- DequantizeLinear(int8/uint8 weight)``
    followed by a bias ``Add`` as ``MatMulInteger -> Cast -> Mul(Mul(a_scale, w_scale)) -> Add(bias)``;
    returns how many. Matmuls without a constant 1-D bias (the attention matmuls) keep the QDQ form."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for name in n.input:
            consumers[name].append(n)
    outputs = {o.name for o in graph.output}

    def const(name: str) -> str:
        # the exporter writes equal parameters once (e.g. all-zero biases) and the others as Identity of it
        while name not in inits and name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return name

    def dq_of(name: str, codes_types: tuple[int, ...], constant: bool) -> onnx.NodeProto | None:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) != 3:
            return None
        dq.input[2] = const(dq.input[2])
        if constant:
            dq.input[0], dq.input[1] = const(dq.input[0]), const(dq.input[1])
            t = inits.get(dq.input[0])
            return dq if t is not None and t.data_type in codes_types and len(t.dims) == 2 else None
        zp = inits.get(dq.input[2])
        return dq if zp is not None and zp.data_type == TensorProto.UINT8 and len(zp.dims) == 0 else None

    replaced: dict[int, list[onnx.NodeProto]] = {}
    count = 0
    for mm in graph.node:
        if mm.op_type != "MatMul" or mm.output[0] in outputs:
            continue
        a = dq_of(mm.input[0], (), constant=False)
        w = dq_of(mm.input[1], _INT8_TYPES, constant=True)
        uses = consumers.get(mm.output[0], [])
        if a is None or w is None or len(uses) != 1 or uses[0].op_type != "Add":
            continue
        add = uses[0]
        if add.input[0] != mm.output[0]:
            continue
        add.input[1] = const(add.input[1])
        bias = inits.get(add.input[1])
        n_out = inits[w.input[0]].dims[1]
        if bias is None or bias.data_type != TensorProto.FLOAT or list(bias.dims) != [n_out]:
            continue
        w_zp = inits.get(w.input[2])
        w_scale = inits.get(w.input[1])
        axis = next((at.i for at in w.attribute if at.name == "axis"), 1)
        if w_zp is None or w_scale is None or (len(w_scale.dims) == 1 and axis != 1) or len(w_scale.dims) > 1:
            continue  # per-tensor, or one scale per output column: the forms MatMulIntegerToFloat takes
        base = mm.name or mm.output[0]
        acc, acc_f, scale, y = (f"{base}/{s}" for s in ("acc", "acc_float", "scale", "scaled"))
        replaced[id(mm)] = [
            helper.make_node("MatMulInteger", [a.input[0], w.input[0], a.input[2], w.input[2]], [acc], f"{base}/int"),
            helper.make_node("Cast", [acc], [acc_f], f"{base}/cast", to=TensorProto.FLOAT),
            # the order MatMulIntegerToFloatFusion reads: Mul(activation scale, weight scale)
            helper.make_node("Mul", [a.input[1], w.input[1]], [scale], f"{base}/scale"),
            helper.make_node("Mul", [acc_f, scale], [y], f"{base}/mul"),
        ]
        add.input[0] = y
        count += 1
    if count:
        nodes = []
        for n in graph.node:
            nodes.extend(replaced.get(id(n), [n]))
        del graph.node[:]
        graph.node.extend(nodes)
        prune(model)
    return count


def prune(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nothing reads, then initializers no node reads."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def tidy(model: onnx.ModelProto) -> dict[str, int]:
    """The three rewrites (constants first, so that the Linears' shared activation codes feed one
    MatMulInteger each); returns what each changed."""
    shared = share_constants(model)
    linears = integer_linears(model)
    transposes = transpose_codes(model)
    return {"shared_constants": shared, "integer_linears": linears, "uint8_transposes": transposes}


def transpose_codes(model: onnx.ModelProto) -> int:
    """Move a ``Transpose`` in front of a per-tensor quantizer behind it: ``Transpose(x) -> QuantizeLinear
    [-> Clip]`` (and the scale's whole-tensor reductions) becomes ``QuantizeLinear(x) [-> Clip] ->
    Transpose``: the same codes (one scale for the whole tensor, reductions over every element), moved as
    uint8 instead of float32. Returns how many."""
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for name in n.input:
            consumers[name].append(n)
    outputs = {o.name for o in graph.output}
    # ranks from ONNX shape inference: only a scale of rank 0 (one per tensor) makes the codes order-free
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred if v.type.tensor_type.HasField("shape")}
    rank.update({t.name: len(t.dims) for t in graph.initializer})
    after: dict[int, onnx.NodeProto] = {}
    count = 0
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or len(q.input) != 3:
            continue
        t = producer.get(q.input[0])
        if t is None or t.op_type != "Transpose" or q.input[0] in outputs:
            continue
        if rank.get(q.input[1]) != 0 or rank.get(q.input[2]) != 0:
            continue
        uses = consumers[q.input[0]]
        if any(
            u is not q
            and not (
                u.op_type in ("ReduceMax", "ReduceMin")
                and not any(a.name == "axes" for a in u.attribute)
                and len(u.input) == 1
            )
            for u in uses
        ):
            continue
        last = q
        nxt = consumers.get(q.output[0], [])
        if len(nxt) == 1 and nxt[0].op_type == "Clip" and q.output[0] not in outputs:
            last = nxt[0]
        if last.output[0] in outputs:
            continue
        for u in uses:  # the same elements, not transposed
            u.input[0] = t.input[0]
        moved = f"{last.output[0]}/transposed"
        for c in consumers.get(last.output[0], []):
            for i, name in enumerate(c.input):
                if name == last.output[0]:
                    c.input[i] = moved
        perm = list(next(a for a in t.attribute if a.name == "perm").ints)
        # a per-tensor DequantizeLinear followed by another Transpose (the key's kᵀ): both permutations on
        # the codes, one uint8 Transpose, so ONNX Runtime has no float Transpose to re-quantize after
        dq = consumers.get(last.output[0], [])
        if len(dq) == 1 and dq[0].op_type == "DequantizeLinear" and dq[0].output[0] not in outputs:
            t2 = consumers.get(dq[0].output[0], [])
            if len(t2) == 1 and t2[0].op_type == "Transpose" and t2[0].output[0] not in outputs:
                p2 = list(next(a for a in t2[0].attribute if a.name == "perm").ints)
                perm = [perm[i] for i in p2]
                for c in consumers.get(t2[0].output[0], []):
                    for i, name in enumerate(c.input):
                        if name == t2[0].output[0]:
                            c.input[i] = dq[0].output[0]
        after[id(last)] = helper.make_node("Transpose", [last.output[0]], [moved], f"{t.name}/codes", perm=perm)
        count += 1
    if count:
        nodes = []
        for n in graph.node:
            nodes.append(n)
            if id(n) in after:
                nodes.append(after[id(n)])
        del graph.node[:]
        graph.node.extend(nodes)
        prune(model)
    return count
