"""The synthetic dataset generators' command lines: their absl flags and ``main`` bodies.

Two entry points run through here:

- ``python -m tf_agg3d.data.synthetic --out DIR --n-scans N --seed S [--shape D,H,W]
  [--overwrite]``: synthetic LUNA16 (:mod:`tf_agg3d.data.synthetic.luna16`);
- ``python -m tf_agg3d.data.synthetic_deeplesion --out DIR --n-series N --seed S [--size 128]``:
  synthetic DeepLesion (:mod:`tf_agg3d.data.synthetic.deeplesion`).

Both print one summary line and exit 0, or print ``error: ...`` on stderr and exit 2 when the
flags or OUT are unusable (the statuses and flag spellings of :mod:`tf_agg3d.cli.exit`). Flags are defined only when a program runs, never on import; they
are filed under the program (``sys.argv[0]``), so ``--help`` lists them as its own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.data.synthetic import deeplesion as synthetic_deeplesion
from tf_agg3d.data.synthetic import luna16 as synthetic_luna16


def parse_shape(text: str | None) -> tuple[int, int, int] | None:
    """Parses `"D,H,W"` (or None / empty) for the `--shape` flag."""
    if not text:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3:
        raise ValueError(f"--shape must be D,H,W, got {text!r}")
    return tuple(int(p) for p in parts)


def _program() -> str:
    """The module name absl files the main program's flags under (what ``--help`` lists)."""
    return sys.argv[0]


def define_dataset_flags(
    fv, layout: str, unit: str, default: int, module_name: str | None = None
) -> None:
    """Defines the flags both synthetic generators take: --out, --n-<unit> and --seed.

    Args:
      fv: the absl FlagValues to define them in.
      layout: the dataset whose layout --out gets ("LUNA16", "DeepLesion").
      unit: what --n-<unit> counts ("scans", "series").
      default: the default count.
      module_name: the module ``--help`` files them under (default: the running program).
    """
    from absl import flags

    if module_name is None or module_name == "__main__":
        module_name = _program()
    count = f"n_{unit}"
    flags.DEFINE_string(
        "out", None, f"Output folder ({layout} layout).", flag_values=fv, module_name=module_name
    )
    flags.DEFINE_integer(
        count, default, f"Number of {unit}.", lower_bound=1, flag_values=fv, module_name=module_name
    )
    flags.DEFINE_integer(
        "seed",
        0,
        "Seed (>= 0); same seed, same bytes.",
        lower_bound=0,
        flag_values=fv,
        module_name=module_name,
    )
    flags.mark_flag_as_required("out", flag_values=fv)


def dataset_main(
    argv,
    generate: Callable[[Any], dict],
    describe: Callable[[dict], str],
    errors: tuple[type[Exception], ...],
) -> int:
    """The body of both synthetic generators' absl ``main``.

    Args:
      argv: absl's arguments; any beyond the program name end the program with a message.
      generate: absl's FLAGS -> the generator's summary dict.
      describe: summary -> the line printed when it succeeded.
      errors: exceptions that mean bad flags or an unusable OUT: printed, exit status 2.

    Returns:
      The exit status: 0, or 2 when `generate` raised one of `errors`.
    """
    from absl import flags

    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        summary = generate(flags.FLAGS)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0


# --------------------------------------------------------------------------------------------
# Synthetic LUNA16
# --------------------------------------------------------------------------------------------


def define_luna16_flags(flag_values=None) -> None:
    """Defines the synthetic LUNA16 generator's absl flags."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    program = _program()
    define_dataset_flags(fv, "LUNA16", "scans", 10, program)
    flags.DEFINE_string(
        "shape",
        None,
        "D,H,W voxels per scan (default ~120,256,256).",
        flag_values=fv,
        module_name=program,
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Delete scans of another dataset in OUT's layout folders instead of refusing.",
        flag_values=fv,
        module_name=program,
    )


def luna16_main(argv) -> int:
    """absl entry point: generates the LUNA16 dataset the flags describe, prints a summary."""

    def generate(fv) -> dict:
        shape = parse_shape(fv.shape)
        return synthetic_luna16.generate_dataset(
            fv.out, fv.n_scans, seed=fv.seed, shape=shape, overwrite=fv.overwrite, verbose=True
        )

    def describe(summary: dict) -> str:
        return (
            f"wrote {len(summary['uids'])} scans, {summary['n_nodules']} nodules, "
            f"{len(summary['negative_uids'])} negative and {len(summary['flipped_uids'])} "
            f"flipped scans to {summary['out_dir']} in {summary['seconds']:.1f} s"
        )

    return dataset_main(argv, generate, describe, (ValueError, FileExistsError))


def run_luna16() -> None:
    """``python -m tf_agg3d.data.synthetic``: defines the flags and runs :func:`luna16_main`."""
    define_luna16_flags()
    cli_exit.run(luna16_main, doc=__doc__)


# --------------------------------------------------------------------------------------------
# Synthetic DeepLesion
# --------------------------------------------------------------------------------------------


def define_deeplesion_flags(flag_values=None) -> None:
    """Defines the synthetic DeepLesion generator's absl flags."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    program = _program()
    define_dataset_flags(fv, "DeepLesion", "series", 12, program)
    flags.DEFINE_integer(
        "size",
        128,
        "Pixels per slice side (real data: 512).",
        lower_bound=64,
        flag_values=fv,
        module_name=program,
    )


def deeplesion_main(argv) -> int:
    """absl entry point: generates the DeepLesion dataset the flags describe, prints a summary."""

    def generate(fv) -> dict:
        return synthetic_deeplesion.generate_dataset(
            fv.out, fv.n_series, seed=fv.seed, size=fv.size, verbose=True
        )

    def describe(summary: dict) -> str:
        n_lesions = sum(len(v) for v in summary["lesions"].values())
        return (
            f"wrote {len(summary['uids'])} series, {summary['rows']} DL_info rows, {n_lesions} "
            f"lesions ({summary['large']} >= 48 mm, {summary['duplicated']} annotated twice) to "
            f"{summary['out_dir']} in {summary['seconds']:.1f} s"
        )

    return dataset_main(argv, generate, describe, (ValueError, OSError))


def run_deeplesion() -> None:
    """``python -m tf_agg3d.data.synthetic_deeplesion``: flags, then :func:`deeplesion_main`."""
    define_deeplesion_flags()
    cli_exit.run(deeplesion_main, doc=__doc__)
