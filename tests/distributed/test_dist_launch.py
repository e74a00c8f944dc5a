"""The launch/ scripts: deepspeed and torchrun run a real 2-rank `kdqat train` on this machine; a rank
killed mid-run ends the job with the launcher's report (no hang), and ``RESUME=1`` continues it to the
same numbers as a run that never stopped. The Slurm scripts are checked in dry-run mode."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = [
    "train.max_steps=12",
    "train.save_every=3",
    "train.log_every=1",
    "train.eval_every=6",
    "engine.deepspeed.zero_stage=2",
    "engine.deepspeed.teacher=zero3",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(name: str, teacher: Path, out: Path) -> list[str]:
    return ["bash", f"launch/{name}", "tiny_debug", f"teacher.path={teacher}", f"train.output_dir={out}", *RUN]


def _rank_process(root: psutil.Process, rank: int) -> psutil.Process | None:
    for p in root.children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank) and "kdqat_dist.cli" in " ".join(p.cmdline()):
                return p
        except psutil.Error:
            continue
    return None


def _kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for p in psutil.Process(proc.pid).children(recursive=True):
        p.kill()
    proc.kill()
    proc.wait()


def _kill_rank_after_first_checkpoint(proc: subprocess.Popen, out: Path, rank: int) -> None:
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists():
        assert proc.poll() is None, "the job ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.05)
    victim = _rank_process(psutil.Process(proc.pid), rank)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)


def _launch_and_kill_rank_1(cmd: list[str], env: dict[str, str], out: Path) -> tuple[int, str, float]:
    """Launch a 2-rank job, SIGKILL rank 1 after the first checkpoint; (return code, log, seconds from the
    kill to the job's end)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _kill_rank_after_first_checkpoint(proc, out, rank=1)
        t_kill = time.monotonic()
        log, _ = proc.communicate(timeout=120)
    finally:
        _kill_tree(proc)  # only if the assertions above failed while it ran
    return proc.returncode, log, time.monotonic() - t_kill


@pytest.mark.dist
def test_launchers_run_2_ranks_and_a_killed_run_resumes_to_the_same_result(
    parity_teacher, launch_env, run_job, tmp_path
):
    # 1. the DeepSpeed launcher, uninterrupted
    env = dict(launch_env, NUM_PROCS="2", MASTER_PORT=str(_free_port()))
    full = run_job(_script("deepspeed_single_node.sh", parity_teacher, tmp_path / "full"), env, REPO)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    ref = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert ref["world_size"] == 2 and len(ref["memory_per_rank"]) == 2
    assert "memory (MiB) per rank" in full.stdout + full.stderr
    assert json.loads((tmp_path / "full" / "ds_config_student.json").read_text())["train_micro_batch_size_per_gpu"] == 8

    # 2. torchrun, with rank 1 killed after the first checkpoint: the job ends, it does not hang
    out = tmp_path / "killed"
    env = dict(launch_env, NUM_PROCS="2")
    returncode, log, seconds = _launch_and_kill_rank_1(_script("torchrun.sh", parity_teacher, out), env, out)
    assert returncode != 0
    assert seconds < 60
    assert "Root Cause" in log and "rank      : 1" in log and "SIGKILL" in log, log[-2000:]
    assert not (out / "metrics.json").exists()

    # 3. RESUME=1 continues from the latest checkpoint and lands where the uninterrupted run did
    resumed = run_job(_script("torchrun.sh", parity_teacher, out), dict(env, RESUME="1"), REPO)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    got = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in got["train_log"]] == list(range(1, 13))
    # The student trains with dropout 0.1 here, so each rank's restored RNG state is exercised. At 2 ranks
    # the resumed run differs from the uninterrupted one in the last float bits (one rank resumes bit for
    # bit), which grow over the steps to ~2e-5 relative on the smallest term; a real resume error (RNG,
    # data order, schedule) moves every term by 1e-3 or more.
    for a, b in zip(ref["train_log"], got["train_log"], strict=True):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-9), (a["step"], k)
    assert [h["step"] for h in got["history"]] == [6, 12]
    for a, b in zip(ref["history"], got["history"], strict=True):
        assert b["selection"] == pytest.approx(a["selection"], abs=1e-9)


