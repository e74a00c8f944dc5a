"""kdqat-dist installed the way users install it: a wheel built from this tree, installed without ``-e``
into a folder of its own, used from an empty working directory that cannot see the source checkout.

It must find its shipped data (recipes, DeepSpeed JSONs, sweep specs) inside the installed package, run a
2-rank DeepSpeed train and a one-trial sweep, and answer ``kdqat demo --help``. The dependencies come from
this test's virtual environment (``pip install --no-deps --target``): the point is the package, not pip's
resolver. The source tree is copied before the build, so the build writes nothing into the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the installed zero2.json gets this marker, so the run folder proves which copy the ranks read
MARKER = 999_999_937


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return _wait(
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), timeout
    )


def _wait(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"{proc.args[:6]} exited {proc.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of this tree, installed (no ``-e``, no dependencies) into ``<tmp>/site``."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "kdqat_dist", src / "kdqat_dist", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)], tmp, dict(os.environ))
    wheels = list((tmp / "dist").glob("kdqat_dist-*.whl"))
    assert len(wheels) == 1, wheels
    site = tmp / "site"
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheels[0])], tmp, dict(os.environ))
    zero2 = site / "kdqat_dist" / "ds_configs" / "zero2.json"
    cfg = json.loads(zero2.read_text())
    cfg["steps_per_print"] = MARKER
    zero2.write_text(json.dumps(cfg))
    return site


def _env(site: Path, tmp: Path) -> dict[str, str]:
    """Only the installed copy on sys.path: PYTHONPATH is the install folder, the working folder is empty
    (the DeepSpeed launcher puts the working folder on the ranks' PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RAY_ADDRESS", "KDQAT_"))}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(
        PYTHONPATH=str(site),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        KDQAT_CACHE=str(tmp / "cache"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_AUTH_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.mark.dist
@pytest.mark.slow
def test_the_wheel_runs_deepspeed_a_sweep_and_the_cli_from_an_empty_folder(installed, tmp_path):
    from kdqat_dist.models.tiny import make_tiny_checkpoint

    empty = tmp_path / "empty"
    empty.mkdir()
    env = _env(installed, tmp_path)

    # 1. the package and its data come from the install, not the checkout
    probe = (
        "import json, kdqat_dist\n"
        "from kdqat_dist.config import RECIPES_DIR\n"
        "from kdqat_dist.engine.ds_config import shipped_configs\n"
        "from kdqat_dist.tune.spec import SPEC_DIR\n"
        "print(json.dumps([kdqat_dist.__file__, str(RECIPES_DIR), str(shipped_configs()), str(SPEC_DIR)]))\n"
    )
    # 2. the console script; both run while the DeepSpeed job below starts (each is seconds of imports)
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=empty, env=env)
    where = subprocess.Popen([sys.executable, "-c", probe], **pipes)
    help_ = subprocess.Popen([str(installed / "bin" / "kdqat"), "demo", "--help"], **pipes)

    # 3. a 2-rank DeepSpeed KD-QAT run (student ZeRO-2, teacher ZeRO-3) through the DeepSpeed launcher
    teacher = make_tiny_checkpoint(tmp_path / "teacher")
    run_dir = tmp_path / "ds_run"
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2"]
    job = ["--module", "kdqat_dist.cli", "train", "--config", "tiny_debug", "engine.backend=deepspeed"]
    overrides = [
        f"teacher.path={teacher}",
        f"train.output_dir={run_dir}",
        "train.max_steps=2",
        "train.eval_every=2",
        "train.diagnostics=false",
        "engine.deepspeed.zero_stage=2",
        "engine.deepspeed.teacher=zero3",
    ]
    _run([*launcher, "--master_port", str(_free_port()), *job, *overrides], empty, env)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["total_steps"] == 2
    resolved = json.loads((run_dir / "ds_config_student.json").read_text())
    assert resolved["steps_per_print"] == MARKER and resolved["zero_optimization"]["stage"] == 2

    paths = json.loads(_wait(where).stdout.strip().splitlines()[-1])
    for p in paths:
        assert Path(p).is_relative_to(installed), (p, installed)
    for folder, name in zip(paths[1:], ("tiny_debug.yaml", "zero2.json", "tiny_demo.yaml"), strict=True):
        assert (Path(folder) / name).is_file()
    out = _wait(help_).stdout
    assert out.startswith("usage: kdqat demo") and "--num-procs" in out

    # 4. a one-trial sweep on a local Ray instance
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: one\nbase: tiny_debug\noutput_dir: {tmp_path / 'sweep'}\nteacher_path: {teacher}\n"
        "overrides: {train.max_steps: 2, train.eval_every: 2, train.diagnostics: false}\n"
        "search: {train.seed: [1]}\n"
    )
    sweep = [str(installed / "bin" / "kdqat"), "sweep", "--config", str(spec), "--quiet", "--num-cpus", "1"]
    _run(sweep, empty, env)
    rows = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and ",ok" in rows[1], rows

    assert list(empty.iterdir()) == []  # nothing was written where the commands ran
