"""``kdqat export --format hf-bitnet``: a ternary student in transformers' own BitNet format, which plain
``from_pretrained`` loads without kdqat_dist and runs with the student's arithmetic.

transformers' BitNet quantization (``quantization_config: {quant_method: bitnet, linear_class:
bitlinear}``) swaps every ``nn.Linear`` not in ``modules_to_not_convert`` for its ``BitLinear``:

    y = (q_x @ W_qᵀ) / (s_x · weight_scale) + b,   q_x = clamp(round(x · s_x), -128, 127),
    s_x = 127 / max(max|x| per token, 1e-5),       W_q ∈ {-1, 0, 1} packed 4 per byte

(``weight`` [out/4, in] uint8: row block i of the ternary codes, plus one, in bits 2i..2i+1;
``weight_scale`` (1,); the bias added after the scaling). A kdqat student computes
``F.linear(q_x / s_x, W_q · γ, b)`` with the same per-token codes q_x (``absmax_token``, 8 bits, no clip:
the same formula) when its weights are ternary with one scale γ per tensor; so the export stores the
student's integer form (:func:`~kdqat_dist.quant.api.convert`): W_q packed, ``weight_scale`` = 1/γ, b as it is.
The two differ only in float rounding (the order of the products).

Sequence classifiers, token classifiers and extractive-QA students are written alike (the head's Linear, kept
in full precision by the default ``quant.skip``, is listed in ``modules_to_not_convert``) and load with the
head's Auto class (:data:`AUTO_NAMES`).

Which students qualify is :func:`bitnet_problems`: ternary weights, one scale per tensor; ``absmax_token``
8-bit inputs without a clip; full-precision embeddings and attention; rules only to keep modules in full
precision (those, the classifier among them, are listed in ``modules_to_not_convert``). Of the shipped
recipes that is ``bitdistill_w158a8``.

SubLN (``quant.subln``, on in ``bitdistill_w158a8``) has no module in ``BertModel``: such a BERT student is
written with a small modeling file (:mod:`kdqat_dist.export.bert_subln_remote`, model type ``bert_subln``)
and loads with ``trust_remote_code=True``; without it transformers refuses the folder. A student trained
with ``quant.subln=false`` needs nothing but transformers.

Before anything is kept, transformers loads the folder (every tensor must be used, with no missing or
mismatched one) and its logits are compared with the fake-quant student's on fixed probe batches
(:data:`HF_RTOL`; token and QA outputs over real tokens); a folder that disagrees is removed and an
:class:`~kdqat_dist.errors.InternalError` raised.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.utils.quantization_config import BitNetQuantConfig

from kdqat_dist import __version__
from kdqat_dist.config import RECIPES_DIR, QuantConfig, load_config, to_dict
from kdqat_dist.errors import ConfigError, InternalError
from kdqat_dist.export.artifact import (
    _TOKENIZER_PREFIXES,
    _remove_written,
    check_out_dir,
    probe_batches,
    read_student_quant,
)
from kdqat_dist.export.head_outputs import compare_outputs, head_of, outputs_of
from kdqat_dist.models.subln import SubLNLinear
from kdqat_dist.quant.api import convert
from kdqat_dist.quant.integer import QuantizedAct, QuantizedEmbedding, QuantizedInputLinear, QuantizedLinear
from kdqat_dist.quant.quantizers import make_quantizer
from kdqat_dist.quant.student import WEIGHTS_FILE, load_student, save_weights

FORMAT = "hf-bitnet"
META_FILE = "kdqat_hf_bitnet.json"
REMOTE_FILE = "modeling_bert_subln.py"
SUBLN_MODEL_TYPE = "bert_subln"
# the Auto class that loads an export of each task head, and the SubLN modeling file's class for it
AUTO_NAMES = {
    "sequence": "AutoModelForSequenceClassification",
    "token": "AutoModelForTokenClassification",
    "qa": "AutoModelForQuestionAnswering",
}
SUBLN_ARCHS = {
    "sequence": "BertSubLNForSequenceClassification",
    "token": "BertSubLNForTokenClassification",
    "qa": "BertSubLNForQuestionAnswering",
}
BERT_ARCHS = ("BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering")
# config.json's hidden_size of a SubLN export: BertConfig wants an int, so BertForSequenceClassification
# .from_pretrained(folder) fails on it, printing it (the real value is under subln_hidden_size, see the
# modeling file)
NEEDS_REMOTE_CODE = "BERT with SubLN: load with {auto} and trust_remote_code=True"
# BitLinear vs the fake-quant student, logits, relative to the batch's largest |logit|: the same integer codes,
# the products in another order ((q_x·W_q) / (s_x·(1/γ)) against (q_x/s_x)·(W_q·γ)), so an activation within
# that rounding of a code boundary may get the neighbouring code in a later layer. Measured: 2e-9 to 2e-6 of
# the largest logit (bench/results/hub.md)
HF_RTOL = 1e-4
_VALUES_PER_BYTE = 4  # BitLinear: four 2-bit codes per uint8, along the output dimension


@dataclass
class HfBitnetReport:
    """What an hf-bitnet export wrote."""

    out_dir: Path
    file_bytes: int
    bitlinear: int  # Linears stored as BitLinear
    full_precision: list[str]  # Linears kept in full precision (modules_to_not_convert)
    subln: bool
    max_abs_logit_diff: float
    head: str = "sequence"

    def lines(self) -> list[str]:
        auto = AUTO_NAMES[self.head]
        load = (
            f"{auto}.from_pretrained(folder, trust_remote_code=True)  (SubLN: {REMOTE_FILE})"
            if self.subln
            else f"{auto}.from_pretrained(folder)  (transformers only)"
        )
        return [
            f"weights      {self.out_dir / WEIGHTS_FILE}: {self.file_bytes / 1e6:.3f} MB "
            f"({self.bitlinear} BitLinear, full precision: {', '.join(self.full_precision) or 'none'})",
            f"load with    {load}",
            f"probe batches: max |logit - fake-quant logit| {self.max_abs_logit_diff:.2e} "
            f"(tolerance {HF_RTOL:g} x the largest |logit|)",
        ]


# --------------------------------------------------------------------------- which students qualify


def bitnet_problems(quant: QuantConfig) -> list[str]:
    """Why a student quantized with ``quant`` cannot be written in transformers' BitNet format (empty: it can)."""
    if not quant.enabled:
        return ["quant.enabled is false"]
    problems = []
    w, a = quant.weight, quant.act
    if not w.enabled or make_quantizer(w).code_range() != (-1, 1):
        problems.append(f"quant.weight must be ternary (e.g. absmean, bits 2), got {w.method} bits {w.bits}")
    if w.granularity != "tensor":
        problems.append(f"quant.weight.granularity must be tensor (BitLinear has one scale), got {w.granularity}")
    if not (a.enabled and a.method == "absmax_token" and a.bits == 8 and a.clip is None):
        got = f"{a.method} bits {a.bits} clip {a.clip}" if a.enabled else "off"
        problems.append(f"quant.act must be absmax_token, bits 8, clip null (BitLinear's int8 input), got {got}")
    if quant.quantize_embedding and quant.embedding.enabled:
        problems.append("quant.quantize_embedding must be false (BitNet keeps the embeddings in full precision)")
    if quant.attention.enabled:
        problems.append("quant.attention.enabled must be false (BitNet's attention matmuls are full precision)")
    if any(r.quantize for r in quant.rules):
        problems.append("quant.rules may only keep modules in full precision (quantize: false)")
    return problems


