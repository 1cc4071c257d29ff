"""How every tf_agg3d command ends: one runner, three documented exit statuses.

- :data:`OK` (0): everything asked for is done.
- :data:`ITEMS_FAILED` (1): some items (scans, series, rows) failed, each named on stderr; the
  others are done. Also a failure during the work (storage failing mid-run, a non-finite loss).
- :data:`USAGE` (2): a usage error (bad or missing flag), a bad configuration or input found
  before any work, or a missing optional package (tensorflow-io for ``s3://``).

Errors are printed on stderr as one ``kind: message`` line (``usage error: ...``,
``ConfigError: ...``, ``DataError: ...``, ``error: ...``), never a TensorFlow trace.
:func:`run` is the runner every command's ``main`` goes through: it parses the flags
(:func:`parse_flags`: both spellings, quiet logging), calls the command's
body, turns the errors it lets out into their status, and ends the process through
:func:`tf_agg3d.utils.process.exit_after` (after S3 use the interpreter's own shutdown can abort).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app, flags

from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.utils.process import exit_after

OK = 0
ITEMS_FAILED = 1
USAGE = 2

# Raise it for a bad or missing flag (absl's, so app.run's own handling still knows it).
UsageError = app.UsageError


def print_error(kind: str, message: object) -> None:
    """Prints ``kind: message`` on stderr at once."""
    print(f"{kind}: {message}", file=sys.stderr, flush=True)


def usage_error(message: str) -> NoReturn:
    """Prints ``usage error: message`` and a pointer to ``--help``; exits with :data:`USAGE`."""
    print_error("usage error", message)
    print("Pass --help to see the flags.", file=sys.stderr, flush=True)
    exit_after(USAGE)
    raise AssertionError("unreachable")  # exit_after always ends the process


_HELP = ("help", "h", "helpshort", "helpfull", "helpxml", "?")


def _asks_for_help(argv: Sequence[str]) -> bool:
    for arg in argv[1:]:
        if arg == "--":
            return False
        if arg.startswith("-") and arg.lstrip("-").partition("=")[0] in _HELP:
            return True
    return False


def parse_flags(argv: Sequence[str], flag_values=None) -> list[str]:
    """absl's flag parsing with both spellings and quiet logging; a bad flag exits with 2.

    ``--help`` (and absl's other help flags) print the usage on stdout and exit with 0.

    Args:
      argv: the command line, the program name first.
      flag_values: absl's FlagValues (default: ``absl.flags.FLAGS``).

    Returns the arguments left after the flags, the program name first (what ``app.run``
    hands to ``main``).
    """
    global_flags = flag_values is None
    flag_values = flags.FLAGS if global_flags else flag_values
    try:
        rest = flag_values(cli_flags.canonical_argv(argv, flag_values))
    except flags.Error as err:
        usage_error(str(err))
    except SystemExit:
        # absl's help flags print the usage and exit with 1; asking for help is no failure.
        if _asks_for_help(argv):
            raise SystemExit(0) from None
        raise
    if global_flags:
        cli_flags.apply_verbosity()
    return rest


def error_kind(err: BaseException) -> str:
    """The ``kind`` printed for `err`.

    The class name for the project's own errors (ConfigError, DataError,
    CheckpointNotFoundError, ...) and TensorFlow's (NotFoundError, ...); "error" for the
    others and for a missing optional package.
    """
    module = type(err).__module__ or ""
    if isinstance(err, ImportError) or not module.startswith(("tf_agg3d", "tensorflow")):
        return "error"
    return type(err).__name__


def error_message(err: BaseException) -> str:
    """`err`'s message; a TensorFlow OpError's message only (not its trace)."""
    message = getattr(err, "message", None)
    return message if isinstance(message, str) and message else str(err)


def report(err: BaseException, kind: str | None = None) -> None:
    """Prints `err` as ``kind: message`` (the kind from :func:`error_kind` by default)."""
    print_error(kind or error_kind(err), error_message(err))


def status_of(err: BaseException) -> int:
    """The exit status for an error a command's body let out.

    :data:`USAGE` for usage, configuration and input errors (ConfigError, DataError,
    ValueError, FileNotFoundError) and a missing optional package (ImportError); otherwise
    :data:`ITEMS_FAILED` (e.g. TensorFlow's storage errors, an OSError mid-run).
    """
    if isinstance(err, (UsageError, ValueError, FileNotFoundError, ImportError)):
        return USAGE  # ConfigError and DataError are ValueErrors
    return ITEMS_FAILED


def items_status(failed) -> int:
    """:data:`ITEMS_FAILED` when any item failed (`failed`: a count or a collection), else OK."""
    return ITEMS_FAILED if failed else OK


def _is_tensorflow_error(err: BaseException) -> bool:
    tf_errors = sys.modules.get("tensorflow.python.framework.errors_impl")
    return tf_errors is not None and isinstance(err, tf_errors.OpError)


def call(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Calls ``main(argv)`` and returns the process's exit status.

    A usage error prints ``usage error: ...`` (status 2); the project's errors and the
    standard input errors print ``kind: message`` with :func:`status_of`'s status; a
    TensorFlow error prints its message only (status 1); ``SystemExit`` keeps its status (a
    message is printed, status 1). Any other exception is a bug: its traceback is printed and
    the status is 1.
    """
    from tf_agg3d.config import ConfigError
    from tf_agg3d.data.errors import DataError

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr, flush=True)
            code = ITEMS_FAILED
    except UsageError as err:
        print_error("usage error", err)
        print("Pass --help to see the flags.", file=sys.stderr, flush=True)
        code = USAGE
    except (ConfigError, DataError, ValueError, FileNotFoundError, ImportError) as err:
        report(err)
        code = status_of(err)
    except Exception as err:  # noqa: BLE001 - the last line of defence of a command
        if _is_tensorflow_error(err):
            report(err)
        else:
            traceback.print_exc()
        code = ITEMS_FAILED
    return OK if code is None else int(code)


def _set_main_doc(doc: str | None) -> None:
    # absl's --help prints __main__'s docstring; a console script's __main__ has none.
    main_module = sys.modules.get("__main__")
    if doc and main_module is not None and not getattr(main_module, "__doc__", None):
        main_module.__doc__ = doc


def run(
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    *,
    doc: str | None = None,
) -> NoReturn:
    """Runs a command: parse the flags (both spellings), call `main`, exit with its status.

    Args:
      main: the command's body; gets the arguments left after the flags (the program name
        first) and returns the exit status (None means 0).
      argv: the command line (default ``sys.argv``).
      doc: the usage text ``--help`` prints when ``__main__`` has none (console scripts):
        pass the command module's ``__doc__``.
    """
    from tf_agg3d.utils.verbosity import quiet_native_logs

    argv = list(sys.argv if argv is None else argv)
    if "tensorflow" not in sys.modules:  # it reads the level once, when imported
        quiet_native_logs(argv, os.environ)
    _set_main_doc(doc)
    if argv:
        cli_flags.file_under_program([main.__module__, cli_flags.__name__], argv[0])
    app.run(lambda args: exit_after(call(main, args)), argv=argv, flags_parser=parse_flags)
    raise AssertionError("unreachable")  # the lambda always ends the process
