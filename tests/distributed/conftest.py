"""Fixtures for the multi-process tests: a tiny teacher (dropout on, as a real one) and the launch environment."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kdqat_dist.config import load_config
from kdqat_dist.engine.loop import run
from kdqat_dist.models.tiny import make_tiny_checkpoint

STEPS = 3  # KD-QAT steps of every parity run
LSQ = ("quant.weight.method=lsq", "quant.act.method=lsq")
BERTADAM = ("train.optimizer=bertadam", "train.lr=1e-3", "train.max_grad_norm=0.05")  # a clip that acts
# BitDistill's pieces: relation KD at every layer, SEQ weights (learned per-row clips), per-token A8, SubLN
RELATION = (
    "distill.attn_relation.weight=1",
    "distill.attn_relation.layers=all",
    "distill.attn_relation.relation_heads=4",
    "quant.weight.method=seq",
    "quant.weight.granularity=row",
    "quant.act.method=absmax_token",
    "quant.subln=true",
)

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def parity_teacher(tmp_path_factory) -> Path:
    """A random tiny BERT with dropout 0.1 like a real checkpoint: a teacher left in training mode changes
    every parity run. The student it starts trains with ``train.dropout=0`` (see :func:`_parity_config`),
    so one process and N ranks see the same arithmetic (student dropout masks would differ between one
    stream of micro-batches and N)."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("parity_teacher") / "model")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["hidden_dropout_prob"] > 0 and cfg["attention_probs_dropout_prob"] > 0
    return path


@pytest.fixture(scope="session")
def launch_env() -> dict[str, str]:
    """The environment for launched jobs: this venv first on PATH, offline, one thread per rank."""
    env = dict(os.environ)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.pop("KDQAT_DRY_RUN", None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _parity_config(teacher: Path, out: Path, *extra: str):
    """tiny_debug for STEPS steps, logging every step: the same global batch of 16 at any world size."""
    return load_config(
        "tiny_debug",
        [
            f"teacher.path={teacher}",
            f"train.output_dir={out}",
            "train.log_every=1",
            "train.dropout=0",
            f"train.max_steps={STEPS}",
            "train.eval_every=1",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def parity_config():
    """``parity_config(teacher, out, *overrides)`` -> the RunConfig every parity run starts from."""
    return _parity_config


@pytest.fixture(scope="session")
def local_reference_root(tmp_path_factory) -> Path:
    """Where :func:`local_reference` runs: ``<root>/twn`` and ``<root>/lsq`` (TensorBoard in ``tb/``)."""
    return tmp_path_factory.mktemp("local_reference")


@pytest.fixture(scope="session")
def local_reference(parity_teacher, local_reference_root) -> dict[str, list[dict]]:
    """Single-process training logs with grad_accum=2 (the micro-batches two ranks see): TWN, LSQ,
    BertAdam with its per-tensor clipping, and the relation term with SEQ, per-token A8 and SubLN."""
    root = local_reference_root
    return {
        name: run(_parity_config(parity_teacher, root / name, "train.grad_accum=2", *extra), "train")["train_log"]
        for name, extra in (("twn", ()), ("lsq", LSQ), ("bertadam", BERTADAM), ("relation", RELATION))
    }


def _run_job(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; on timeout kill the whole group (no orphaned ranks)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n[test] killed after {timeout} s: the job hung"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="session")
def run_job():
    """``run_job(cmd, env, cwd, timeout=300)`` -> CompletedProcess; a hung job is killed, group and all."""
    return _run_job