def bitnet_recipes() -> list[str]:
    """The shipped recipes whose students qualify (:func:`bitnet_problems`)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not bitnet_problems(load_config(p.stem).quant))


def check_student(student_dir: str | Path) -> QuantConfig:
    """The student's quant config; ConfigError in one line when it does not qualify."""
    quant, _ = read_student_quant(Path(student_dir), "--student")
    problems = bitnet_problems(quant)
    if problems:
        raise ConfigError(
            f"--format hf-bitnet: {student_dir} is not a BitNet student ({problems[0]}); allowed: students "
            f"of the recipe(s) {', '.join(bitnet_recipes()) or 'none'} (ternary weights with one scale per "
            "tensor, absmax_token 8-bit inputs, full-precision embeddings and attention)"
        )
    return quant


# --------------------------------------------------------------------------- the native tensors


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """BitLinear's weight layout: ternary codes [out, in] (out a multiple of 4) -> uint8 [out/4, in].

    Row block i (rows i·out/4 .. (i+1)·out/4 - 1) goes to bits 2i..2i+1 of each byte, as code + 1.
    """
    out_features = codes.shape[0]
    rows = out_features // _VALUES_PER_BYTE
    shifted = (codes.to(torch.int16) + 1).to(torch.uint8).reshape(_VALUES_PER_BYTE, rows, *codes.shape[1:])
    packed = torch.zeros(shifted.shape[1:], dtype=torch.uint8)
    for i in range(_VALUES_PER_BYTE):
        packed |= shifted[i] << (2 * i)
    return packed


