"""Two kinds of failure: a user error is one line and exit 2; anything else is a bug, shown with its
traceback, a line saying it is a bug (with the version) and exit 1. The exception types cost nothing to
import. (The probe of bad inputs, tests/test_bad_inputs.py, covers the user errors command by command;
test_export.py's dev-set disagreement covers an InternalError raised by a real `kdqat export`.)"""

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from kdqat_dist import __version__
from kdqat_dist.errors import ConfigError, DataError, InternalError, TrainingError, report

BUG_LINE = f"kdqat: internal error: this is a bug in kdqat-dist {__version__}"


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


def test_importing_the_errors_imports_nothing_heavy():
    r = _python(
        "import sys, kdqat_dist.errors\n"
        "print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'ray', 'numpy', 'yaml', 'kdqat_dist.config')"
        " if m in sys.modules))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("exc", [ConfigError("a: got 1"), DataError("f.tsv:3: bad"), TrainingError("nan at step 2")])
def test_a_user_error_is_one_line_and_exit_2(exc, capsys):
    assert report(exc) == 2
    assert capsys.readouterr().err == f"kdqat: error: {exc}\n"


@pytest.mark.parametrize("exc", [InternalError("codes disagree"), KeyError("x"), AssertionError("never")])
def test_anything_else_is_a_bug_with_its_traceback_and_exit_1(exc, capsys):
    try:
        raise exc
    except Exception as raised:
        assert report(raised, prog="kdqat") == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    lines = err.strip().splitlines()
    assert f"{type(exc).__name__}: " in lines[-2]  # the exception's own line, then ours
    assert lines[-1].startswith(BUG_LINE) and "please report it" in lines[-1]


def test_a_bug_inside_a_real_command_shows_the_traceback_and_exits_1(monkeypatch, capsys):
    from kdqat_dist import cli

    def broken(*args, **kwargs):
        raise InternalError("a config field of a type the loader does not handle")

    monkeypatch.setattr(cli, "load_config", broken)  # `kdqat config` calls it: our code, made wrong
    assert cli.main(["config", "tiny_debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in _dispatch" in err
    assert "InternalError: a config field of a type the loader does not handle" in err
    assert err.strip().splitlines()[-1].startswith(BUG_LINE)
    # the same command's user error stays one line, exit 2
    monkeypatch.undo()
    assert cli.main(["config", "tiny_debug", "train.lr=x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_ranks_of_one_launcher_print_a_shared_user_error_once_per_node():
    # three "ranks" with one parent (this process, as a launcher is theirs), run one after another
    same, other = f"train.output_dir: x already holds a run {uuid.uuid4()}", f"rank-only problem {uuid.uuid4()}"
    code = "import sys; from kdqat_dist.errors import ConfigError, report; sys.exit(report(ConfigError({!r})))"
    ranks = [(same, "0"), (same, "1"), (other, "1")]
    runs = [_python(code.format(msg), WORLD_SIZE="2", LOCAL_RANK=r, RANK=r) for msg, r in ranks]
    assert [r.returncode for r in runs] == [2, 2, 2]
    assert [r.stderr for r in runs] == [f"kdqat: error: {same}\n", "", f"kdqat: error: {other}\n"]
    for claim in Path(tempfile.gettempdir()).glob(f"kdqat-error-{os.getpid()}-*"):
        claim.unlink()
    # outside a multi-rank job every call prints
    single = [_python(code.format(same)) for _ in range(2)]
    assert [r.stderr for r in single] == [f"kdqat: error: {same}\n"] * 2
