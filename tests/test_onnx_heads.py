"""``kdqat export --format onnx`` of token-classification and extractive-QA students: the graph's outputs per
task head, ONNX Runtime against the student's integer form over real tokens, and the probe check that
refuses a graph or a student that does not match (issue #33 item 4)."""

import copy

import onnx
import pytest
import torch
from test_deploy import _random_batches, _student
from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

from kdqat_dist.config import QuantConfig
from kdqat_dist.errors import InternalError
from kdqat_dist.export.head_outputs import compare_outputs, outputs_of
from kdqat_dist.export.onnx_export import ONNX_RTOL, _check, export_onnx, read_onnx_meta, run_outputs, session
from kdqat_dist.quant.api import convert
from kdqat_dist.quant.student import load_student

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
HEADS = {
    "token": (AutoModelForTokenClassification, TAGS, ["logits"]),
    "qa": (AutoModelForQuestionAnswering, ("start", "end"), ["start_logits", "end_logits"]),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx_heads")


@pytest.fixture(scope="module")
def students(root):
    """A tiny W2A8 token student and QA student (untrained). The CLI's dev-set check of each runs on trained
    ones: tests/test_token_tasks.py, tests/test_qa_head.py."""
    return {head: _student(root, QuantConfig(), head, auto, labels) for head, (auto, labels, _) in HEADS.items()}


@pytest.mark.parametrize(("head", "weights"), [("token", "int8"), ("qa", "int8"), ("qa", "2bit")])
def test_onnx_export_gives_the_integer_forms_outputs_over_real_tokens(students, root, head, weights):
    out = root / f"{head}_{weights}"
    report = export_onnx(students[head], out, weights=weights)
    meta = read_onnx_meta(out)
    assert meta["head"] == head and meta["outputs"] == HEADS[head][2] and meta["weights"] == weights
    assert ("MatMulNBits" in report.integer_ops) == (weights == "2bit"), report.integer_ops
    graph = onnx.load(str(out / "model.onnx")).graph
    assert [o.name for o in graph.output] == HEADS[head][2]
    for o in graph.output:  # batch and sequence stay dynamic on every output
        assert [d.dim_param for d in o.type.tensor_type.shape.dim][:2] == ["batch", "sequence"]
    integer, sess = convert(copy.deepcopy(load_student(students[head]))), session(out / "model.onnx")
    for batch in _random_batches(integer.config):
        want = outputs_of(integer, batch, head)
        got = {k: torch.from_numpy(v) for k, v in run_outputs(sess, batch).items()}
        real = batch["attention_mask"].bool()
        for name in HEADS[head][2]:
            a, b = want[name][real], got[name][real]  # token: [tokens, tags]; QA: [tokens]
            torch.testing.assert_close(b, a, rtol=0, atol=1e-3 * float(a.abs().max()))
        if head == "token":
            assert torch.equal(got["logits"][real].argmax(-1), want["logits"][real].argmax(-1))
        else:  # the same start and end position among each row's real tokens
            for name in HEADS[head][2]:
                a, b = (x[name].masked_fill(~real, -1e9).argmax(-1) for x in (want, got))
                assert torch.equal(a, b), name


def test_the_probe_check_refuses_other_weights_and_swapped_outputs(students, root):
    path = root / "qa_int8" / "model.onnx"
    if not path.exists():
        export_onnx(students["qa"], path.parent)
    student = load_student(students["qa"])
    assert _check(student, path, "qa")[0] < ONNX_RTOL  # the untouched file passes
    other = copy.deepcopy(student)
    with torch.no_grad():  # the QA Linear stays full precision: its weights must still be checked
        other.qa_outputs.weight.mul_(-1)
    with pytest.raises(InternalError, match="does not reproduce the fake-quant student"):
        _check(other, path, "qa")
    swapped = onnx.load(str(path))
    start, end = swapped.graph.output
    start.name, end.name = end.name, start.name  # a start/end mix-up: both [batch, sequence]
    for node in swapped.graph.node:
        node.output[:] = [{"start_logits": "end_logits", "end_logits": "start_logits"}.get(o, o) for o in node.output]
    onnx.save(swapped, str(root / "swapped.onnx"))
    with pytest.raises(InternalError, match="does not reproduce the fake-quant student"):
        _check(student, root / "swapped.onnx", "qa")


def test_outputs_are_compared_over_real_tokens_only():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    g = torch.Generator().manual_seed(0)
    want = {"logits": torch.randn(2, 4, 3, generator=g)}
    got = {"logits": want["logits"].clone()}
    got["logits"][1, 3] += 100.0  # a padded position: nobody reads it
    assert compare_outputs("token", want, got, mask, 0.01)[0] is None
    got["logits"][1, 1] += 1.0  # a real token
    assert "tolerance" in compare_outputs("token", want, got, mask, 0.01)[0]
    qa = {"start_logits": torch.randn(2, 4, generator=g), "end_logits": torch.randn(2, 4, generator=g)}
    moved = {k: v.clone() for k, v in qa.items()}
    moved["end_logits"][0, 3] = 50.0  # the largest end logit, on a pad
    assert compare_outputs("qa", qa, moved, mask, 0.01)[0] is None
    assert "no output" in compare_outputs("qa", qa, {"logits": qa["start_logits"]}, mask, 0.01)[0]
