"""Ending a CLI process with a given exit status, whatever native libraries do at exit.

After ``import tensorflow_io`` and use of its S3 filesystem, the interpreter's normal shutdown
can abort inside the AWS SDK's static destructors ("pure virtual method called", SIGABRT, exit
status 134), turning a successful run into a failed one for shells and schedulers. The work is
complete by then, so entry points that touched object storage flush what they wrote and leave
with :func:`exit_now`, which skips the interpreter's (and those destructors') shutdown.
Commands end through :func:`tf_agg3d.cli.exit.run`, which calls :func:`exit_after`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys


def flush_all() -> None:
    """Flushes stdout, stderr and every logging handler (absl's included)."""
    for stream in (sys.stdout, sys.stderr):
        # A closed or replaced stream must not keep the exit status from being reported.
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()
    logging.shutdown()


def exit_now(code: int) -> None:
    """Flushes output and logging, then ends the process at once with status `code`.

    Nothing after this runs: no ``atexit`` handlers, no ``finally`` blocks up the stack, no
    native static destructors. Call it only when every file the run writes is closed.

    Args:
      code: the exit status (an int; ``None`` means 0, like ``sys.exit``).
    """
    flush_all()
    os._exit(0 if code is None else int(code))


def exit_after(main_result: int | None) -> None:
    """``exit_now(main_result)`` when tensorflow-io was imported, else ``sys.exit(main_result)``.

    Use as the last statement of an entry point: processes that never loaded tensorflow-io keep
    Python's normal shutdown (atexit handlers, buffered files).
    """
    if "tensorflow_io" in sys.modules:
        exit_now(main_result)
    sys.exit(main_result)