def native_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """(BitNet state dict, names of the Linears kept in full precision, number of BitLinears) of a
    converted student (:func:`~kdqat_dist.quant.api.convert`).

    Raises:
        ConfigError: a quantized Linear whose output size is not a multiple of 4 (BitLinear packs 4 rows
            per byte).
        InternalError: a module :func:`bitnet_problems` should have refused (not writing a wrong model).
    """
    state = dict(model.state_dict())
    full_precision, bitlinear = [], 0
    for name, m in model.named_modules():
        stray_act = isinstance(m, QuantizedAct) and not (name.endswith(".act_quant") and _is_bitnet_act(m))
        if stray_act or isinstance(m, (QuantizedInputLinear, QuantizedEmbedding)):
            raise InternalError(f"hf-bitnet: {name} ({type(m).__name__}) has no BitNet form; not exporting it")
        if isinstance(m, QuantizedLinear):
            codes, scale = m.weight_codes, m.weight_scale
            if m.act_quant is None or not _is_bitnet_act(m.act_quant) or scale.numel() != 1:
                raise InternalError(f"hf-bitnet: {name} is not a per-tensor ternary Linear with A8 per-token input")
            if int(codes.min()) < -1 or int(codes.max()) > 1:
                raise InternalError(f"hf-bitnet: {name} has codes outside -1..1; not exporting a wrong model")
            if m.out_features % _VALUES_PER_BYTE:
                raise ConfigError(
                    f"--format hf-bitnet: {name} has {m.out_features} outputs; BitLinear needs a multiple of 4"
                )
            del state[f"{name}.weight_codes"]
            state[f"{name}.weight"] = pack_ternary(codes)
            state[f"{name}.weight_scale"] = (1.0 / scale.reshape(1)).to(torch.float32)  # BitLinear divides
            bitlinear += 1
        elif type(m) is nn.Linear:
            full_precision.append(name)
    if any(k.endswith(".step") for k in state):
        raise InternalError("hf-bitnet: a learned activation step in the model; BitNet's inputs have none")
    return state, full_precision, bitlinear


def _is_bitnet_act(q: QuantizedAct) -> bool:
    return q.per_token and q.cfg.bits == 8 and q.cfg.clip is None


def _is_subln(model: nn.Module) -> bool:
    return any(isinstance(m, SubLNLinear) for m in model.modules())


# --------------------------------------------------------------------------- writer and loader


def load_native(folder: str | Path) -> nn.Module:
    """The export as transformers loads it: its BitNet quantizer on the class ``config.json`` names (for a
    SubLN export the class of :mod:`~kdqat_dist.export.bert_subln_remote`, the file copied beside the
    weights, imported from this package instead of through ``trust_remote_code``: nothing is written to the
    Hugging Face modules cache).

    Raises:
        InternalError: a tensor of the file is unused, missing or of another shape.
    """
    config = json.loads((Path(folder) / "config.json").read_text())
    arch = (config.get("architectures") or ["AutoModelForSequenceClassification"])[0]
    if config.get("model_type") == SUBLN_MODEL_TYPE:
        from kdqat_dist.export import bert_subln_remote

        cls = getattr(bert_subln_remote, arch)
    else:
        cls = getattr(transformers, arch)
    model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise InternalError(f"hf-bitnet: transformers does not load every tensor of {folder} as written ({bad})")
    return model.eval()


