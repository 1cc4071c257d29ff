"""How loud a tf_agg3d command is: TensorFlow's native log level from ``-v`` / ``--verbosity``.

TensorFlow's C++ side prints INFO lines (the oneDNN notice, the CPU-feature guard, "Sharding
callback duration") as soon as it is imported or runs an op. Its threshold,
``TF_CPP_MIN_LOG_LEVEL``, is read when TensorFlow is imported, before absl has parsed any flag,
so a command decides it from its raw arguments: :func:`quiet_native_logs` runs when the
``tf_agg3d`` package is imported by a command (``python -m tf_agg3d.<command>`` or an
``agg3d-*`` console script), and again, to no effect if TensorFlow is already imported, when the
command starts (:func:`tf_agg3d.cli.exit.run`).

The level follows absl's ``--verbosity``: not given shows TensorFlow's C++ errors only; below
INFO (-1 warning, -2 error, -3 fatal) shows that level and above; INFO (0) or DEBUG (1 and
up) leaves TensorFlow's own default (everything). A ``TF_CPP_MIN_LOG_LEVEL``
already in the environment always wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence

ENV = "TF_CPP_MIN_LOG_LEVEL"

# absl's level names (absl.logging.converter), for --verbosity=warning and the like.
_NAMED = {"debug": 1, "info": 0, "warning": -1, "warn": -1, "error": -2, "fatal": -3}
_SPELLINGS = ("verbosity", "v")


def _level(text: str) -> int | None:
    text = text.strip().lower()
    if text in _NAMED:
        return _NAMED[text]
    try:
        return int(text)
    except ValueError:
        return None


def requested_verbosity(argv: Sequence[str]) -> int | None:
    """The ``-v`` / ``--verbosity`` level in `argv` (the last one given), or None.

    Accepts absl's spellings: ``-v 1``, ``-v=1``, ``--v=1``, ``--verbosity 0``,
    ``-verbosity=0``, and level names (``--verbosity=info``). An unreadable value counts as not
    given (absl reports it when it parses the flags).
    """
    found = None
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue
        name, sep, value = arg.lstrip("-").partition("=")
        if name not in _SPELLINGS:
            continue
        if not sep:
            value = args[i + 1] if i + 1 < len(args) else ""
        level = _level(value)
        if level is not None:
            found = level
    return found


def native_log_level(argv: Sequence[str]) -> int | None:
    """The ``TF_CPP_MIN_LOG_LEVEL`` a command run with `argv` wants; None: TensorFlow's own."""
    verbosity = requested_verbosity(argv)
    if verbosity is None:
        # Not asked for: TensorFlow's C++ warnings go too (tf.data's "will not be optimized",
        # retracing notes): they are about TensorFlow's internals, not the user's run.
        return 2
    if verbosity >= 0:
        return None
    return min(3, -verbosity)


def quiet_native_logs(argv: Sequence[str], environ: MutableMapping[str, str] | None = None) -> None:
    """Sets ``TF_CPP_MIN_LOG_LEVEL`` for a command run with `argv`, unless the user set it."""
    environ = os.environ if environ is None else environ
    if ENV in environ:
        return
    level = native_log_level(argv)
    if level is not None:
        environ[ENV] = str(level)


def running_as_command(argv: Sequence[str]) -> bool:
    """Whether this process is a tf_agg3d command: ``python -m ...`` or an ``agg3d-*`` script.

    While ``python -m pkg.mod`` imports ``pkg``, ``sys.argv[0]`` is ``"-m"``.
    """
    if not argv:
        return False
    program = os.path.basename(argv[0])
    return argv[0] == "-m" or program.startswith("agg3d-")
