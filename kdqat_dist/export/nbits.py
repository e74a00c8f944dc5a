"""The 2-bit weight layout of an ONNX export: ONNX Runtime's ``MatMulNBits`` (com.microsoft) for ternary and
2-bit weights, 2 bits per code instead of the int8 QDQ initializer's 8.

A graph rewrite of the int8 export: every ``MatMul`` whose weight is ``DequantizeLinear(int8 codes [K, N],
scale)`` with codes in [−2, 1] (ternary TWN/absmean/SEQ, 2-bit LSQ) becomes ``MatMulNBits(A, B, scales,
zero_points)`` with

    B[n, block, byte]: the codes + 2 of column n, 4 per byte, first code in the low bits;
    scales[n · blocks + b]: the column's scale (one per tensor or per row in the student: repeated per block);
    zero_points: 2 for every block (packed 4 per byte), so that value = (u − 2) · scale = code · scale.

``accuracy_level=1`` keeps the product in float32: the activation input is the student's already quantized
value, and the kernel's own int8 re-quantization of it (level 4) would change the student's numbers. Other
weights (8-bit codes, 2-bit SEQ's odd codes, Linears fed by per-token activations) keep the int8 form.
Whether it is faster depends on the CPU and the batch: bench/bench_runtime.py measures it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MS_DOMAIN = "com.microsoft"
BITS = 2
ZERO = 2  # stored u = code + 2 in 0..3


def _block_size(k: int) -> int:
    """The largest power of two in [16, 128] not above ``k`` (MatMulNBits needs >= 16, a power of two)."""
    b = 16
    while b * 2 <= min(k, 128):
        b *= 2
    return b


def pack_2bit(codes_kn: np.ndarray, block: int) -> np.ndarray:
    """[K, N] codes in [−2, 1] -> uint8 [N, blocks, block/4]: u = code + 2, 4 per byte, low bits first."""
    k, n = codes_kn.shape
    blocks = -(-k // block)
    u = np.full((n, blocks * block), ZERO, dtype=np.uint8)  # padding rows: code 0
    u[:, :k] = (codes_kn.T.astype(np.int16) + ZERO).astype(np.uint8)
    q = u.reshape(n, blocks, block // 4, 4)
    return (q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)).astype(np.uint8)


def _zero_points(n: int, blocks: int) -> np.ndarray:
    """uint8 [N, ceil(blocks · 2 / 8)]: ZERO for every block, 4 per byte."""
    out = np.zeros((n, -(-blocks * BITS // 8)), dtype=np.uint8)
    for b in range(blocks):
        out[:, (b * BITS) // 8] |= np.uint8(ZERO << ((b * BITS) % 8))
    return out


def has_2bit_kernel() -> bool:
    """Whether the installed ONNX Runtime runs a 2-bit MatMulNBits on the CPU (a 16 x 16 probe, exact)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = n = 16
    codes = (np.arange(k * n).reshape(k, n) % 3 - 1).astype(np.int8)
    inits = [
        numpy_helper.from_array(pack_2bit(codes, k), "B"),
        numpy_helper.from_array(np.ones(n, np.float32), "S"),
        numpy_helper.from_array(_zero_points(n, 1).reshape(-1), "Z"),
    ]
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain=MS_DOMAIN, K=k, N=n, bits=BITS, block_size=k
    )
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        a = np.arange(k, dtype=np.float32).reshape(1, k)
        return bool(np.allclose(sess.run(None, {"A": a})[0], a @ codes.astype(np.float32)))
    except Exception:  # any failure to build or run the kernel means "not available"
        return False


def to_matmul_nbits(path: str | Path) -> int:
    """Rewrite the ONNX file at ``path`` in place (see the module docstring); returns the MatMuls rewritten."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:  # Constant nodes hold the zero points (and small scales): constants alike
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits.setdefault(node.output[0], node.attribute[0].t)
    producers = {o: node for node in graph.node for o in node.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    new_nodes, dropped, rewritten = [], set(), 0
    for node in graph.node:
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        arrays = _weight_of(dq, inits) if dq is not None and uses.get(dq.output[0]) == 1 else None
        if arrays is None:
            new_nodes.append(node)
            continue
        codes, scale = arrays
        k, n = codes.shape
        block = _block_size(k)
        blocks = -(-k // block)
        prefix = f"{node.name or node.output[0]}_nbits"
        tensors = {
            f"{prefix}_B": pack_2bit(codes, block),
            f"{prefix}_scales": np.repeat(np.broadcast_to(scale, (n,)).astype(np.float32), blocks),
            f"{prefix}_zp": _zero_points(n, blocks).reshape(-1),
        }
        graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in tensors.items())
        new_nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], *tensors],
                list(node.output),
                name=prefix,
                domain=MS_DOMAIN,
                K=k,
                N=n,
                bits=BITS,
                block_size=block,
                accuracy_level=1,
            )
        )
        dropped.add(id(dq))
        rewritten += 1
    keep = [nd for nd in new_nodes if id(nd) not in dropped]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for nd in graph.node for i in nd.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
    for nd in [nd for nd in graph.node if nd.op_type == "Constant" and not used & set(nd.output)]:
        graph.node.remove(nd)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(model, str(path))
    return rewritten


def _weight_of(dq, inits) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 codes [K, N], scale [] or [N]) of a DequantizeLinear of constant 2-bit-range codes, else None."""
    from onnx import numpy_helper

    if dq.op_type != "DequantizeLinear" or any(i not in inits for i in dq.input):
        return None
    codes = numpy_helper.to_array(inits[dq.input[0]])
    scale = numpy_helper.to_array(inits[dq.input[1]])
    zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 else np.zeros(())
    if codes.dtype != np.int8 or codes.ndim != 2 or np.any(zero != 0) or codes.size == 0:
        return None
    if codes.min() < -ZERO or codes.max() > 3 - ZERO or scale.ndim > 1:
        return None
    return codes, scale