class Eager(nn.Module):
    """``model`` run with torch.compile switched off. BitLinear's helpers are ``torch.compile``'d: on a CPU
    the first calls compile them for each new input shape (75 s for the tiny test model's probe batches on
    2 cores, most of ``kdqat export``'s time). The checks run the same Python code eagerly; compiled, it
    gives the same logits (bench/results/hub.md)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor):
        with torch.compiler.set_stance("force_eager"):
            return self.model(**batch)


def export_hf_bitnet(student_dir: str | Path, out_dir: str | Path, verify: bool = True) -> HfBitnetReport:
    """Write the ``student/`` folder of ``kdqat train`` as a transformers BitNet model into ``out_dir``.

    Raises:
        ConfigError: not a student, a student :func:`bitnet_problems` refuses, SubLN on an architecture the
            modeling file does not cover, ``out_dir`` not new or empty.
        InternalError: the written folder does not reproduce the student (nothing is kept).
    """
    src = Path(student_dir)
    out = check_out_dir(out_dir)
    quant = check_student(src)
    student = load_student(src)
    subln, head = _is_subln(student), head_of(src)
    arch = type(student).__name__  # config.architectures may still name the base model's head (BertForMaskedLM)
    if subln and (student.config.model_type != "bert" or arch not in BERT_ARCHS):
        raise ConfigError(
            f"--format hf-bitnet: a SubLN student needs the modeling file, which covers BERT only "
            f"({', '.join(BERT_ARCHS)}; this one: {student.config.model_type} {arch})"
        )
    integer = convert(copy.deepcopy(student))
    state, full_precision, bitlinear = native_state(integer)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        for p in src.iterdir():
            if p.is_file() and p.name.startswith(_TOKENIZER_PREFIXES):
                shutil.copy2(p, out / p.name)
        _write_config(integer, out, full_precision, subln, head)
        save_weights(state, out / WEIGHTS_FILE, {"format": "pt"})
        meta = {
            "format": FORMAT,
            "format_version": 1,
            "source": {"student": str(src.resolve())},
            "head": head,
            "quant": to_dict(quant),
            "subln": subln,
            "bitlinear": bitlinear,
            "full_precision": full_precision,
            "versions": {
                "kdqat_dist": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }
        diff = 0.0
        if verify:
            native = load_native(out)
            for batch in probe_batches(student.config):
                a, b = outputs_of(student, batch, head), outputs_of(Eager(native), batch, head)
                problem, d = compare_outputs(head, a, b, batch["attention_mask"], HF_RTOL)
                if problem is not None:
                    raise InternalError(
                        f"hf-bitnet: transformers' BitNet model does not reproduce the student ({problem}); "
                        "not keeping a wrong model"
                    )
                diff = max(diff, d)
            meta["probe"] = {"batches": len(probe_batches(student.config)), "max_abs_logit_diff": diff, "rtol": HF_RTOL}
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
    except BaseException:
        _remove_written(out, created)
        raise
    size = (out / WEIGHTS_FILE).stat().st_size
    return HfBitnetReport(out, size, bitlinear, full_precision, subln, diff, head)


def _write_config(model: nn.Module, out: Path, full_precision: list[str], subln: bool, head: str) -> None:
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # the class a plain from_pretrained builds
    config.quantization_config = BitNetQuantConfig(
        modules_to_not_convert=full_precision, linear_class="bitlinear", quantization_mode="offline"
    ).to_dict()
    config.save_pretrained(out)
    if not subln:
        return
    from kdqat_dist.export import bert_subln_remote

    shutil.copy2(bert_subln_remote.__file__, out / REMOTE_FILE)
    path = out / "config.json"
    d = json.loads(path.read_text())
    module = Path(REMOTE_FILE).stem
    d.update(
        model_type=SUBLN_MODEL_TYPE,
        architectures=[SUBLN_ARCHS[head]],
        auto_map={"AutoConfig": f"{module}.BertSubLNConfig", AUTO_NAMES[head]: f"{module}.{SUBLN_ARCHS[head]}"},
        hidden_size=NEEDS_REMOTE_CODE.format(auto=AUTO_NAMES[head]),
    )
    d[bert_subln_remote.REAL_HIDDEN_SIZE] = model.config.hidden_size
    path.write_text(json.dumps(d, indent=2) + "\n")
