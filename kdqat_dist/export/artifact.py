"""The packed low-bit artifact: writer (:func:`export_model`, :func:`export_student`), reader (:func:`load`).

An export folder holds

- ``kdqat_packed.safetensors``: for every quantized weight ``<module>.weight.codes`` (uint8, bit-packed
  integer codes) and ``<module>.weight.scale`` (FP32, one per tensor or per row): the quantized form
  ``ŵ = codes · scale`` of :mod:`kdqat_dist.quant.quantizers`; every other tensor of the student
  (LayerNorms, biases, position/type embeddings, FP classifier, learned activation steps) as it is. The
  name is not a Hugging Face weights file name on purpose: ``from_pretrained`` on the folder refuses it
  (there are no float weights to load) instead of building a randomly initialised model;
- ``kdqat_export.json``: format version, the quant config, per-module method/bits/granularity/encoding,
  activation quantizer settings, the weights file's size and SHA-256, and the size figures;
- the Hugging Face ``config.json`` (its ``quantization_config`` says ``format: kdqat-packed``, so that
  ``from_pretrained`` with kdqat_dist imported names :func:`load`) and the tokenizer files.

:func:`load` rebuilds the architecture from ``config.json`` and returns the **integer-form** student
(:mod:`kdqat_dist.quant.integer`: codes and scales, activation and attention quantizers as in training).
It needs nothing but this folder, and never imports DeepSpeed. Format 1 (``model.safetensors``, sym scales
stored as s with codes / s, 2-bit SEQ as (k + ½)·s) is still read.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

from kdqat_dist import __version__
from kdqat_dist.config import ALLOWED_BITS, QuantConfig, build_section, to_dict
from kdqat_dist.errors import ConfigError, InternalError
from kdqat_dist.export.packing import (
    TERNARY_ONLY,
    Encoding,
    choose_encoding,
    code_range,
    code_stride,
    decode,
    dequantize,
    encode,
    legacy_dequant_op,
    legacy_to_public,
    weight_codes,
)
from kdqat_dist.quant.api import convert, is_prepared
from kdqat_dist.quant.fake_quant import ActFakeQuant, QuantEmbedding, QuantLinear
from kdqat_dist.quant.hf_quantizer import KdqatQuantizationConfig
from kdqat_dist.quant.integer import QuantizedAct, QuantizedEmbedding, QuantizedLinear
from kdqat_dist.quant.size import fp32_bytes
from kdqat_dist.quant.student import (
    STUDENT_META,
    is_student_dir,
    load_student,
    load_weights,
    prepared_from_config,
    save_weights,
)

EXPORT_META = "kdqat_export.json"
WEIGHTS_FILE = "kdqat_packed.safetensors"  # not model.safetensors: from_pretrained must not find float weights
LEGACY_WEIGHTS_FILE = "model.safetensors"  # format 1
FORMAT = "kdqat-packed"
FORMAT_VERSION = 2  # 2: the quantized form (ŵ = codes · scale for every method), kdqat_packed.safetensors
# logits of the reloaded artifact vs the fake-quant student, relative to the largest |logit|: equal but for
# float rounding (max-abs weights are codes · (1/s) instead of codes / s); well above that rounding, far
# below any real defect
PROBE_RTOL = 1e-5
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece", "sentencepiece")


# --------------------------------------------------------------------------- report


@dataclass
class ExportReport:
    """What an export wrote, and its sizes in bytes."""

    out_dir: Path
    file_bytes: int  # model.safetensors on disk (packed weights, scales, FP parts, header)
    fp32_bytes: int  # 4 bytes x every parameter of the student (learned steps excluded)
    quantized_fp32_bytes: int  # 4 bytes x the elements of the weights that were packed
    quantized_packed_bytes: int  # their packed codes plus their FP32 scales
    modules: int  # number of packed weights

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / max(self.file_bytes, 1)

    @property
    def weight_ratio(self) -> float:
        return self.quantized_fp32_bytes / max(self.quantized_packed_bytes, 1)

    def lines(self) -> list[str]:
        return [
            f"packed file  {self.out_dir / WEIGHTS_FILE}: {self.file_bytes / 1e6:.3f} MB",
            f"FP32 model   {self.fp32_bytes / 1e6:.3f} MB (4 bytes x parameters); {self.ratio:.2f}x smaller on disk",
            f"packed weights ({self.modules} tensors): {self.quantized_packed_bytes / 1e6:.3f} MB vs "
            f"{self.quantized_fp32_bytes / 1e6:.3f} MB FP32, {self.weight_ratio:.2f}x smaller",
        ]

    def as_dict(self) -> dict:
        sizes = {k: v for k, v in asdict(self).items() if k != "out_dir"}
        return {**sizes, "ratio": self.ratio, "weight_ratio": self.weight_ratio}


# --------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; raises ConfigError when it is a file or a non-empty folder."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {out} already exists and is not an empty folder; refusing to overwrite it")
    return out


def _remove_written(out: Path, created: bool) -> None:
    """Remove what an export wrote (``out`` was empty or absent before it)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
    elif out.is_dir():
        for p in out.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def probe_batch(config, n: int = 4, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch of random token ids with some padding, for comparing two models' logits."""
    g = torch.Generator().manual_seed(seed)
    seq = max(2, min(seq, getattr(config, "max_position_embeddings", seq + 2) - 2))
    ids = torch.randint(0, config.vocab_size, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, n):
        mask[i, max(1, seq - 3 * i) :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def probe_batches(config, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A few fixed batches of random token ids with padding, of different sizes and lengths."""
    return [probe_batch(config, n, seq, seed + i) for i, (n, seq) in enumerate(((4, 16), (3, 9), (6, 24)))]


def compare_logits(a: torch.Tensor, b: torch.Tensor, rel: float, floor: float = 1e-6) -> str | None:
    """None when ``b`` reproduces ``a``, else what differs, in words.

    Reproduces: |a − b| <= tol = floor + rel · max|a| everywhere (a tolerance relative to the batch's largest
    logit, so that a model with small logits is held to the same standard), and the same argmax in every
    row whose top-two margin in ``a`` exceeds 2·tol (a closer race may go either way within the tolerance).
    """
    if a.shape != b.shape:
        return f"logits of shape {tuple(b.shape)}, expected {tuple(a.shape)}"
    tol = floor + rel * (float(a.abs().max()) if a.numel() else 0.0)
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if not diff <= tol:  # NaN fails too
        return f"max |logit difference| {diff:.3g} > tolerance {tol:.3g}"
    if a.shape[-1] > 1:
        top2 = a.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 2 * tol
        if bool((a.argmax(-1) != b.argmax(-1))[clear].any()):
            return "a different predicted class on a row with a clear margin"
    return None


@torch.no_grad()
def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits; extractive QA's start and end logits as ``[B, 2, S]`` (a "class" is a position)."""
    was = model.training
    model.eval()
    out = model(**batch)
    logits = (
        out.logits if getattr(out, "logits", None) is not None else torch.stack([out.start_logits, out.end_logits], 1)
    )
    model.train(was)
    return logits


def _quantized_modules(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            yield name, m


# --------------------------------------------------------------------------- writer


def export_model(
    model: nn.Module,
    quant: QuantConfig,
    out_dir: str | Path,
    *,
    tokenizer=None,
    files_from: str | Path | None = None,
    base3: bool = False,
    extra: dict | None = None,
    verify: bool = True,
) -> ExportReport:
    """Pack a fake-quant (prepared, not converted) model into ``out_dir``, a new or empty folder.

    Args:
        model: the student as evaluated in training: ``prepare``-d with ``quant``, weight quantizers on.
        quant: its quant config (stored; :func:`load` prepares the rebuilt model with it).
        tokenizer: saved next to the weights (or give ``files_from``).
        files_from: a model folder whose tokenizer files are copied.
        base3: store ternary tensors five trits per byte (1.6 bits) instead of 2 bits.
        extra: more keys for ``kdqat_export.json`` (source, task, metrics...).
        verify: reload the artifact and require the fake-quant logits on fixed probe batches with padding
            (within :data:`PROBE_RTOL` of the largest logit, the same predicted class).

    Raises:
        ConfigError: the model was never quantized, is already converted, uses unsupported bits, or an
            activation LSQ step was never calibrated.
        InternalError: the codes or the reloaded artifact do not reproduce the model (nothing is kept).
    """
    out = check_out_dir(out_dir)
    if any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules()):
        raise ConfigError(
            "export: the model is already converted to its integer form; export the fake-quant student, "
            "e.g. the student/ folder written by `kdqat train`"
        )
    if not quant.enabled or not is_prepared(model):
        raise ConfigError(
            "export: the model was never quantized (quant.enabled is false or `prepare` was "
            "not applied); export needs a `kdqat train` student"
        )
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    skip_keys: set[str] = set()
    q_fp32 = q_packed = 0
    with torch.no_grad():
        for name, m in _quantized_modules(model):
            wq = m.weight_quant
            if wq is None:
                continue  # weight quantization disabled for this module by a rule: stays FP
            cfg = wq.cfg
            if not wq.enabled:
                raise ConfigError(
                    f"export: weight quantization of {name} is switched off; switch it back on "
                    "(set_quant_enabled) before exporting"
                )
            if cfg.bits not in ALLOWED_BITS:
                raise ConfigError(f"export: {name} uses {cfg.bits}-bit weights; allowed: 2, 3, 4, 8")
            target = wq(m.weight).detach()
            step = getattr(wq, "step", None)
            codes, scale = weight_codes(m.weight, cfg, step)
            lo, hi = code_range(cfg.method, cfg.bits, cfg.narrow_range)
            stride = code_stride(cfg.method, cfg.bits, cfg.narrow_range)
            # ŵ = codes · scale: bit for bit, or (sym, whose training divides) within an ulp or two
            close = torch.allclose(dequantize(codes, scale, target.dtype), target, rtol=2.5e-7, atol=0)
            if not close or int(codes.min()) < lo or int(codes.max()) > hi:
                raise InternalError(
                    f"export: the codes of {name} do not reproduce its fake-quant weight "
                    f"({cfg.method}{cfg.bits}); not exporting a wrong model"
                )
            enc = choose_encoding(codes, cfg.bits, base3 and cfg.bits == 2, stride)
            packed = tensors[f"{name}.weight.codes"] = encode(codes, enc)
            scale32 = tensors[f"{name}.weight.scale"] = scale.reshape(-1).to(torch.float32).contiguous()
            skip_keys.add(f"{name}.weight")
            if step is not None:
                skip_keys.add(f"{name}.weight_quant.step")
            aq = getattr(m, "act_quant", None)
            modules[name] = {
                "kind": "embedding" if isinstance(m, QuantEmbedding) else "linear",
                "shape": list(m.weight.shape),
                "method": cfg.method,
                "bits": cfg.bits,
                "granularity": cfg.granularity,
                "narrow_range": cfg.narrow_range,
                "packing": enc.packing,
                "storage_bits": 1.6 if enc.packing == "base3" else enc.storage_bits,
                "zero": enc.zero,
                "stride": enc.stride,
                "act": None if aq is None else {"method": aq.cfg.method, "bits": aq.cfg.bits, "clip": aq.cfg.clip},
            }
            if enc.packing == "bits" and enc.storage_bits != cfg.bits:
                used = (int(codes.max()) - int(codes.min())) // stride + 1
                modules[name]["note"] = (
                    f"{cfg.method}{cfg.bits} produced codes spanning {used} levels "
                    f"(> 2^{cfg.bits}); stored at {enc.storage_bits} bits, unaltered"
                )
            q_fp32 += 4 * m.weight.numel()
            q_packed += packed.numel() + 4 * scale32.numel()
        for name, q in model.named_modules():
            if isinstance(q, ActFakeQuant):
                skip_keys.add(f"{name}.initialized")
                if q.enabled != q.cfg.enabled:
                    raise ConfigError(
                        f"export: activation quantizer {name} is switched off; the artifact "
                        "always applies activation quantization as configured"
                    )
                if q.enabled and q.quantizer.learned and not bool(q.initialized):
                    raise ConfigError(
                        f"export: activation step {name} was never calibrated "
                        "(run calibrate_activations or a training step first)"
                    )
    if not modules:
        raise ConfigError(
            "export: the model has no quantized weights (every weight quantizer is disabled); nothing to pack"
        )
    tensors.update((k, v) for k, v in model.state_dict().items() if k not in skip_keys)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_side_files(model, out, tokenizer, files_from, quant)
        wpath = out / WEIGHTS_FILE
        save_weights(tensors, wpath, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        report = ExportReport(out, wpath.stat().st_size, fp32_bytes(model), q_fp32, q_packed, len(modules))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "weights_file": WEIGHTS_FILE,
            "weights_bytes": report.file_bytes,
            "weights_sha256": _sha256(wpath),
            "quant": to_dict(quant),
            "activation": {"act": to_dict(quant.act), "attention": to_dict(quant.attention)},
            "modules": modules,
            "sizes": report.as_dict(),
            "versions": _versions(),
            **(extra or {}),
        }
        (out / EXPORT_META).write_text(json.dumps(meta, indent=2))
        if verify:
            loaded = load(out)
            diffs = []
            for batch in probe_batches(model.config):
                a, b = logits_of(model, batch), logits_of(loaded, batch)
                problem = compare_logits(a, b, PROBE_RTOL)
                if problem is not None:
                    raise InternalError(
                        f"export: the reloaded artifact does not reproduce the fake-quant model ({problem}); "
                        "not keeping a wrong model"
                    )
                diffs.append(float((a - b).abs().max()))
            meta["probe"] = {"batches": len(diffs), "max_abs_logit_diff": max(diffs), "rtol": PROBE_RTOL}
            (out / EXPORT_META).write_text(json.dumps(meta, indent=2))  # the checksum covers the weights only
    except BaseException:
        _remove_written(out, created)
        raise
    return report


def _write_side_files(model: nn.Module, out: Path, tokenizer, files_from, quant: QuantConfig) -> None:
    if files_from is not None:
        for p in Path(files_from).iterdir():
            if p.is_file() and p.name.startswith(_TOKENIZER_PREFIXES):
                shutil.copy2(p, out / p.name)
    # quant_method "kdqat" with the packed format named: with kdqat_dist imported, from_pretrained on this
    # folder says to use kdqat_dist.export.load (the codes are not float weights); without it, transformers
    # finds no weights file it knows (WEIGHTS_FILE) and refuses, instead of a random model
    config = copy.deepcopy(model.config)
    config.quantization_config = KdqatQuantizationConfig(to_dict(quant), packed=FORMAT).to_dict()
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _versions() -> dict:
    return {"kdqat_dist": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def export_student(
    student_dir: str | Path, out_dir: str | Path, base3: bool = False, verify: bool = True
) -> ExportReport:
    """Pack the ``student/`` folder written by ``kdqat train`` into ``out_dir`` (see :func:`export_model`)."""
    src = Path(student_dir)
    check_out_dir(out_dir)
    quant, meta = read_student_quant(src, "--student")
    for key, wcfg in (("quant.weight", quant.weight), ("quant.embedding", quant.embedding)):
        if wcfg.bits not in ALLOWED_BITS:
            raise ConfigError(f"{key}.bits: {wcfg.bits} is not supported by export; allowed: 2, 3, 4, 8")
    model = load_student(src)
    extra = {"source": {"student": str(src.resolve()), "task": meta.get("task"), "metrics": meta.get("metrics")}}
    return export_model(model, quant, out_dir, files_from=src, base3=base3, extra=extra, verify=verify)


def read_student_quant(src: Path, flag: str) -> tuple[QuantConfig, dict]:
    """(quant config, metadata) of a student folder; ConfigError naming ``flag`` when it is not one."""
    if not src.exists():
        raise ConfigError(f"{flag}: {src} does not exist")
    if not is_student_dir(src):
        raise ConfigError(
            f"{flag}: {src} is not a quantized student folder (no {STUDENT_META}); the "
            "model was never quantized: use the student/ folder written by `kdqat train`"
        )
    try:
        meta = json.loads((src / STUDENT_META).read_text())
        quant = build_section(QuantConfig, meta["quant"], "quant")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag}: {src / STUDENT_META} is unreadable ({type(exc).__name__})") from None
    if not quant.enabled:
        raise ConfigError(
            f"{flag}: {src} was trained with quant.enabled=false; the model was never "
            "quantized, there is nothing to pack"
        )
    return quant, meta


# --------------------------------------------------------------------------- reader


def read_meta(path: str | Path) -> dict:
    """The parsed ``kdqat_export.json`` of an export folder (format checked, weights not read)."""
    p = Path(path)
    mpath = p / EXPORT_META
    if not mpath.exists():
        raise ConfigError(f"{p} is not a kdqat export folder (no {EXPORT_META}); create one with `kdqat export`")
    try:
        meta = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{mpath} is not valid JSON (corrupt export metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{mpath}: not a {FORMAT} metadata file")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise ConfigError(
            f"{mpath}: format_version {version!r} is not supported (this kdqat_dist reads "
            f"1..{FORMAT_VERSION}); upgrade kdqat_dist"
        )
    for key in ("weights_file", "weights_bytes", "weights_sha256", "quant", "modules"):
        if key not in meta:
            raise ConfigError(f"{mpath}: missing key {key!r} (corrupt export metadata)")
    if not isinstance(meta["modules"], dict) or not isinstance(meta["weights_file"], str):
        raise ConfigError(f"{mpath}: malformed 'modules' or 'weights_file' (corrupt export metadata)")
    if Path(meta["weights_file"]).name != meta["weights_file"]:
        raise ConfigError(f"{mpath}: weights_file {meta['weights_file']!r} must be a file name in the folder")
    return meta


def verify_file(path: str | Path, meta: dict | None = None) -> Path:
    """Check the packed weights file's size (truncation) and SHA-256 (corruption); returns its path."""
    p = Path(path)
    meta = meta or read_meta(p)
    w = p / meta["weights_file"]
    if not w.exists():
        raise ConfigError(f"{w} is missing (the export folder is incomplete)")
    size, expected = w.stat().st_size, int(meta["weights_bytes"])
    if size != expected:
        what = "truncated" if size < expected else "has trailing data"
        raise ConfigError(f"{w} is {what}: {size} bytes, expected {expected}; re-run `kdqat export`")
    if _sha256(w) != meta["weights_sha256"]:
        raise ConfigError(f"{w} is corrupt: its SHA-256 does not match {EXPORT_META}; re-run `kdqat export`")
    return w


def _module_encoding(name: str, info: dict, version: int) -> tuple[Encoding, list[int], str, str]:
    """(encoding, shape, granularity, format-1 dequantization op or "mul") of one packed module."""
    try:
        bits, method, shape = int(info["bits"]), str(info["method"]), [int(s) for s in info["shape"]]
        packing, zero, stride = str(info["packing"]), int(info["zero"]), int(info.get("stride", 1))
        storage = 0 if packing == "base3" else int(info["storage_bits"])
        granularity = str(info["granularity"])
        narrow = bool(info.get("narrow_range", True))
        op = str(info["dequant"]) if version == 1 else "mul"
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{EXPORT_META}: module {name}: incomplete entry (corrupt export metadata)") from None
    if bits not in ALLOWED_BITS:
        raise ConfigError(f"{EXPORT_META}: module {name}: unsupported bits {bits}; allowed: 2, 3, 4, 8")
    if method in TERNARY_ONLY and bits != 2:
        raise ConfigError(f"{EXPORT_META}: module {name}: {method} needs bits=2, got {bits}")
    if granularity not in ("tensor", "row"):
        raise ConfigError(f"{EXPORT_META}: module {name}: unknown granularity {granularity!r}")
    if packing not in ("bits", "base3"):
        raise ConfigError(f"{EXPORT_META}: module {name}: unknown packing {packing!r}; allowed: bits, base3")
    if version == 1 and op != legacy_dequant_op(method, narrow):  # raises on an unknown method
        raise ConfigError(f"{EXPORT_META}: module {name}: dequantization {op!r} does not match {method}")
    if version > 1 and stride != code_stride(method, bits, narrow):  # raises on an unknown method
        raise ConfigError(f"{EXPORT_META}: module {name}: code stride {stride} does not match {method}{bits}")
    return Encoding(packing, storage, zero, stride), shape, granularity, op


def load(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The integer-form student (:mod:`kdqat_dist.quant.integer`) from an export folder alone.

    Raises:
        ConfigError: not an export folder, unsupported format/bits, a truncated or corrupt weights file
            (size and SHA-256 are checked before anything is read), or weights that do not fit the config.
    """
    p = Path(path)
    meta = read_meta(p)
    wfile = verify_file(p, meta)
    try:
        quant = build_section(QuantConfig, meta["quant"], "quant")
    except ConfigError as exc:
        raise ConfigError(f"{p / EXPORT_META}: bad quant config ({exc})") from None
    if not (p / "config.json").exists():
        raise ConfigError(f"{p} has no config.json (the export folder is incomplete)")
    state = load_weights(wfile)
    model = prepared_from_config(p, quant)

    packed = {n for n, m in _quantized_modules(model) if m.weight_quant is not None and m.weight_quant.enabled}
    listed = set(meta["modules"])
    if packed != listed:
        diff = sorted(packed ^ listed)[:3]
        raise ConfigError(
            f"{p / EXPORT_META}: its modules do not match the quant config on this architecture (e.g. {diff})"
        )
    with torch.no_grad():
        for name, info in meta["modules"].items():
            _set_module(model, name, _integer_module(model.get_submodule(name), name, info, state, wfile, meta))
    convert(model)  # the rest: attention quantizers, rule-kept FP weights with quantized inputs

    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(
            f"{wfile}: tensors do not fit {p / 'config.json'} ({str(exc).strip().splitlines()[-1].strip()})"
        ) from None
    allowed_missing = {f"{n}.weight_{part}" for n in listed for part in ("codes", "scale")}
    bad_missing = [k for k in missing if k not in allowed_missing]
    if bad_missing or unexpected:
        raise ConfigError(
            f"{wfile}: tensors do not match {p / 'config.json'} (missing {bad_missing[:3]}, "
            f"unexpected {list(unexpected)[:3]})"
        )
    return model.to(device).eval()


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _integer_module(m: nn.Module, name: str, info: dict, state: dict, wfile: Path, meta: dict) -> nn.Module:
    """The integer module for the fake-quant skeleton ``m`` from its packed codes and scales in ``state``."""
    enc, shape, granularity, op = _module_encoding(name, info, meta["format_version"])
    cfg = m.weight_quant.cfg
    if (cfg.method, cfg.bits, cfg.granularity) != (info["method"], info["bits"], granularity):
        raise ConfigError(
            f"{EXPORT_META}: module {name} is {info['method']}{info['bits']}/{granularity} but the "
            f"quant config says {cfg.method}{cfg.bits}/{cfg.granularity}"
        )
    if list(m.weight.shape) != shape:
        raise ConfigError(f"{name}: packed shape {shape} does not match the model's {list(m.weight.shape)}")
    codes_t = state.pop(f"{name}.weight.codes", None)
    scale = state.pop(f"{name}.weight.scale", None)
    if codes_t is None or scale is None:
        raise ConfigError(f"{wfile}: missing the packed weight or scale of {name}")
    rows = shape[0] if granularity == "row" and len(shape) > 1 else 1
    if scale.dtype != torch.float32 or scale.numel() != rows:
        raise ConfigError(f"{wfile}: {name} has {scale.numel()} scales, expected {rows}")
    n = math.prod(shape)
    codes = decode(codes_t, enc, n).view(shape)
    s = scale.reshape(rows, *([1] * (len(shape) - 1))) if granularity == "row" else scale.reshape(())
    codes, s = legacy_to_public(codes, s, op)
    lo, hi = code_range(info["method"], info["bits"], bool(info.get("narrow_range", True)))
    if n and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ConfigError(f"{wfile}: codes of {name} fall outside [{lo}, {hi}] (corrupt data)")
    if isinstance(m, QuantEmbedding):
        return QuantizedEmbedding(cfg, codes, s, m.padding_idx)
    return QuantizedLinear(cfg, codes, s, m.bias, QuantizedAct.from_fake_quant(m.act_quant))