@pytest.mark.dist
def test_deepspeed_launcher_ends_the_job_when_a_rank_is_killed(parity_teacher, launch_env, tmp_path):
    # The DeepSpeed launcher's own watchdog: a rank lost mid-run takes the job down at once, and the
    # launcher's last line names the dead rank's command and its signal.
    out = tmp_path / "ds_killed"
    env = dict(launch_env, NUM_PROCS="2", MASTER_PORT=str(_free_port()))
    returncode, log, seconds = _launch_and_kill_rank_1(
        _script("deepspeed_single_node.sh", parity_teacher, out), env, out
    )
    assert returncode != 0
    assert seconds < 60
    assert "--local_rank=1" in log and "exits with return code = -9" in log, log[-2000:]
    # the survivor, if it got to notice before the launcher stopped it, says so in one line
    assert "Traceback" not in log, log[-3000:]
    assert not (out / "metrics.json").exists()


def _fake_slurm_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    # `scontrol show hostnames <list>` prints one host per line; a long list makes a reader that stops
    # after the first line (head -n 1 under pipefail) fail with SIGPIPE, which the script must not do.
    scontrol.write_text("#!/usr/bin/env bash\nprintf 'node017\\nnode018\\n'\nseq -f 'node%05g' 1 50000\n")
    scontrol.chmod(0o755)
    return bin_dir


def _dry_run(script: str, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        ["bash", f"launch/{script}", *args],
        cwd=REPO,
        env=dict(env, KDQAT_DRY_RUN="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_launch_scripts_dry_run_print_the_exact_commands(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{_fake_slurm_bin(tmp_path)}{os.pathsep}{env['PATH']}"
    tail = "--module kdqat_dist.cli train --config tiny_debug engine.backend=deepspeed a.b=1"

    slurm = dict(env, SLURM_JOB_NODELIST="node[017-018]", SLURM_NNODES="2", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4")
    line = _dry_run("slurm_multi_node.sbatch", slurm, "tiny_debug", "a.b=1")
    assert line == (
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 torchrun --nnodes 2 --nproc_per_node 4 "
        "--rdzv_id 4242 --rdzv_backend c10d --rdzv_endpoint node017:29500 " + tail
    )
    requeued = _dry_run(
        "slurm_multi_node.sbatch", dict(slurm, SLURM_RESTART_COUNT="1", MASTER_PORT="29600"), "tiny_debug", "a.b=1"
    )
    assert "--rdzv_endpoint node017:29600" in requeued and "cli train --resume --config" in requeued

    line = _dry_run("slurm_single_node.sbatch", dict(env, SLURM_GPUS_ON_NODE="8"), "tiny_debug", "a.b=1")
    assert line == "srun --ntasks=1 --kill-on-bad-exit=1 torchrun --standalone --nproc_per_node 8 " + tail

    line = _dry_run("deepspeed_multi_node.sh", dict(env, HOSTFILE="launch/hostfile.example"), "tiny_debug", "a.b=1")
    assert line == ("deepspeed --hostfile launch/hostfile.example --master_port 29500 --launcher pdsh " + tail)
    line = _dry_run("deepspeed_single_node.sh", dict(env, RESUME="1", COMMAND="finetune"), "tiny_debug", "a.b=1")
    assert line == (
        "deepspeed --num_accelerators 2 --master_port 29500 --module kdqat_dist.cli finetune --resume "
        "--config tiny_debug engine.backend=deepspeed a.b=1"
    )
    line = _dry_run("torchrun.sh", dict(env, NUM_PROCS="3"), "tiny_debug", "a.b=1")
    assert line == "torchrun --standalone --nproc_per_node 3 " + tail

    for sbatch in ("slurm_single_node.sbatch", "slurm_multi_node.sbatch"):
        text = (REPO / "launch" / sbatch).read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --ntasks-per-node=1" in text


def test_nan_on_one_rank_stops_every_rank_with_the_same_line(parity_teacher, launch_env, run_job, tmp_path):
    cmd = [
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "2",
        "tests/distributed/nan_check.py",
        "--teacher",
        str(parity_teacher),
        "--out",
        str(tmp_path),
    ]
    proc = run_job(cmd, launch_env, REPO, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert msgs[0].startswith("non-finite loss at step 1: term 'attn_map'") and "on 1 of 2 ranks" in msgs[0]
    assert "is nan" in msgs[1] and "is not finite" in msgs[0]  # rank 1 saw the NaN itself, rank 0 via the flags
