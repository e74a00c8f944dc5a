"""The exception types of kdqat-dist and :func:`report`, which every command calls on the exception that stops
it (a leaf module that imports nothing heavy): a user error (config, data, path, CLI argument, a run that cannot
go on) is one line, exit 2; anything else, :class:`InternalError` included, is a bug: its traceback, exit 1."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import traceback


class ConfigError(ValueError):
    """A user error in a config file, an override, a file or a CLI argument (printed as one line)."""


class DataError(ConfigError):
    """Bad input data or a data setting: one line naming the file/line/column and what is allowed."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a failed rank); printed as one line by the CLI."""


class InternalError(RuntimeError):
    """A broken internal invariant: a bug in kdqat-dist, never the user's input. Shown with its traceback."""


USER_ERRORS = (ConfigError, TrainingError, FileNotFoundError)  # FileNotFoundError: a path the user gave


def report(exc: Exception, prog: str = "kdqat") -> int:
    """Print ``exc`` on stderr for the user of ``prog``; returns the exit status. A user error that all ranks of
    one launcher on a node raise (torchrun, deepspeed: LOCAL_RANK set) is printed once: the first claims it."""
    if not isinstance(exc, USER_ERRORS):
        from kdqat_dist import __version__  # the package is loaded: this module is part of it

        traceback.print_exception(exc)
        print(
            f"{prog}: internal error: this is a bug in kdqat-dist {__version__}, not in your input; please report "
            "it with the traceback above to the issue tracker of the repository you installed kdqat-dist from",
            file=sys.stderr,
        )
        return 1
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE") or 1) > 1:
        claim = f"{tempfile.gettempdir()}/kdqat-error-{os.getppid()}-{hashlib.sha1(str(exc).encode()).hexdigest()}"
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return 2
        except OSError:  # an unwritable temp folder: every rank prints
            pass
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2
