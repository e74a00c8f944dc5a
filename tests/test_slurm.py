"""The Slurm scripts, submitted from a fresh checkout to stand-in ``sbatch``/``srun``/``scontrol``.

The stand-ins record their arguments. ``sbatch`` runs the job as Slurm does in the part that matters here:
the job's ``--output`` file is opened in the submission folder before the script starts, and a folder in
that path that does not exist fails the job (Slurm's "Could not open stdout file"). ``srun`` runs nothing
(it answers ``hostname --ip-address``); ``scontrol show hostnames`` expands the test's node list.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
JOB_ID = "4242"
NODES = ("node017", "node018")

SBATCH = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$STANDIN_LOG/sbatch.args"
while [[ "$1" == -* ]]; do shift; done  # sbatch's own options; the script and its arguments follow
script=$1; shift
name=$(sed -n 's/^#SBATCH --job-name=//p' "$script" | sed -n 1p)
out=$(sed -n 's/^#SBATCH --output=//p' "$script" | sed -n 1p)
out=${out:-slurm-%j.out}; out=${out//%x/$name}; out=${out//%j/$SLURM_JOB_ID}
if [[ ! -d "$(dirname "$out")" ]]; then
    echo "slurmstepd: error: Could not open stdout file $out: No such file or directory" >&2
    exit 1
fi
bash "$script" "$@" > "$out" 2>&1
"""
SRUN = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$STANDIN_LOG/srun.args"
for a in "$@"; do [[ "$a" == hostname ]] && echo 10.0.0.17; done
exit 0
"""
SCONTROL = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$STANDIN_LOG/scontrol.args"
printf 'node017\nnode018\n'
"""
RECORD = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$STANDIN_LOG/kdqat.args"
"""


@pytest.fixture
def slurm(tmp_path) -> dict[str, str]:
    """The environment of a login node whose PATH has the stand-ins; the logs of their arguments go to
    ``$STANDIN_LOG``. Returns the environment."""
    bin_dir, log = tmp_path / "bin", tmp_path / "standin"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("sbatch", SBATCH), ("srun", SRUN), ("scontrol", SCONTROL), ("kdqat", RECORD)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "KDQAT_DRY"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        STANDIN_LOG=str(log),
        # what Slurm sets in the job
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NODELIST="node[017-018]",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="4",
        SLURM_CPUS_PER_TASK="16",
        PYTHON=sys.executable,
        KDQAT=str(bin_dir / "kdqat"),
        RAY_HEAD_WAIT="0",
        RAY_WORKER_WAIT="0",
    )
    return env


def _submit(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir(exist_ok=True)  # a fresh checkout: nothing but what is committed (no logs/)
    return subprocess.run(["sbatch", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _args(env: dict[str, str], tool: str) -> list[str]:
    path = Path(env["STANDIN_LOG"]) / f"{tool}.args"
    return path.read_text().splitlines() if path.exists() else []


def test_ray_sweep_job_runs_from_a_fresh_checkout(slurm, tmp_path):
    cwd = tmp_path / "checkout"
    r = _submit(slurm, cwd, str(LAUNCH / "slurm_ray_sweep.sbatch"), "tiny_demo", "train.max_steps=2")
    assert r.returncode == 0, r.stderr
    log = (cwd / f"slurm-kdqat-sweep-{JOB_ID}.out").read_text()
    assert "[sweep] head node017 (10.0.0.17:6379), workers node018" in log, log
    assert "[sweep] kdqat sweep exited with 0" in log and "[sweep] stopping Ray on node017 node018" in log, log
    srun = _args(slurm, "srun")
    assert srun[0] == "--nodes=1 --ntasks=1 -w node017 hostname --ip-address"
    assert (
        "--overlap --nodes=1 --ntasks=1 -w node017 ray start --head --node-ip-address=10.0.0.17 --port=6379 "
        "--num-cpus=16 --num-gpus=4 --include-dashboard=false --block" in srun
    )
    assert (
        "--overlap --nodes=1 --ntasks=1 -w node018 ray start --address=10.0.0.17:6379 --num-cpus=16 "
        "--num-gpus=4 --block" in srun
    )
    assert srun[-1] == "--overlap --nodes=2 --ntasks-per-node=1 ray stop"  # torn down on exit
    assert _args(slurm, "kdqat") == ["sweep --config tiny_demo --address auto train.max_steps=2"]
    assert _args(slurm, "scontrol") == ["show hostnames node[017-018]"]
    assert (cwd / "logs" / f"ray-head-{JOB_ID}.log").exists()  # Ray's own logs: logs/, made by the job


@pytest.mark.parametrize(
    "script, sbatch_opts, srun",
    [
        (
            "slurm_multi_node.sbatch",
            ["--nodes=2"],
            "--ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes 2 --nproc_per_node 4 --rdzv_id 4242 "
            "--rdzv_backend c10d --rdzv_endpoint node017:29500 --module kdqat_dist.cli finetune --config tiny_debug "
            "engine.backend=deepspeed train.max_steps=2",
        ),
        (
            "slurm_single_node.sbatch",
            [],
            "--ntasks=1 --kill-on-bad-exit=1 torchrun --standalone --nproc_per_node 4 --module kdqat_dist.cli "
            "finetune --config tiny_debug engine.backend=deepspeed train.max_steps=2",
        ),
    ],
)
def test_training_jobs_run_from_a_fresh_checkout(slurm, tmp_path, script, sbatch_opts, srun):
    cwd = tmp_path / "checkout"
    # a job that passes the script's check before srun (python -m kdqat_dist.precheck: a valid recipe and
    # overrides; finetune needs no teacher)
    slurm["COMMAND"] = "finetune"
    r = _submit(slurm, cwd, *sbatch_opts, str(LAUNCH / script), "tiny_debug", "train.max_steps=2")
    assert r.returncode == 0, r.stderr
    assert (cwd / f"slurm-kdqat-{JOB_ID}.out").exists()
    assert _args(slurm, "srun") == [srun]
    assert _args(slurm, "sbatch") == [" ".join([*sbatch_opts, str(LAUNCH / script), "tiny_debug", "train.max_steps=2"])]


def test_an_output_folder_that_does_not_exist_fails_the_stand_in_job(slurm, tmp_path):
    """The stand-in's check can fail: an --output in a folder that is not there, as the sweep had."""
    bad = tmp_path / "bad.sbatch"
    bad.write_text("#!/bin/bash\n#SBATCH --job-name=x\n#SBATCH --output=logs/%x-%j.out\nmkdir -p logs\necho ran\n")
    r = _submit(slurm, tmp_path / "checkout", str(bad))
    assert r.returncode == 1 and f"Could not open stdout file logs/x-{JOB_ID}.out" in r.stderr
    assert not (tmp_path / "checkout" / "logs").exists()


def test_multi_node_dry_run_needs_no_slurm(slurm, tmp_path):
    # a PATH with sed alone: no scontrol, whatever the machine has installed
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "sed").symlink_to(shutil.which("sed"))
    env = {k: v for k, v in slurm.items() if k != "SLURM_GPUS_ON_NODE"}
    env.update(PATH=str(tools), KDQAT_DRY_RUN="1", SLURM_JOB_NODELIST="gpu[7-8,12],cpu1")
    r = subprocess.run(
        [shutil.which("bash"), str(LAUNCH / "slurm_multi_node.sbatch"), "tiny_debug", "a.b=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes 2 --nproc_per_node 1 ")
    assert "--rdzv_endpoint gpu7:29500 " in r.stdout and _args(slurm, "scontrol") == []
