"""What the preprocessing commands (:mod:`tf_agg3d.preprocess`,
:mod:`tf_agg3d.preprocess_deeplesion`) share: their common flags and their body.

The flags are filed under the command module that calls :func:`define_flags` (absl's
``disclaim_key_flags``), so each command's ``--help`` lists them as its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.cli.output import report
from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data.luna16.csv_io import read_seriesuids
from tf_agg3d.data.preprocessing.runner import RunSummary

flags.disclaim_key_flags()


def define_flags(set_example: str, seriesuids_help: str) -> None:
    """Defines ``--workers``, ``--config``, ``--set`` and ``--seriesuids``.

    Args:
      set_example: a ``preprocess.key=value`` override, shown in the help of ``--set``.
      seriesuids_help: the help of ``--seriesuids`` (what the file lists).
    """
    flags.DEFINE_integer("workers", 1, "Worker processes.", lower_bound=1)
    cli_flags.define_config_flags(
        "YAML experiment config (its `preprocess` section is used).",
        f"Config override key=value, e.g. {set_example}.",
    )
    flags.DEFINE_string("seriesuids", None, seriesuids_help)


def numbers(name: str, values: Sequence[str] | None) -> list[int] | None:
    """The values of list flag `name` as integers (a usage error if one is not); None when
    it is empty (no restriction)."""
    return cli_flags.integers(name, values) or None


def run_arguments(opts) -> dict:
    """The keyword arguments both runners take from the flags of :func:`define_flags`:
    ``seriesuids`` (the ``--seriesuids`` list; None: no restriction), ``workers``, and
    ``report`` (the progress printer).

    Args:
      opts: the flag values (:func:`tf_agg3d.cli.flags.values`).
    """
    return {
        "seriesuids": read_seriesuids(opts.seriesuids) if opts.seriesuids else None,
        "workers": opts.workers,
        "report": report,
    }


def main(convert: Callable[[PreprocessConfig], RunSummary], argv: list[str]) -> int:
    """Both commands' body (flags already parsed): converts with the ``preprocess`` section of
    ``--config`` / ``--set``; returns the exit status (1 when any item failed)."""
    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {argv[1:]}")
    summary = convert(cli_flags.load_config_from_flags().preprocess)
    return cli_exit.items_status(summary.failed)
