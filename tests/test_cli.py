"""The command line: help, one-line errors with non-zero exit and no traceback."""

import subprocess
import sys

import pytest

from kdqat_dist.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kdqat_dist.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("train", "finetune", "eval", "demo"):
        assert cmd in r.stdout


def test_bad_config_is_one_line_no_traceback():
    r = run_cli("train", "--config", "tiny_debug", "quant.weight.bits=5")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "kdqat: error: quant.weight.bits: got 5; allowed: 2, 3, 4, 8"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--config", "tiny_debug"], "teacher.path: required"),
        (
            ["train", "--config", "tiny_debug", "teacher.path=/does/not/exist"],
            "teacher.path: /does/not/exist does not exist",
        ),
        (["train", "--config", "missing_recipe"], "config file not found"),
        (["eval", "--model", "/does/not/exist", "--config", "tiny_debug"], "--model: /does/not/exist does not exist"),
    ],
)
def test_user_errors_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_recipes_listing_shows_whole_sentences(capsys):
    from kdqat_dist.cli import recipes_table
    from kdqat_dist.config import RECIPES_DIR

    assert main(["recipes"]) == 0
    assert "tiny_debug" in capsys.readouterr().out
    table = recipes_table(80)
    assert all(len(line) <= 80 for line in table.splitlines())
    rows = {}  # recipe -> its description, rejoined from the wrapped lines
    for line in table.splitlines():
        if not line.startswith(" "):
            name = line.split()[0]
        rows[name] = " ".join([*rows.get(name, "").split(), *line.removeprefix(name).split()])
    for p in RECIPES_DIR.glob("*.yaml"):
        first = p.read_text().splitlines()[0]
        # one sentence (or two), complete on the first line: `kdqat recipes` shows that line alone
        assert first.startswith("# ") and first.endswith(".") and len(first) <= 110, (p.name, first)
        assert rows[p.stem] == " ".join(first[2:].split()), p.name


def test_bits_label_of_the_recipe_table():
    from kdqat_dist.config import load_config
    from kdqat_dist.pipeline import _bits_label

    assert _bits_label(load_config("bitdistill_w158a8")) == "W1.58(ternary) E32 A8"  # BitNet's name
    assert _bits_label(load_config("bert_base_w2a8_kd")) == "W2(ternary) E2 A8"
    assert _bits_label(load_config("bert_base_w2e8a8_kd")) == "W2(ternary) E8 A8"
    assert _bits_label(load_config("kdlsq_w2a8")) == "W2(ternary) E2 A8"  # LSQ with narrow_range: 3 levels
    lsq4 = load_config("kdlsq_w2a8", ["quant.weight.narrow_range=false"])  # codes -2..1: not ternary
    assert _bits_label(lsq4) == "W2(2) E2 A8"
    assert _bits_label(load_config("tiny_debug", ["quant.weight.method=sym", "quant.weight.bits=4"])) == "W4(4) E2 A8"
    assert _bits_label(load_config("tiny_debug", ["quant.enabled=false"])) == "fp32"


def test_unreachable_hub_model_is_one_line(tmp_path):
    # A hub name with no network and no cached copy: transformers raises a multi-line OSError; the user
    # gets one line naming the model. (HF_HUB_OFFLINE=1 is set for the tests, so nothing is fetched.)
    r = run_cli(
        "finetune",
        "--config",
        "tiny_debug",
        "model.name_or_path=no-such-org/no-such-model",
        f"train.output_dir={tmp_path / 'x'}",
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("kdqat: error: cannot load model 'no-such-org/no-such-model': "), last
    assert not (tmp_path / "x").exists()


def test_overrides_may_follow_an_option(capsys):
    from kdqat_dist.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["train", "--config", "tiny_debug", "a.b=1", "--resume", "train.max_steps=2"])
    assert args.resume and args.overrides == ["a.b=1", "train.max_steps=2"]
    for argv, bad in ((["train", "--config", "tiny_debug", "--bogus"], "--bogus"), (["recipes", "x=1"], "x=1")):
        with pytest.raises(SystemExit) as exc:
            parse_args(build_parser(), argv)
        assert exc.value.code == 2 and f"unrecognized arguments: {bad}" in capsys.readouterr().err


def test_damaged_weights_file_is_one_line(tiny_teacher, tmp_path, capsys):
    import shutil

    bad = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    code = main(["train", "--config", "tiny_debug", f"teacher.path={bad}", f"train.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"kdqat: error: cannot load model '{bad}': "), err


def test_version_config_and_train_help():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("kdqat ")
    # answered before torch and transformers load (seconds of CPU): neither is imported
    code = (
        "import sys; from kdqat_dist.cli import main; main(['--version']); "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "[]", r.stdout + r.stderr
    r = run_cli("config", "tiny_debug", "train.lr=3e-4", "distill.gamma=0.5")
    assert r.returncode == 0
    import yaml

    cfg = yaml.safe_load(r.stdout)
    assert cfg["train"]["lr"] == 3e-4 and cfg["distill"]["gamma"] == 0.5 and cfg["data"]["task"] == "demo"
    r = run_cli("config", "tiny_debug", "train.lrr=1")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("kdqat: error: unknown key 'train.lrr'")
    r = run_cli("train", "--help")
    assert "config sections: model teacher student data quant distill" in r.stdout and "kdqat config" in r.stdout


@pytest.mark.parametrize(
    "script, env, message",
    [
        ("deepspeed_single_node.sh", {"NUM_PROCS": "0"}, "NUM_PROCS=0: must be a positive integer"),
        ("torchrun.sh", {"NUM_PROCS": "0"}, "NUM_PROCS=0: must be a positive integer"),
        ("torchrun.sh", {"COMMAND": "eval"}, "COMMAND=eval: allowed: train, finetune"),
        ("deepspeed_multi_node.sh", {"HOSTFILE": "/nonexistent"}, "HOSTFILE=/nonexistent: no such readable file"),
        ("deepspeed_multi_node.sh", {"HOSTFILE": "GARBLED"}, ":2: 'node2 slots' is not '<host> slots=<N>'"),
    ],
)
def test_launchers_refuse_bad_input_before_starting_ranks(tmp_path, script, env, message):
    from pathlib import Path

    garbled = tmp_path / "hostfile"
    garbled.write_text("node1 slots=2\nnode2 slots\n")
    env = {k: (str(garbled) if v == "GARBLED" else v) for k, v in env.items()}
    launch = Path(__file__).resolve().parents[1] / "launch" / script
    r = subprocess.run(
        ["bash", str(launch), "tiny_debug", f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"{script}: error: {r.stderr.split(': error: ', 1)[1].strip()}"]
    assert message in r.stderr and not (tmp_path / "run").exists()
