"""A probe of bad and hostile inputs: each one must be refused with one clear line, a non-zero exit, no
traceback, and every file that existed before left as it was (and nothing new written next to it).

Classes: config files and overrides, numeric settings, data files, the user's folders, checkpoints and
resume, the command line, the launch scripts, sweep specs, and the Hugging Face path. Most cases call
``kdqat_dist.cli.main([...])`` in this process (an import of kdqat costs seconds; a call costs
milliseconds); the launch scripts are spawned, because the process boundary is their point.

Run it as a script to see every case's verdict and the line it printed::

    PYTHONPATH=$PWD python tests/test_bad_inputs.py [substring of case ids ...]

Cases whose fix belongs to another change carry ``owner`` and are expected to fail until it lands
(``xfail(strict=False)``, so they pass the day the fix is merged and the lead removes the mark).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the shared models and runs


@dataclass
class World:
    """Real artifacts the cases point at, made once: a tiny fine-tune run (its model/ is the teacher), a
    KD-QAT run from it with a checkpoint, that run's student and its packed export."""

    root: Path
    # the spawned cases, started together when the world is built (their Python imports take seconds each,
    # which then overlap with the in-process cases): case id -> (its folder, snapshot before, the run)
    spawned: dict[str, tuple[Path, dict, Future]] = field(default_factory=dict)

    @property
    def ft_run(self) -> Path:
        return self.root / "ft_run"

    @property
    def teacher(self) -> Path:
        return self.ft_run / "model"

    @property
    def kd_run(self) -> Path:
        return self.root / "kd_run"

    @property
    def student(self) -> Path:
        return self.kd_run / "student"

    @property
    def export(self) -> Path:
        return self.root / "export"

    def fields(self, ws: Path) -> dict[str, str]:
        names = ("root", "ft_run", "teacher", "kd_run", "student", "export")
        return {"ws": str(ws), **{n: str(getattr(self, n)) for n in names}}


def build_world(root: Path) -> World:
    from kdqat_dist.config import load_config
    from kdqat_dist.engine.loop import run
    from kdqat_dist.export.artifact import export_student

    w = World(root)
    small = ["train.max_steps=2", "train.eval_every=2", "train.save_every=2", "data.demo_size=64"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run(load_config("tiny_debug", [f"train.output_dir={w.ft_run}", *small]), "finetune")
        kd = [f"teacher.path={w.teacher}", f"train.output_dir={w.kd_run}", "train.diagnostics=false", *small]
        run(load_config("tiny_debug", kd), "train")
        export_student(w.student, w.export)
    return w


# --------------------------------------------------------------------------- one case


@dataclass
class Case:
    """``argv`` is formatted with :meth:`World.fields` (``{ws}`` is the case's own empty folder).

    ``kind``: ``cli`` (``kdqat_dist.cli.main``), ``precheck`` (``kdqat_dist.precheck.main``, what the launch
    scripts run), ``spawn`` (a command run as a process, from the repository root), or ``call`` (``call(ws,
    world)`` raises the error or returns normally, which counts as not refused).
    """

    id: str
    cls: str
    argv: list[str]
    expect: str  # a regex the one error line must match
    setup: Callable[[Path, World], None] | None = None
    kind: str = "cli"
    env: dict[str, str] = field(default_factory=dict)
    call: Callable[[Path, World], None] | None = None
    owner: str | None = None


@dataclass
class Outcome:
    rc: int | None
    out: str
    err: str
    crash: str = ""  # an exception that escaped (a traceback in a real run)


@contextlib.contextmanager
def _captured() -> Iterator[dict[str, str]]:
    """Capture stdout and stderr at the file-descriptor level too (library loggers hold the old streams)."""
    got: dict[str, str] = {}
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield got
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            for name, f in (("out", out), ("err", err)):
                f.flush()
                f.seek(0)
                got[name] = f.read()


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fill(text: str, fields: dict[str, str]) -> str:
    """``{ws}``, ``{teacher}``... replaced by their paths (other braces, e.g. YAML flow maps, left alone)."""
    for k, v in fields.items():
        text = text.replace("{" + k + "}", v)
    return text


def run_case(case: Case, ws: Path, world: World) -> Outcome:
    fields = world.fields(ws)
    argv = [fill(a, fields) for a in case.argv]
    case_env = {k: fill(v, fields) for k, v in case.env.items()}
    if case.kind == "spawn":
        env = {**os.environ, "KDQAT_DRY_RUN": "", **case_env}
        env.pop("KDQAT_DRY_RUN")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        return Outcome(proc.returncode, proc.stdout, proc.stderr)
    rc, crash = None, ""
    with _environ(case_env), _captured() as got:
        try:
            if case.kind == "cli":
                from kdqat_dist.cli import main

                rc = main(argv)
            elif case.kind == "precheck":
                from kdqat_dist.precheck import main

                rc = main(argv)
            else:
                assert case.call is not None
                case.call(ws, world)
                rc = 0
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # what a user would see as a traceback
            if case.kind == "call" and not isinstance(exc, (AssertionError, KeyboardInterrupt)):
                print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
                rc = 1
            else:
                crash = "".join(traceback.format_exception(exc))
    return Outcome(rc, got.get("out", ""), got.get("err", ""), crash)


# what libraries print on stderr besides our line, which is no part of the verdict
_NOISE = (
    re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING)\]"),  # DeepSpeed's logger
    re.compile(r"^\s*warnings\.warn\("),
    re.compile(r"^.*(Warning|warning):"),
    # DeepSpeed probing its async-io op at import, where libaio is not installed (the machine, not kdqat)
    re.compile(r"^(/usr/bin/ld: cannot find|collect2: error: ld returned)"),
    re.compile(r"^\[transformers\] "),  # transformers' own warnings, e.g. about a config it cannot place
    # kdqat eval/analyze stating how the data differs from the run's, before the refusal: context, not an error
    re.compile(r"^kdqat [a-z]+: note: "),
)


def error_lines(err: str) -> list[str]:
    """The lines a user reads on stderr: argparse's usage block and library warnings left out."""
    lines, in_usage = [], False
    for line in err.splitlines():
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and (line.startswith(" ") or not line.strip()):
            continue
        in_usage = False
        if line.strip() and not any(p.match(line) for p in _NOISE):
            lines.append(line)
    return lines


def verdict(case: Case, o: Outcome) -> str | None:
    """None when the case was refused cleanly, else what went wrong."""
    if o.crash:
        return f"traceback: {o.crash.strip().splitlines()[-1]}"
    if "Traceback (most recent call last)" in o.err + o.out:
        return "traceback in the output"
    if o.rc == 0:
        return "accepted (exit 0)"
    lines = error_lines(o.err)
    if len(lines) != 1:
        return f"{len(lines)} error lines: {lines[:4]}"
    if not re.search(r"(?i)error:|usage:", lines[0]):
        return f"not an error line: {lines[0]}"
    if not re.search(case.expect, lines[0]):
        return f"line does not match {case.expect!r}: {lines[0]}"
    return None


