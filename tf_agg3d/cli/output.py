"""The lines a command prints: results on stdout, progress and per-item failures on stderr.

Runs are long, so every line is flushed at once rather than left in a buffer. These lines are
the project's own output and show at every ``--verbosity``; absl and TensorFlow INFO logging
does not (:mod:`tf_agg3d.cli.flags`).
"""

from __future__ import annotations

import sys


def report(line: str) -> None:
    """Prints one line on stdout at once (results, and the preprocessors' progress)."""
    print(line, flush=True)


def note(line: str) -> None:
    """Prints one line on stderr at once (progress beside a result file, failed items)."""
    print(line, file=sys.stderr, flush=True)