# --------------------------------------------------------------------------- snapshots


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots``: content hash, size and mode of files, mode of folders."""
    snap: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                p = Path(dirpath, d)
                snap[str(p)] = ("dir", stat.S_IMODE(p.lstat().st_mode))
            for f in filenames:
                p = Path(dirpath, f)
                st = p.lstat()
                if stat.S_ISLNK(st.st_mode):
                    snap[str(p)] = ("link", os.readlink(p))
                else:
                    snap[str(p)] = ("file", hashlib.sha1(p.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode))
    return snap


def snapshot_changes(before: dict, after: dict) -> list[str]:
    out = [f"changed: {k}" for k in before if k in after and before[k] != after[k]]
    out += [f"removed: {k}" for k in before if k not in after]
    out += [f"new: {k}" for k in after if k not in before]
    return out


# --------------------------------------------------------------------------- setup helpers


def write(rel: str, text: str | bytes) -> Callable[[Path, World], None]:
    def setup(ws: Path, w: World) -> None:
        p = ws / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)

    return setup


def both(*setups: Callable[[Path, World], None]) -> Callable[[Path, World], None]:
    def setup(ws: Path, w: World) -> None:
        for s in setups:
            s(ws, w)

    return setup


def copy_run(src: str, dst: str = "run", drop: tuple[str, ...] = ()) -> Callable[[Path, World], None]:
    """A copy of one of the world's run folders into ``{ws}/<dst>``, its config.yaml pointing at the copy
    (so a --resume of the copy asks for the settings it was trained with)."""

    def setup(ws: Path, w: World) -> None:
        origin = getattr(w, src)
        shutil.copytree(origin, ws / dst, symlinks=True)
        cfg = ws / dst / "config.yaml"
        cfg.write_text(cfg.read_text().replace(str(origin), str(ws / dst)))
        for rel in drop:
            p = ws / dst / rel
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    return setup


def latest_step(ws: Path) -> Path:
    return sorted((ws / "run" / "checkpoints").glob("step*"))[-1]


def misfit_checkpoint(ws: Path, w: World) -> None:
    """A checkpoint whose tensors do not fit the model (one weight matrix lost a row)."""
    import torch

    path = latest_step(ws) / "state.pt"
    state = torch.load(path, weights_only=False)
    key = next(k for k, v in state["model"].items() if v.dim() == 2)
    state["model"][key] = state["model"][key][:-1]
    torch.save(state, path)


def chmod_locked(ws: Path, w: World) -> None:
    (ws / "locked").mkdir()
    (ws / "locked").chmod(0o555)


def _tsv(rows: list[list[str]]) -> str:
    return "".join("\t".join(r) + "\n" for r in rows)


CSV_OK = "sentence,label\n" + "a fine film,pos\na dull film,neg\n" * 20
# an MNLI file in GLUE's layout: 12 columns, the label last
MNLI_TSV = _tsv([[f"c{i}" for i in range(11)] + ["gold_label"], ["x"] * 8 + ["a", "b", "x", "entailment"]])
TSV_OK = _tsv([["sentence", "label"]] + [["a fine film", "1"], ["a dull film", "0"]] * 20)
# `kdqat finetune` on a custom task read from {ws}/train.* and {ws}/dev.* (labels neg, pos unless changed)
CUSTOM_BASE = [
    "finetune",
    "--config",
    "tiny_debug",
    "model.name_or_path={teacher}",
    "train.output_dir={ws}/out",
    "train.max_steps=1",
    "data.task=custom",
]
CUSTOM = [*CUSTOM_BASE, "data.label_list=[neg, pos]"]
FT = ["finetune", "--config", "tiny_debug", "model.name_or_path={teacher}", "train.output_dir={ws}/out"]
TR = ["train", "--config", "tiny_debug", "teacher.path={teacher}", "train.output_dir={ws}/out", "train.max_steps=1"]
CFG = ["config", "tiny_debug"]
SWEEP = ["sweep", "--config", "{ws}/spec.yaml", "--num-cpus", "1", "--quiet"]


def spec(text: str) -> Callable[[Path, World], None]:
    """A sweep spec in {ws}/spec.yaml (``{teacher}`` etc. filled in when it is written)."""

    def setup(ws: Path, w: World) -> None:
        (ws / "spec.yaml").write_text(text.format(**w.fields(ws)))

    return setup


SPEC_OK = """name: probe
base: tiny_debug
output_dir: {ws}/sweep
teacher_path: {teacher}
overrides: {{train.max_steps: 1}}
"""


def hf_export_loads_as_the_student(ws: Path, w: World) -> None:
    """``from_pretrained`` on a packed export gives the quantized student or refuses; random weights are
    what the probe found (transformers warns and goes on)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import kdqat_dist  # noqa: F401  (registers the kdqat quantizer)
    from kdqat_dist.export import load

    model = AutoModelForSequenceClassification.from_pretrained(w.export).eval()
    ref = load(w.export).eval()
    batch = {"input_ids": torch.tensor([[2, 30, 40, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, ref(**batch).logits)
    assert not same, "from_pretrained(export) gave the student: nothing to refuse"
    raise AssertionError("from_pretrained(export) loaded other weights than the export's, without an error")


def hf_run_folder_as_model(ws: Path, w: World) -> None:
    from kdqat_dist.models.encoders import load_classifier

    load_classifier(str(w.kd_run), 2, strict=True)


# --------------------------------------------------------------------------- the cases

C: list[Case] = []


def case(cid: str, cls: str, argv: list[str], expect: str, **kw) -> None:
    C.append(Case(cid, cls, argv, expect, **kw))


def data_case(
    cid: str,
    train: str | bytes,
    dev: str | bytes,
    expect: str,
    suffix: str = ".csv",
    base: list[str] = CUSTOM,
    cls: str = "data",
) -> None:
    """A case reading ``train`` and ``dev`` (file contents) as the custom task's files."""
    argv = [*base, f"data.train_file={{ws}}/train{suffix}", f"data.dev_file={{ws}}/dev{suffix}"]
    case(cid, cls, argv, expect, setup=both(write(f"train{suffix}", train), write(f"dev{suffix}", dev)))


# ---- config files and overrides
case("recipe-unknown", "config", ["train", "--config", "nope"], r"config file not found: nope \(shipped recipes:")
case("recipe-is-folder", "config", ["train", "--config", "{ws}"], r"cannot be read")
case(
    "recipe-empty",
    "config",
    ["train", "--config", "{ws}/r.yaml"],
    r"r.yaml: the file is empty",
    setup=write("r.yaml", ""),
)
case("recipe-comments-only", "config", [*CFG[:1], "{ws}/r.yaml"], r"is empty", setup=write("r.yaml", "# nothing\n"))
case("recipe-top-list", "config", [*CFG[:1], "{ws}/r.yaml"], r"top level must be", setup=write("r.yaml", "- a\n- b\n"))
case("recipe-top-scalar", "config", [*CFG[:1], "{ws}/r.yaml"], r"top level must be", setup=write("r.yaml", "5\n"))
case(
    "recipe-bad-yaml",
    "config",
    [*CFG[:1], "{ws}/r.yaml"],
    r"line \d+ is not valid YAML",
    setup=write("r.yaml", "train:\n  lr: [1,\n"),
)
case(
    "recipe-tab-indent",
    "config",
    [*CFG[:1], "{ws}/r.yaml"],
    r"not valid YAML",
    setup=write("r.yaml", "train:\n\tlr: 1\n"),
)
case(
    "recipe-dup-section",
    "config",
    [*CFG[:1], "{ws}/r.yaml"],
    r"line 3: key 'train' is given twice",
    setup=write("r.yaml", "train:\n  lr: 1.0e-3\ntrain:\n  seed: 3\n"),
)
case(
    "recipe-dup-key",
    "config",
    [*CFG[:1], "{ws}/r.yaml"],
    r"key 'lr' is given twice",
    setup=write("r.yaml", "train:\n  lr: 1\n  lr: 2\n"),
)
case(
    "recipe-section-scalar",
    "config",
    [*CFG[:1], "{ws}/r.yaml"],
    r"^kdqat: error: train: expected a mapping",
    setup=write("r.yaml", "train: 5\n"),
)
case(
    "recipe-section-scalar-override",
    "config",
    [*CFG[:1], "{ws}/r.yaml", "train.lr=1e-3"],
    r"train: is 5, not a mapping",
    setup=write("r.yaml", "train: 5\n"),
)
case(
    "recipe-section-null",
    "config",
    [*CFG[:1], "{ws}/r.yaml"],
    r"train: expected a mapping",
    setup=write("r.yaml", "train:\n"),
)
case(
    "recipe-section-list",
    "config",
    [*CFG[:1], "{ws}/r.yaml"],
    r"quant: expected a mapping",
    setup=write("r.yaml", "quant: [1, 2]\n"),
)
case(
    "recipe-unknown-section",
    "config",
    [*CFG[:1], "{ws}/r.yaml"],
    r"unknown key 'trian'",
    setup=write("r.yaml", "trian: {lr: 1}\n"),
)
case(
    "recipe-not-utf8",
    "config",
    [*CFG[:1], "{ws}/r.yaml"],
    r"not UTF-8",
    setup=write("r.yaml", b"train:\n  lr: \xff\xfe\n"),
)
case("override-unknown-key", "config", [*CFG, "train.lrr=1"], r"unknown key 'train.lrr'")
case("override-unknown-nested", "config", [*CFG, "quant.weight.bitz=2"], r"unknown key 'quant.weight.bitz'")
case(
    "override-no-equals",
    "config",
    ["train", "--config", "tiny_debug", "train.lr"],
    r"unrecognized arguments|expected key=value",
)
case("override-empty-key", "config", [*CFG, "=5"], r"empty key")
case("override-int-text", "config", [*CFG, "train.max_steps=abc"], r"train.max_steps: expected an integer")
case("override-int-fraction", "config", [*CFG, "train.max_steps=1.5"], r"train.max_steps: expected an integer")
case("override-bool-text", "config", [*CFG, "train.progress=maybe"], r"train.progress: expected true or false")
case("override-bits", "config", [*CFG, "quant.weight.bits=5"], r"quant.weight.bits: got 5; allowed: 2, 3, 4, 8")
case("override-method", "config", [*CFG, "quant.weight.method=xyz"], r"quant.weight.method: got 'xyz'")
case("override-twn-4bit", "config", [*CFG, "quant.weight.bits=4"], r"quant.weight.method: twn is ternary")
case("override-leaf-as-section", "config", [*CFG, "train.lr.x=1"], r"train.lr: is 0.001, not a mapping of keys")
case("override-section-as-leaf", "config", [*CFG, "train=5"], r"train: expected a mapping")
case("override-str-list", "config", [*CFG, "train.output_dir=[1, 2]"], r"train.output_dir: expected a string")
case("override-output-dir-empty", "config", [*CFG, "train.output_dir="], r"train.output_dir: got ''; must not be empty")
case("override-label-list-str", "config", [*CFG, "data.label_list=abc"], r"data.label_list: expected a list")
case(
    "override-bad-regex-rule",
    "config",
    [*CFG, "quant.rules=[{pattern: '('}]"],
    r"quant.rules\[0\].pattern: .* is not a valid regex",
)
case("override-empty-rule", "config", [*CFG, "quant.rules=[{pattern: ''}]"], r"must be a non-empty regex")
case("override-bad-skip", "config", [*CFG, "quant.skip=['[']"], r"quant.skip\[0\]: .* is not a valid regex")
case("override-rules-not-list", "config", [*CFG, "quant.rules=5"], r"quant.rules: expected a list")
case("override-layer-map", "config", [*CFG, "distill.layer_map=bogus"], r"distill.layer_map: got 'bogus'")
case("override-relation", "config", [*CFG, "distill.attn_relation.relations=[xx]"], r"relations\[0\]: got 'xx'")
case(
    "override-relation-empty",
    "config",
    [*CFG, "distill.attn_relation.weight=1", "distill.attn_relation.relations=[]"],
    r"has a weight but no relations",
)
case(
    "train-relation-layer-missing",
    "config",
    [*TR, "distill.attn_relation.weight=1", "distill.attn_relation.layers=[7]"],
    r"distill.attn_relation.layers: student layers \[7\] do not exist",
)
case(
    "override-no-loss",
    "config",
    [*CFG, *(f"distill.{t}.weight=0" for t in ("logits", "hidden", "attn_map", "attn_output"))],
    r"every loss weight is 0",
)
case(
    "override-ds-bertadam",
    "config",
    [*CFG, "engine.deepspeed.optimizer=deepspeed", "train.optimizer=bertadam"],
    r"engine.deepspeed.optimizer: deepspeed",
)
case("override-engine-backend", "config", [*CFG, "engine.backend=fsdp9"], r"engine.backend: got 'fsdp9'")
case("override-device", "config", [*CFG, "train.device=tpu"], r"train.device: got 'tpu'")
case("override-padding", "config", [*CFG, "data.padding=both"], r"data.padding: got 'both'")
case("config-cmd-unknown-recipe", "config", ["config", "nope"], r"config file not found: nope")
case(
    "ds-config-missing",
    "config",
    [*TR, "engine.backend=deepspeed", "engine.deepspeed.config={ws}/nope.json"],
    r"engine.deepspeed.config: .*nope.json does not exist",
)
case(
    "ds-config-folder",
    "config",
    [*TR, "engine.backend=deepspeed", "engine.deepspeed.config={ws}"],
    r"engine.deepspeed.config: .* is not a file",
)

# ---- numeric settings: every one refused by the config loader
NUMERIC = {
    "train.log_every=0": r"train.log_every: got 0; must be >= 1",
    "train.seed=-1": r"train.seed: got -1; must be in \[0, 4294967295\]",
    "train.seed=4294967296": r"train.seed: got 4294967296",
    "train.adam_eps=-1": r"train.adam_eps: got -1.0; must be > 0",
    "train.adam_eps=0": r"train.adam_eps: got 0.0; must be > 0",
    "train.adam_eps=nan": r"train.adam_eps: got 'nan'; must be a finite number",
    "train.epochs=inf": r"train.epochs: got 'inf'; must be a finite number",
    "train.epochs=0": r"train.epochs: got 0.0; must be > 0",
    "train.epochs=-1": r"train.epochs: got -1.0",
    "train.lr=0": r"train.lr: got 0.0; must be > 0",
    "train.lr=.nan": r"train.lr: got nan; must be a finite number",
    "train.lr=-.inf": r"train.lr: got -inf; must be a finite number",
    "train.lr=1e400": r"train.lr: .*must be a finite number",
    "train.weight_decay=-0.1": r"train.weight_decay: got -0.1",
    "train.warmup_ratio=1": r"train.warmup_ratio: got 1.0; must be in \[0, 1\)",
    "train.warmup_ratio=-0.1": r"train.warmup_ratio: got -0.1",
    "train.max_grad_norm=-1": r"train.max_grad_norm: got -1.0",
    "train.max_grad_norm=inf": r"train.max_grad_norm: got 'inf'; must be a finite number",
    "train.dropout=1": r"train.dropout: got 1.0",
    "train.dropout=-0.5": r"train.dropout: got -0.5",
    "train.batch_size=0": r"train.batch_size: got 0",
    "train.batch_size=-16": r"train.batch_size: got -16",
    "train.eval_batch_size=-1": r"train.eval_batch_size: got -1",
    "train.grad_accum=0": r"train.grad_accum: got 0",
    "train.max_steps=0": r"train.max_steps: got 0",
    "train.max_steps=-5": r"train.max_steps: got -5",
    "train.eval_every=0": r"train.eval_every: got 0",
    "train.save_every=0": r"train.save_every: got 0",
    "train.keep_checkpoints=0": r"train.keep_checkpoints: got 0",
    "train.quant_weight_lr=-1": r"train.quant_weight_lr: got -1.0",
    "train.quant_act_lr=nan": r"train.quant_act_lr: got 'nan'",
    "data.max_seq_length=4": r"data.max_seq_length: got 4; must be >= 8",
    "data.max_seq_length=0": r"data.max_seq_length: got 0",
    "data.demo_size=1": r"data.demo_size: got 1; must be >= 2",
    "data.demo_size=-100": r"data.demo_size: got -100",
    "data.demo_seed=-5": r"data.demo_seed: got -5",
    "data.max_train_samples=0": r"data.max_train_samples: got 0",
    "data.max_eval_samples=-1": r"data.max_eval_samples: got -1",
    "data.num_labels=0": r"data.num_labels: got 0",
    "student.num_layers=0": r"student.num_layers: got 0",
    "quant.weight.clip=0": r"quant.weight.clip: got 0.0; must be > 0 or null",
    "quant.weight.clip=-1": r"quant.weight.clip: got -1.0",
    "quant.weight.percentile=40": r"quant.weight.percentile: got 40.0; must be in \(50, 100\]",
    "quant.act.percentile=101": r"quant.act.percentile: got 101.0",
    "quant.act.clip=inf": r"quant.act.clip: got 'inf'; must be a finite number or null",
    "distill.temperature=0": r"distill.temperature: got 0.0",
    "distill.temperature=inf": r"distill.temperature: got 'inf'",
    "distill.gamma=1.5": r"distill.gamma: got 1.5; must be in \[0, 1\] or null",
    "distill.logits.weight=-1": r"distill.logits.weight: got -1.0; must be >= 0",
    "distill.hidden.weight=nan": r"distill.hidden.weight: got 'nan'",
    "distill.attn_relation.relation_heads=0": r"relation_heads: got 0",
    "tune.num_samples=0": r"tune.num_samples: got 0",
    "tune.grace_period=0": r"tune.grace_period: got 0",
    "tune.max_failures=-2": r"tune.max_failures: got -2; must be >= -1",
    "tune.cpus_per_worker=0": r"tune.cpus_per_worker: got 0",
    "tune.num_workers=0": r"tune.num_workers: got 0",
    "tune.gpus_per_worker=-1": r"tune.gpus_per_worker: got -1.0",
    "analysis.samples=0": r"analysis.samples: got 0",
    "analysis.seed=-1": r"analysis.seed: got -1",
    "analysis.top_k=0": r"analysis.top_k: got 0",
    "analysis.hessian_tol=0": r"analysis.hessian_tol: got 0.0",
    "analysis.hessian_samples=-1": r"analysis.hessian_samples: got -1",
    "analysis.hessian_iters=0": r"analysis.hessian_iters: got 0",
    "analysis.length_buckets=0": r"analysis.length_buckets: got 0",
    "analysis.hessian_norm_weight=-0.01": r"analysis.hessian_norm_weight: got -0.01",
}
for ov, pattern in NUMERIC.items():
    case(f"num-{ov}", "numeric", [*CFG, ov], pattern)
# the same refusals where a user meets them: from a recipe file, and on the command that runs
case(
    "num-in-recipe",
    "numeric",
    ["train", "--config", "{ws}/r.yaml"],
    r"train.log_every: got 0",
    setup=write("r.yaml", "train:\n  log_every: 0\n"),
)
case("num-on-train", "numeric", [*TR, "train.seed=-1"], r"train.seed: got -1")
case("num-on-finetune", "numeric", [*FT, "train.adam_eps=nan"], r"train.adam_eps: got 'nan'")
case("num-on-demo", "numeric", ["demo", "train.epochs=inf"], r"train.epochs: got 'inf'")
case(
    "num-on-eval",
    "numeric",
    ["eval", "--model", "{teacher}", "--config", "tiny_debug", "train.eval_batch_size=0"],
    r"eval_batch_size: got 0",
)
case(
    "num-len-beyond-positions-train",
    "numeric",
    [*TR, "data.max_seq_length=512"],
    r"data.max_seq_length: got 512, but the model .* has 160 positions",
)
case(
    "num-len-beyond-positions-ft",
    "numeric",
    [*FT, "data.max_seq_length=4096"],
    r"has 160 positions; set data.max_seq_length to 160 or less",
)
case(
    "num-len-default-beyond-positions",
    "numeric",
    [*FT, "data.task=mrpc", "data.source={ws}/glue", "data.max_seq_length=null", "model.name_or_path={ws}/short"],
    r"the task's default is 128, but the model .* has \d+ positions",
    setup=lambda ws, w: _short_model(ws / "short"),
)
case(
    "num-len-beyond-positions-eval",
    "numeric",
    ["eval", "--model", "{student}", "--config", "tiny_debug", "data.max_seq_length=1000"],
    r"has 160 positions",
)


def _short_model(out: Path) -> None:
    from kdqat_dist.models.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (out / "config.json").write_text(json.dumps(cfg))


# ---- data files
data_case(
    "data-dup-csv-column", "sentence,label,label\na,pos,neg\n", CSV_OK, r"train.csv:1: column 'label' appears twice"
)
data_case(
    "data-dup-tsv-column",
    _tsv([["label", "sentence", "sentence"], ["1", "a", "b"]]),
    TSV_OK,
    r"column 'sentence' appears twice",
    ".tsv",
)
data_case(
    "data-dup-dev-column", CSV_OK, "sentence,sentence,label\na,b,pos\n", r"dev.csv:1: column 'sentence' appears twice"
)
data_case("data-missing-label-column", "sentence,target\na,pos\n", CSV_OK, r"column 'label' \(data.label\) not found")
data_case(
    "data-missing-text-b",
    CSV_OK,
    CSV_OK,
    r"column 'premise' \(data.text_b\) not found",
    base=[*CUSTOM, "data.text_b=premise"],
)
data_case(
    "data-label-not-in-set",
    "sentence,label\na,maybe\n",
    CSV_OK,
    r"train.csv:2, column 'label': label 'maybe' is not in the label set",
)
data_case("data-empty-text", "sentence,label\n ,pos\n", CSV_OK, r"train.csv:2: column 'sentence' has no value")
data_case("data-not-utf8", b"sentence,label\n\xff\xfe,pos\n", CSV_OK, r"train.csv: could not be read as CSV")
data_case("data-zero-bytes", "", CSV_OK, r"train.csv: the file is empty")
data_case("data-header-only", "sentence,label\n", CSV_OK, r"train.csv: the header is the only line; there are no rows")
data_case(
    "data-jsonl-broken",
    '{"sentence": "a", "label": "pos"}\n{"sentence": \n',
    '{"sentence": "a", "label": "pos"}\n',
    r"could not be read as JSONL",
    ".jsonl",
)
data_case("data-parquet-garbage", "not parquet at all", "x", r"could not be read as PARQUET", ".parquet")
data_case("data-unsupported-suffix", CSV_OK, CSV_OK, r"unsupported file type '.txt'", ".txt")
case(
    "data-train-missing",
    "data",
    [*CUSTOM, "data.train_file={ws}/nope.csv", "data.dev_file={ws}/nope.csv"],
    r"data.train_file: file not found",
)
case(
    "data-train-is-folder",
    "data",
    [*CUSTOM, "data.train_file={ws}", "data.dev_file={ws}"],
    r"data.train_file: not a file",
)
case(
    "data-dev-without-train",
    "data",
    [*CUSTOM, "data.dev_file={ws}/dev.csv"],
    r"data.dev_file is set but data.train_file is not",
    setup=write("dev.csv", CSV_OK),
)
case(
    "data-custom-no-labels",
    "data",
    [*CUSTOM[:-1], "data.train_file={ws}/t.csv"],
    r"a custom task needs data.label_list",
    setup=write("t.csv", CSV_OK),
)
case("data-label-list-dups", "data", [*CUSTOM[:-1], "data.label_list=[a, a]"], r"need >= 2 distinct labels")
case(
    "data-num-labels-mismatch",
    "data",
    [*CUSTOM, "data.num_labels=3"],
    r"data.num_labels: got 3 but data.label_list has 2",
)
data_case(
    "data-regression-text-label",
    "sentence,label\na,high\n",
    "sentence,label\na,1.0\n",
    r"label 'high' is not a finite number",
    base=[*CUSTOM_BASE, "data.num_labels=1"],
)
case(
    "data-regression-nan-label",
    "data",
    [*FT, "data.task=stsb", "data.source={ws}/glue"],
    r"label 'nan' is not a finite number",
    setup=write(
        "glue/train.tsv",
        _tsv(
            [
                ["i", "g", "f", "y", "s", "a", "b", "sentence1", "sentence2", "score"],
                ["1", "x", "x", "x", "x", "x", "x", "a", "b", "nan"],
            ]
        ),
    ),
)
case("data-task-unknown", "data", [*FT, "data.task=sst3"], r"data.task: unknown task 'sst3'")
case(
    "data-demo-with-files",
    "data",
    [*FT, "data.train_file={ws}/t.csv"],
    r"data.task: demo is built in",
    setup=write("t.csv", CSV_OK),
)
case(
    "data-glue-no-train",
    "data",
    [*FT, "data.task=rte", "data.source={ws}/glue"],
    r"data.source: .*train.tsv not found",
    setup=write("glue/dev.tsv", "x\n"),
)
case(
    "data-glue-malformed-row",
    "data",
    [*FT, "data.task=sst2", "data.source={ws}/glue"],
    r"train.tsv:3: malformed row",
    setup=write("glue/train.tsv", "sentence\tlabel\na\t1\nb\t0\textra\n"),
)
case(
    "data-glue-short-header",
    "data",
    [*FT, "data.task=rte", "data.source={ws}/glue"],
    r"train.tsv:1: the header has 1 column",
    setup=write("glue/train.tsv", "index\n"),
)
case(
    "data-glue-mnli-half-dev",
    "data",
    [*FT, "data.task=mnli", "data.source={ws}/glue"],
    r"dev_mismatched.tsv not found",
    setup=both(write("glue/train.tsv", MNLI_TSV), write("glue/dev_matched.tsv", MNLI_TSV)),
)
case(
    "data-source-is-file",
    "data",
    [*FT, "data.task=sst2", "data.source={ws}/t.csv"],
    r"data.source: .* is not a folder",
    setup=write("t.csv", CSV_OK),
)
case(
    "data-source-missing-path",
    "data",
    [*FT, "data.task=sst2", "data.source=./no/such/folder"],
    r"data.source: ./no/such/folder is not a folder",
)
case(
    "data-cache-dir-is-file",
    "data",
    [*FT, "data.cache_dir={ws}/c"],
    r"data.cache_dir: .* is a file",
    setup=write("c", "x"),
)
case(
    "data-cache-dir-under-file",
    "data",
    [*FT, "data.cache_dir={ws}/c/sub"],
    r"data.cache_dir: .*c is a file, so",
    setup=write("c", "x"),
)
case(
    "data-kdqat-cache-is-file",
    "data",
    [*FT, "model.name_or_path=tiny-bert"],
    r"\$KDQAT_CACHE: .* is a file",
    setup=write("cachefile", "x"),
    env={"KDQAT_CACHE": "{ws}/cachefile"},
)

# ---- the user's folders: nothing overwritten or misused
case(
    "out-is-teacher",
    "files",
    [*TR[:4], "train.output_dir={teacher}"],
    r"train.output_dir: .* is the folder of teacher.path",
)
case(
    "out-inside-teacher", "files", [*TR[:4], "train.output_dir={teacher}/run"], r"is inside the folder of teacher.path"
)
case("out-contains-teacher", "files", [*TR[:4], "train.output_dir={root}"], r"contains the folder of teacher.path")
case(
    "out-is-teacher-via-symlink",
    "files",
    [*TR[:4], "train.output_dir={ws}/link"],
    r"is the folder of teacher.path",
    setup=lambda ws, w: (ws / "link").symlink_to(w.teacher),
)
case(
    "ft-out-is-model",
    "files",
    ["finetune", "--config", "tiny_debug", "model.name_or_path={teacher}", "train.output_dir={teacher}"],
    r"is the folder of model.name_or_path",
)
case(
    "ft-out-contains-model",
    "files",
    ["finetune", "--config", "tiny_debug", "model.name_or_path={teacher}", "train.output_dir={ft_run}"],
    r"contains the folder of model.name_or_path",
)
case(
    "init-from-inside-out",
    "files",
    [*TR, "student.init_from={ws}/out/init"],
    r"contains the folder of student.init_from",
    setup=lambda ws, w: shutil.copytree(w.teacher, ws / "out" / "init"),
)
case(
    "teacher-is-student",
    "files",
    [*TR[:3], "teacher.path={student}", "train.output_dir={ws}/out"],
    r"teacher.path: .* is a kdqat student folder .*the teacher must be a full-precision",
)
case(
    "teacher-is-export",
    "files",
    [*TR[:3], "teacher.path={export}", "train.output_dir={ws}/out"],
    r"teacher.path: .* is a kdqat export folder",
)
case(
    "teacher-is-train-run",
    "files",
    [*TR[:3], "teacher.path={kd_run}", "train.output_dir={ws}/out"],
    r"teacher.path: .* is a `kdqat train` run folder",
)
case(
    "teacher-is-finetune-run",
    "files",
    [*TR[:3], "teacher.path={ft_run}", "train.output_dir={ws}/out"],
    r"teacher.path: .* is a `kdqat finetune` run folder; its model is",
)
case(
    "teacher-config-says-quantized",
    "files",
    [*TR[:3], "teacher.path={ws}/t", "train.output_dir={ws}/out"],
    r"teacher.path: .* is a kdqat student folder",
    setup=lambda ws, w: (shutil.copytree(w.student, ws / "t"), (ws / "t" / "kdqat_student.json").unlink()),
)
case(
    "init-from-is-export",
    "files",
    [*TR, "student.init_from={export}"],
    r"student.init_from: .* is a kdqat export folder .*; the student's starting point must be",
)
case(
    "ft-from-student",
    "files",
    ["finetune", "--config", "tiny_debug", "model.name_or_path={student}", "train.output_dir={ws}/out"],
    r"model.name_or_path: .* is a kdqat student folder",
)
case(
    "teacher-missing",
    "files",
    [*TR[:3], "teacher.path={ws}/nope", "train.output_dir={ws}/out"],
    r"teacher.path: .*nope does not exist",
)
case(
    "teacher-empty",
    "files",
    ["train", "--config", "tiny_debug", "train.output_dir={ws}/out"],
    r"teacher.path: required",
)
case(
    "teacher-not-a-model",
    "files",
    [*TR[:3], "teacher.path={ws}/t", "train.output_dir={ws}/out"],
    r"has no config.json",
    setup=write("t/weights.bin", "x"),
)
case(
    "out-is-file",
    "files",
    [*TR[:4], "train.output_dir={ws}/f"],
    r"train.output_dir: .*f is a file, not a folder",
    setup=write("f", "mine"),
)
case(
    "out-under-file",
    "files",
    [*TR[:4], "train.output_dir={ws}/f/run"],
    r"train.output_dir: .*f is a file, so .* cannot be created",
    setup=write("f", "mine"),
)
case(
    "out-dangling-symlink",
    "files",
    [*TR[:4], "train.output_dir={ws}/l"],
    r"is a symbolic link to nothing",
    setup=lambda ws, w: (ws / "l").symlink_to(ws / "gone"),
)
case(
    "out-is-model-folder",
    "files",
    [*TR[:4], "train.output_dir={ws}/m"],
    r"is a model folder \(config.json\)",
    setup=lambda ws, w: shutil.copytree(w.teacher, ws / "m"),
)
case("out-holds-run", "files", [*TR[:4], "train.output_dir={kd_run}"], r"already holds a run")
case(
    "ft-out-holds-run",
    "files",
    [*FT, "train.output_dir={ft_run}"],
    r"contains the folder of model.name_or_path|already holds a run",
)
case(
    "demo-out-is-file",
    "files",
    ["demo", "--config", "tiny_debug", "train.output_dir={ws}/f", "train.max_steps=1"],
    r"train.output_dir: .*f is a file",
    setup=write("f", "mine"),
)
case(
    "demo-out-holds-demo",
    "files",
    ["demo", "--config", "tiny_debug", "train.output_dir={ws}/d", "train.max_steps=1"],
    r"already holds a demo run",
    setup=write("d/summary.json", "{}"),
)
case(
    "eval-model-missing",
    "files",
    ["eval", "--model", "{ws}/nope", "--config", "tiny_debug"],
    r"--model: .*nope does not exist",
)
case(
    "eval-model-is-file",
    "files",
    ["eval", "--model", "{ws}/f", "--config", "tiny_debug"],
    r"f",
    setup=write("f", "mine"),
)
case(
    "analyze-teacher-export",
    "files",
    ["analyze", "--teacher", "{export}", "--student", "{student}", "--out", "{ws}/an", "--config", "tiny_debug"],
    r"--teacher: .* is a kdqat export folder",
)
case(
    "analyze-teacher-student",
    "files",
    ["analyze", "--teacher", "{student}", "--student", "{student}", "--out", "{ws}/an", "--config", "tiny_debug"],
    r"--teacher: .* is a kdqat student folder",
)
case(
    "analyze-out-nonempty",
    "files",
    ["analyze", "--teacher", "{teacher}", "--student", "{student}", "--out", "{ws}", "--config", "tiny_debug"],
    r"--out: .* already exists and is not empty",
    setup=write("x", "mine"),
)
case(
    "analyze-out-is-file",
    "files",
    ["analyze", "--teacher", "{teacher}", "--student", "{student}", "--out", "{ws}/f", "--config", "tiny_debug"],
    r"--out: .* already exists",
    setup=write("f", "mine"),
)
case(
    "analyze-out-inside-teacher",
    "files",
    ["analyze", "--teacher", "{teacher}", "--student", "{student}", "--out", "{teacher}/an", "--config", "tiny_debug"],
    r"--out: .* is inside the folder of --teacher",
)
case(
    "analyze-len-beyond-positions",
    "numeric",
    ["analyze", "--teacher", "{teacher}", "--student", "{student}", "--out", "{ws}/an", "data.max_seq_length=999"],
    r"data.max_seq_length: got 999, but the model .* has 160 positions",
)
case(
    "analyze-student-is-teacher",
    "files",
    ["analyze", "--teacher", "{teacher}", "--student", "{teacher}", "--out", "{ws}/an", "--config", "tiny_debug"],
    r"--student: .* is not a kdqat student folder",
)
case(
    "export-out-is-student",
    "files",
    ["export", "--student", "{student}", "--out", "{student}"],
    r"--out: .* already exists and is not an empty folder",
)
case(
    "export-out-is-file",
    "files",
    ["export", "--student", "{student}", "--out", "{ws}/f", "--skip-eval"],
    r"--out: .* already exists",
    setup=write("f", "mine"),
)
case(
    "export-student-is-fp",
    "files",
    ["export", "--student", "{teacher}", "--out", "{ws}/e", "--skip-eval"],
    r"--student: .* is not a quantized student folder",
)
case(
    "sweep-out-is-file",
    "files",
    SWEEP,
    r"output_dir: .*f is a file",
    setup=both(write("f", "x"), spec(SPEC_OK.replace("{ws}/sweep", "{ws}/f") + "search: {{train.seed: [1]}}\n")),
)

# ---- checkpoints and resume
case(
    "resume-finetune-on-train-run",
    "checkpoints",
    ["finetune", "--config", "{kd_run}/config.yaml", "--resume"],
    r"--resume: .* holds a `kdqat train` run, not a `kdqat finetune` one",
)
case(
    "resume-train-on-finetune-run",
    "checkpoints",
    ["train", "--config", "{ws}/run/config.yaml", "--resume", "teacher.path={teacher}"],
    r"holds a `kdqat finetune` run, not a `kdqat train` one",
    setup=copy_run("ft_run"),
)
case(
    "resume-changed-settings",
    "checkpoints",
    ["train", "--config", "{kd_run}/config.yaml", "--resume", "train.lr=0.5"],
    r"--resume: .* was trained with other settings: train.lr",
)
case(
    "resume-out-is-file",
    "checkpoints",
    [*TR, "--resume", "train.output_dir={ws}/f"],
    r"is a file",
    setup=write("f", "x"),
)
case(
    "resume-config-broken",
    "checkpoints",
    ["train", "--config", "{ws}/run/config.yaml", "--resume"],
    r"config.yaml: line \d+ is not valid YAML",
    setup=both(copy_run("kd_run"), lambda ws, w: (ws / "run" / "config.yaml").write_text("train: [\n")),
)
case(
    "resume-config-empty",
    "checkpoints",
    ["train", "--config", "{ws}/run/config.yaml", "--resume"],
    r"config.yaml: the file is empty",
    setup=both(copy_run("kd_run"), lambda ws, w: (ws / "run" / "config.yaml").write_text("")),
)
case(
    "resume-finished-no-ckpt",
    "checkpoints",
    ["train", "--config", "{ws}/run/config.yaml", "--resume"],
    r"holds a finished run and no checkpoint",
    setup=copy_run("kd_run", drop=("checkpoints",)),
)
case(
    "resume-latest-names-missing-step",
    "checkpoints",
    ["train", "--config", "{ws}/run/config.yaml", "--resume"],
    r"latest",
    setup=both(copy_run("kd_run", drop=("metrics.json",)), write("run/checkpoints/latest", "step9999999\n")),
)
case(
    "resume-latest-malformed",
    "checkpoints",
    ["train", "--config", "{ws}/run/config.yaml", "--resume"],
    r"latest",
    setup=both(copy_run("kd_run", drop=("metrics.json",)), write("run/checkpoints/latest", '{"tag": ')),
)
case(
    "resume-latest-is-folder",
    "checkpoints",
    ["train", "--config", "{ws}/run/config.yaml", "--resume"],
    r"latest",
    setup=both(
        copy_run("kd_run", drop=("metrics.json", "checkpoints/latest")),
        lambda ws, w: (ws / "run/checkpoints/latest").mkdir(),
    ),
)
case(
    "resume-tensors-do-not-fit",
    "checkpoints",
    ["train", "--config", "{ws}/run/config.yaml", "--resume"],
    r"state.pt|checkpoint",
    setup=both(copy_run("kd_run", drop=("metrics.json",)), misfit_checkpoint),
)
case(
    "resume-state-truncated",
    "checkpoints",
    ["train", "--config", "{ws}/run/config.yaml", "--resume"],
    r"checkpoint|state.pt",
    setup=both(
        copy_run("kd_run", drop=("metrics.json",)),
        lambda ws, w: (latest_step(ws) / "state.pt").write_bytes(b"PK\x03\x04 broken"),
    ),
)
case(
    "eval-student-meta-broken",
    "checkpoints",
    ["eval", "--model", "{ws}/s", "--config", "tiny_debug"],
    r"kdqat_student.json|s",
    setup=lambda ws, w: (
        shutil.copytree(w.student, ws / "s"),
        (ws / "s" / "kdqat_student.json").write_text("{not json"),
    ),
)
case(
    "eval-student-weights-broken",
    "checkpoints",
    ["eval", "--model", "{ws}/s", "--config", "tiny_debug"],
    r"model.safetensors",
    setup=lambda ws, w: (
        shutil.copytree(w.student, ws / "s"),
        (ws / "s" / "model.safetensors").write_bytes(b"garbage"),
    ),
)
case(
    "eval-export-weights-tampered",
    "checkpoints",
    ["eval", "--model", "{ws}/e", "--config", "tiny_debug"],
    r"checksum|sha|does not match|damaged|modified",
    setup=lambda ws, w: (shutil.copytree(w.export, ws / "e"), _flip_last_byte(ws / "e")),
)
case(
    "export-student-meta-broken",
    "checkpoints",
    ["export", "--student", "{ws}/s", "--out", "{ws}/e", "--skip-eval"],
    r"kdqat_student.json is unreadable",
    setup=lambda ws, w: (shutil.copytree(w.student, ws / "s"), (ws / "s" / "kdqat_student.json").write_text("[]")),
)


def _flip_last_byte(folder: Path) -> None:
    f = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


# ---- the command line
case("cli-unknown-command", "cli", ["trian", "--config", "tiny_debug"], r"invalid choice: 'trian'")
case("cli-unknown-flag", "cli", ["train", "--config", "tiny_debug", "--bogus"], r"unrecognized arguments: --bogus")
case("cli-config-no-value", "cli", ["train", "--config"], r"expected one argument")
case("cli-demo-procs-zero", "cli", ["demo", "--num-procs", "0"], r"--num-procs: got '0'; must be a positive integer")
case("cli-demo-procs-text", "cli", ["demo", "--num-procs", "x"], r"must be a positive integer")
case("cli-eval-no-model", "cli", ["eval", "--config", "tiny_debug"], r"the following arguments are required: --model")
case("cli-analyze-no-teacher", "cli", ["analyze", "--student", "x", "--out", "y"], r"required: --teacher")
case("cli-export-no-out", "cli", ["export", "--student", "x"], r"required: --out")
case("cli-sweep-no-config", "cli", ["sweep"], r"required: --config")
case(
    "cli-analyze-samples-zero",
    "cli",
    ["analyze", "--teacher", "{teacher}", "--student", "{student}", "--out", "{ws}/an", "--samples", "0"],
    r"samples: got 0",
)
case(
    "cli-analyze-tol-nan",
    "cli",
    ["analyze", "--teacher", "{teacher}", "--student", "{student}", "--out", "{ws}/an", "--hessian-tol", "nan"],
    r"hessian_tol: got nan; must be a finite number",
)
case(
    "cli-analyze-device",
    "cli",
    ["analyze", "--teacher", "{teacher}", "--student", "{student}", "--out", "{ws}/an", "--device", "tpu"],
    r"device: got 'tpu'",
)
case(
    "cli-analyze-seed-negative",
    "cli",
    ["analyze", "--teacher", "{teacher}", "--student", "{student}", "--out", "{ws}/an", "--seed", "-3"],
    r"seed: got -3",
)
case("cli-config-bad-override", "cli", ["config", "tiny_debug", "train.lr=abc"], r"train.lr: expected a number")
case(
    "cli-eval-bad-override",
    "cli",
    ["eval", "--model", "{teacher}", "--config", "tiny_debug", "train.bogus=1"],
    r"unknown key 'train.bogus'",
)
case("cli-demo-bad-override", "cli", ["demo", "engine.deepspeed.zero_stage=7"], r"engine.deepspeed.zero_stage: got 7")

# ---- the launch scripts: what each rank would refuse, refused once before any rank starts
case(
    "launch-torchrun-unknown-recipe",
    "launchers",
    ["bash", "launch/torchrun.sh", "nope_recipe"],
    r"^kdqat: error: config file not found: nope_recipe",
    kind="spawn",
)
case(
    "launch-slurm-bad-override",
    "launchers",
    ["bash", "launch/slurm_single_node.sbatch", "tiny_debug", "train.lr=-1"],
    r"^kdqat: error: train.lr: got -1.0",
    kind="spawn",
)
case(
    "launch-slurm-procs-zero",
    "launchers",
    ["bash", "launch/slurm_single_node.sbatch", "tiny_debug"],
    r"PROCS_PER_NODE=0: must be a positive integer",
    kind="spawn",
    env={"PROCS_PER_NODE": "0"},
)
case(
    "launch-slurm-multi-procs-text",
    "launchers",
    ["bash", "launch/slurm_multi_node.sbatch", "tiny_debug"],
    r"PROCS_PER_NODE=two: must be a positive integer",
    kind="spawn",
    env={"PROCS_PER_NODE": "two"},
)
case(
    "launch-torchrun-procs-zero",
    "launchers",
    ["bash", "launch/torchrun.sh", "tiny_debug"],
    r"NUM_PROCS=0: must be a positive integer",
    kind="spawn",
    env={"NUM_PROCS": "0"},
)
case(
    "launch-ds-bad-command",
    "launchers",
    ["bash", "launch/deepspeed_single_node.sh", "tiny_debug"],
    r"COMMAND=eval: allowed: train, finetune",
    kind="spawn",
    env={"COMMAND": "eval"},
)
case(
    "launch-ds-multi-no-hostfile",
    "launchers",
    ["bash", "launch/deepspeed_multi_node.sh", "tiny_debug"],
    r"HOSTFILE=.*nope: no such readable file",
    kind="spawn",
    env={"HOSTFILE": "/nonexistent/nope"},
)
case(
    "launch-ds-multi-bad-hostfile",
    "launchers",
    ["bash", "launch/deepspeed_multi_node.sh", "tiny_debug"],
    r"is not '<host> slots=<N>'",
    kind="spawn",
    env={"HOSTFILE": "launch/checks.sh"},
)
case(
    "launch-torchrun-no-recipe",
    "launchers",
    ["bash", "launch/torchrun.sh"],
    r"usage: launch/torchrun.sh <recipe>",
    kind="spawn",
)
# what the launch scripts run before the ranks (kdqat_dist/precheck.py), in this process
PRE = [
    "train",
    "--config",
    "tiny_debug",
    "engine.backend=deepspeed",
    "teacher.path={teacher}",
    "train.output_dir={ws}/out",
]
case("pre-unknown-task", "launchers", [*PRE, "data.task=nope"], r"data.task: unknown task 'nope'", kind="precheck")
case(
    "pre-teacher-export",
    "launchers",
    [*PRE, "teacher.path={export}"],
    r"teacher.path: .* is a kdqat export folder",
    kind="precheck",
)
case(
    "pre-teacher-missing",
    "launchers",
    [*PRE, "teacher.path={ws}/nope"],
    r"teacher.path: .*nope does not exist",
    kind="precheck",
)
case("pre-no-teacher", "launchers", [*PRE, "teacher.path="], r"teacher.path: required", kind="precheck")
case(
    "pre-batch-not-divisible",
    "launchers",
    [*PRE, "--world-size", "3"],
    r"train.batch_size: 16 is not divisible by world size 3",
    kind="precheck",
)
case(
    "pre-out-is-teacher",
    "launchers",
    [*PRE, "train.output_dir={teacher}"],
    r"is the folder of teacher.path",
    kind="precheck",
)
case(
    "pre-resume-other-mode",
    "launchers",
    ["finetune", "--resume", "--config", "{kd_run}/config.yaml"],
    r"holds a `kdqat train` run",
    kind="precheck",
)
case(
    "pre-bad-command",
    "launchers",
    ["eval", "--config", "tiny_debug"],
    r"command 'eval': allowed: train, finetune",
    kind="precheck",
)
case("pre-bad-argument", "launchers", [*PRE, "--bogus"], r"unrecognized arguments: --bogus", kind="precheck")

# ---- sweep specs: refused before Ray starts
SEARCH = "search: {{train.seed: [1]}}\n"
case(
    "sweep-unknown-task-search",
    "sweeps",
    SWEEP,
    r"sweep point \(data.task=nope\): data.task: unknown task 'nope'",
    setup=spec(SPEC_OK + "search: {{task: 'grid[nope]'}}\n"),
)
case(
    "sweep-unknown-task-override",
    "sweeps",
    [*SWEEP, "task=nope"],
    r"data.task: unknown task 'nope'",
    setup=spec(SPEC_OK + SEARCH),
)
case("sweep-spec-missing", "sweeps", ["sweep", "--config", "{ws}/nope.yaml"], r"sweep spec file not found")
case("sweep-spec-empty", "sweeps", SWEEP, r"spec.yaml: the file is empty", setup=spec(""))
case("sweep-spec-list", "sweeps", SWEEP, r"the top level must be a mapping", setup=spec("- a\n"))
case("sweep-spec-dup-key", "sweeps", SWEEP, r"key 'search' is given twice", setup=spec(SPEC_OK + SEARCH + SEARCH))
case(
    "sweep-unknown-top-key",
    "sweeps",
    SWEEP,
    r"unknown top-level key 'serach'",
    setup=spec(SPEC_OK + "serach: {{a: 1}}\n"),
)
case("sweep-no-base", "sweeps", SWEEP, r"base: required", setup=spec("name: x\n" + SEARCH))
case(
    "sweep-base-unknown",
    "sweeps",
    SWEEP,
    r"config file not found: nope",
    setup=spec(SPEC_OK.replace("tiny_debug", "nope") + SEARCH),
)
case(
    "sweep-search-unknown-key",
    "sweeps",
    SWEEP,
    r"search: unknown config key 'train.lrr'",
    setup=spec(SPEC_OK + "search: {{train.lrr: [1]}}\n"),
)
case(
    "sweep-search-bad-domain",
    "sweeps",
    SWEEP,
    r"unknown search domain 'grd'",
    setup=spec(SPEC_OK + "search: {{train.lr: {{grd: [1]}}}}\n"),
)
case(
    "sweep-uniform-reversed",
    "sweeps",
    SWEEP,
    r"low must be < high",
    setup=spec(SPEC_OK + "search: {{train.lr: 'uniform[1, 0.1]'}}\n"),
)
case(
    "sweep-loguniform-zero",
    "sweeps",
    SWEEP,
    r"bounds must be > 0",
    setup=spec(SPEC_OK + "search: {{train.lr: 'loguniform[0, 1]'}}\n"),
)
case("sweep-grid-empty", "sweeps", SWEEP, r"empty list", setup=spec(SPEC_OK + "search: {{train.seed: {{grid: []}}}}\n"))
case(
    "sweep-value-out-of-range",
    "sweeps",
    SWEEP,
    r"train.lr: got -1.0; must be > 0",
    setup=spec(SPEC_OK + "search: {{train.lr: [1.0e-3, -1]}}\n"),
)
case(
    "sweep-value-nan",
    "sweeps",
    SWEEP,
    r"must be a finite number",
    setup=spec(SPEC_OK + "search: {{train.lr: [.nan]}}\n"),
)
case(
    "sweep-search-output-dir",
    "sweeps",
    SWEEP,
    r"train.output_dir is set per trial",
    setup=spec(SPEC_OK + "search: {{train.output_dir: [a, b]}}\n"),
)
case(
    "sweep-search-tune-key",
    "sweeps",
    SWEEP,
    r"cannot vary per trial",
    setup=spec(SPEC_OK + "search: {{tune.num_workers: [1, 2]}}\n"),
)
case(
    "sweep-variant-and-search",
    "sweeps",
    SWEEP,
    r"is also in search",
    setup=spec(SPEC_OK + SEARCH + "variants: {{a: {{train.seed: 3}}}}\n"),
)
case(
    "sweep-max-concurrent",
    "sweeps",
    SWEEP,
    r"max_concurrent: got -1",
    setup=spec(SPEC_OK + SEARCH + "max_concurrent: -1\n"),
)
case(
    "sweep-metric-ignored",
    "sweeps",
    SWEEP,
    r"metric: trials are ranked by their task's own selection metric",
    setup=spec(SPEC_OK + SEARCH + "metric: f1\n"),
)
case(
    "sweep-tune-num-samples",
    "sweeps",
    SWEEP,
    r"tune.num_samples: got 0",
    setup=spec(SPEC_OK + SEARCH + "tune: {{num_samples: 0}}\n"),
)
case("sweep-tune-scalar", "sweeps", SWEEP, r"tune: expected a mapping", setup=spec(SPEC_OK + SEARCH + "tune: 4\n"))
case(
    "sweep-teacher-export",
    "sweeps",
    SWEEP,
    r"teacher.path: .* is a kdqat export folder",
    setup=spec(SPEC_OK.replace("{teacher}", "{export}") + SEARCH),
)
case(
    "sweep-alias-and-key",
    "sweeps",
    SWEEP,
    r"search: 'task' and 'data.task' name the same key",
    setup=spec(SPEC_OK + "search: {{task: [sst2], data.task: [rte]}}\n"),
)
case(
    "sweep-cli-bad-override",
    "sweeps",
    [*SWEEP, "train.seed=-1"],
    r"train.seed: got -1",
    setup=spec(SPEC_OK + "search: {{train.lr: [1.0e-3]}}\n"),
)
case(
    "sweep-template-unknown-key",
    "sweeps",
    SWEEP,
    r"teacher_path: unknown config key",
    setup=spec(SPEC_OK.replace("teacher_path: {teacher}", "teacher_path: 'models/{{data.tsk}}'") + SEARCH),
)

# ---- the Hugging Face path
case(
    "hf-export-from-pretrained",
    "hf",
    [],
    r"export|kdqat",
    kind="call",
    call=hf_export_loads_as_the_student,
)
case("hf-run-folder-as-model", "hf", [], r"has no config.json", kind="call", call=hf_run_folder_as_model)
case(
    "hf-no-weights",
    "hf",
    ["eval", "--model", "{ws}/m", "--config", "tiny_debug"],
    r"cannot load model|no file named|weights",
    setup=lambda ws, w: (shutil.copytree(w.teacher, ws / "m"), (ws / "m" / "model.safetensors").unlink()),
)
case(
    "hf-config-not-json",
    "hf",
    ["eval", "--model", "{ws}/m", "--config", "tiny_debug"],
    r"cannot load model|config",
    setup=lambda ws, w: (shutil.copytree(w.teacher, ws / "m"), (ws / "m" / "config.json").write_text("{nope")),
)
case(
    "hf-unknown-model-type",
    "hf",
    ["eval", "--model", "{ws}/m", "--config", "tiny_debug"],
    r"cannot load model|model_type",
    setup=lambda ws, w: (
        shutil.copytree(w.teacher, ws / "m"),
        _set_json(ws / "m" / "config.json", model_type="bogus-encoder"),
    ),
)
case(
    "hf-weights-other-arch",
    "hf",
    ["eval", "--model", "{ws}/m", "--config", "tiny_debug"],
    r"its weights do not fit its config.json",
    setup=lambda ws, w: (
        shutil.copytree(w.teacher, ws / "m"),
        _set_json(ws / "m" / "config.json", hidden_size=64, intermediate_size=128),
    ),
)
case(
    "hf-hub-name-offline",
    "hf",
    [*FT, "model.name_or_path=nobody/no-such-model"],
    r"cannot load model 'nobody/no-such-model'",
    env={"HF_HUB_OFFLINE": "1"},
)
case("hf-deep-missing-path", "hf", [*FT, "model.name_or_path=a/b/c"], r"model path not found: a/b/c")
data_case(
    "hf-teacher-label-count",
    "sentence,label\n" + "a,x\nb,y\nc,z\n" * 8,
    "sentence,label\na,x\nb,y\nc,z\n",
    r"model path .*model has a 2-label classifier but the task has 3 labels",
    base=[*TR, "data.task=custom", "data.label_list=[x, y, z]"],
    cls="hf",
)
case(
    "hf-model-folder-no-config",
    "hf",
    [*FT, "model.name_or_path={ws}/m"],
    r"has no config.json \(not a Hugging Face model folder\)",
    setup=write("m/weights.bin", "x"),
)


def _set_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# no-write-permission cases: as root the kernel lets everything through, so they run as nobody then
case(
    "out-no-permission",
    "files",
    [*TR[:4], "train.output_dir={ws}/locked/run"],
    r"no permission to write in .*locked",
    setup=chmod_locked,
)
case(
    "sweep-out-no-permission",
    "files",
    SWEEP,
    r"output_dir: no permission to write",
    setup=both(chmod_locked, spec(SPEC_OK.replace("{ws}/sweep", "{ws}/locked/s") + SEARCH)),
)
UNPRIVILEGED = {"out-no-permission", "sweep-out-no-permission"}

CASES = C
assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


# --------------------------------------------------------------------------- running a case


@contextlib.contextmanager
def _as_nobody(enabled: bool, ws: Path) -> Iterator[None]:
    """Run the block with an unprivileged effective uid when we are root (permissions bind then)."""
    if not enabled or os.geteuid() != 0:
        yield
        return
    for p in [ws, *ws.parents]:  # the workspace must be reachable for the unprivileged user
        if p == Path(tempfile.gettempdir()) or p == p.parent:
            break
        p.chmod(p.stat().st_mode | 0o005)
    os.setegid(65534)  # the group too: a root-owned folder's group bits would apply to gid 0
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def start_spawned(world: World, base: Path, cases: list[Case]) -> ThreadPoolExecutor:
    """Set up and start every ``spawn`` case of ``cases`` at once (:attr:`World.spawned`)."""
    spawned = [c for c in cases if c.kind == "spawn"]
    pool = ThreadPoolExecutor(max_workers=max(1, len(spawned)))
    for c in spawned:
        ws = base / f"spawn-{c.id}"
        ws.mkdir(parents=True)
        if c.setup is not None:
            c.setup(ws, world)
        world.spawned[c.id] = (ws, snapshot(ws, world.root), pool.submit(run_case, c, ws, world))
    return pool


def _permissions_bind() -> bool:
    """Whether a folder without write permission stops this process: not root, or root that may drop its
    effective uid (containers without CAP_SETUID may not)."""
    if os.geteuid() != 0:
        return True
    try:
        os.seteuid(65534)
    except OSError:
        return False
    try:  # a checkout in a folder only root may enter (mktemp -d) cannot be run by that user at all
        os.listdir(REPO / "kdqat_dist" / "recipes")
        return True
    except OSError:
        return False
    finally:
        os.seteuid(0)


def check_case(case: Case, ws: Path, world: World) -> str | None:
    """Set up, snapshot, run, compare: None when refused cleanly, else the problem (for the report)."""
    if case.id in world.spawned:
        ws, before, running = world.spawned[case.id]
        outcome = running.result()
    else:
        if case.setup is not None:
            case.setup(ws, world)
        before = snapshot(ws, world.root)
        with _as_nobody(case.id in UNPRIVILEGED, ws):
            outcome = run_case(case, ws, world)
    problem = verdict(case, outcome)
    changed = snapshot_changes(before, snapshot(ws, world.root))
    if changed:
        problem = f"{problem + '; ' if problem else ''}files touched: {changed[:3]}"
    return problem


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("probe_world"))
    pool = start_spawned(w, tmp_path_factory.mktemp("probe_spawned"), CASES)
    yield w
    pool.shutdown(wait=True)


def _param(c: Case):
    marks = [pytest.mark.xfail(strict=False, reason=f"owner: {c.owner}")] if c.owner else []
    return pytest.param(c, id=c.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, world: World, tmp_path) -> None:
    if case.id in UNPRIVILEGED and not _permissions_bind():
        pytest.skip(
            "runs as root and cannot drop to an unprivileged uid that can read the package, so no folder is unwritable"
        )
    ws = tmp_path / "ws"
    ws.mkdir()
    problem = check_case(case, ws, world)
    assert problem is None, f"[{case.cls}] {case.id}: {problem}"


def test_the_probe_is_big_enough_and_covers_every_class():
    classes = {c.cls for c in CASES}
    assert {"config", "numeric", "data", "files", "checkpoints", "cli", "launchers", "sweeps", "hf"} <= classes
    assert len(CASES) >= 150, len(CASES)


def test_marker_names_match_their_owners():
    from kdqat_dist.export.artifact import EXPORT_META
    from kdqat_dist.files import EXPORT_MARKER, STUDENT_MARKER
    from kdqat_dist.quant.student import STUDENT_META

    assert (STUDENT_MARKER, EXPORT_MARKER) == (STUDENT_META, EXPORT_META)


def test_the_verdict_catches_what_it_must():
    """The probe's own checks can fail: a traceback, an exit 0, two lines, a touched file."""
    c = Case("x", "config", [], r"bad")
    assert verdict(c, Outcome(2, "", "kdqat: error: bad thing\n")) is None
    assert "traceback" in verdict(c, Outcome(2, "", "", crash="Traceback ...\nValueError: x"))
    assert "traceback" in verdict(c, Outcome(2, "", "Traceback (most recent call last):\n  x\nkdqat: error: bad\n"))
    assert "accepted" in verdict(c, Outcome(0, "", ""))
    assert "2 error lines" in verdict(c, Outcome(2, "", "kdqat: error: bad\nkdqat: error: bad\n"))
    assert "does not match" in verdict(c, Outcome(2, "", "kdqat: error: other\n"))
    assert "not an error line" in verdict(c, Outcome(2, "", "a bad thing happened\n"))
    assert verdict(c, Outcome(2, "", "usage: kdqat [-h]\n       more usage\nkdqat: error: bad\n")) is None
    assert verdict(c, Outcome(2, "", "kdqat eval: note: the data differs\nkdqat: error: bad\n")) is None
    assert snapshot_changes({"a": ("file", "1", 0o644)}, {"a": ("file", "2", 0o644), "b": ("dir", 0o755)}) == [
        "changed: a",
        "new: b",
    ]


# --------------------------------------------------------------------------- as a script


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    picked = [c for c in CASES if not argv or any(a in c.id for a in argv)]
    with tempfile.TemporaryDirectory(prefix="kdqat_probe_") as tmp:
        os.environ.setdefault("KDQAT_CACHE", str(Path(tmp) / "cache"))
        t0 = time.perf_counter()
        world = build_world(Path(tmp) / "world")
        pool = start_spawned(world, Path(tmp), picked)
        print(f"world built in {time.perf_counter() - t0:.1f} s; {len(picked)} cases")
        bad = 0
        for i, c in enumerate(picked):
            ws = Path(tmp) / f"ws{i}"
            ws.mkdir()
            t = time.perf_counter()
            problem = check_case(c, ws, world)
            mark = "ok  " if problem is None else ("XFAIL" if c.owner else "FAIL")
            bad += problem is not None and not c.owner
            print(f"{mark} {time.perf_counter() - t:5.2f}s [{c.cls}] {c.id}" + (f": {problem}" if problem else ""))
        pool.shutdown(wait=True)
    print(f"{len(picked) - bad} of {len(picked)} clean or owned elsewhere; {bad} to fix")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
