"""The synthetic dataset generators' command lines: their absl flags and ``main`` bodies.

Two entry points run through here:

- ``python -m tf_agg3d.data.synthetic --out DIR --n-scans N --seed S [--shape D,H,W]
  [--overwrite] [--profile default|realistic]``: synthetic LUNA16
  (:mod:`tf_agg3d.data.synthetic.luna16`; the realistic profile and the benchmark split are
  :mod:`tf_agg3d.data.synthetic.realistic`);
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
from tf_agg3d.data.synthetic import realistic as synthetic_realistic


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
    flag_values, layout: str, unit: str, default: int, module_name: str | None = None
) -> dict:
    """Defines the flags both synthetic generators take: --out, --n-<unit> and --seed.

    Args:
      flag_values: the absl FlagValues to define them in (default: absl's FLAGS).
      layout: the dataset whose layout --out gets ("LUNA16", "DeepLesion").
      unit: what --n-<unit> counts ("scans", "series").
      default: the default count.
      module_name: the module ``--help`` files them under (default: the running program).

    Returns:
      ``flag_values`` and ``module_name`` keyword arguments for absl's ``DEFINE_*``: where the
      generator defines its own flags, beside these.
    """
    from absl import flags

    if module_name is None or module_name == "__main__":
        module_name = _program()
    where = {
        "flag_values": flag_values if flag_values is not None else flags.FLAGS,
        "module_name": module_name,
    }
    flags.DEFINE_string("out", None, f"Output folder ({layout} layout).", **where)
    flags.DEFINE_integer(f"n_{unit}", default, f"Number of {unit}.", lower_bound=1, **where)
    flags.DEFINE_integer("seed", 0, "Seed (>= 0); same seed, same bytes.", lower_bound=0, **where)
    flags.mark_flag_as_required("out", flag_values=where["flag_values"])
    return where


def dataset_main(
    argv,
    generate_dataset: Callable[..., dict],
    unit: str,
    options: Callable[[Any], dict],
    details: Callable[[dict], str],
    errors: tuple[type[Exception], ...],
) -> int:
    """The body of both synthetic generators' absl ``main``.

    Calls ``generate_dataset(--out, --n-<unit>, seed=--seed, verbose=True, **options(FLAGS))``
    and prints ``wrote <count> <unit>, <details> to <folder> in <seconds> s``.

    Args:
      argv: absl's arguments; any beyond the program name end the program with a message.
      generate_dataset: the generator; returns a summary dict with at least ``uids``,
        ``out_dir`` and ``seconds``.
      unit: what ``--n-<unit>`` counts (:func:`define_dataset_flags`).
      options: absl's FLAGS -> the generator's further keyword arguments.
      details: summary -> what the summary line says between the count and the folder.
      errors: exceptions that mean bad flags or an unusable OUT: printed, exit status 2.

    Returns:
      The exit status: 0, or 2 when the generator raised one of `errors`.
    """
    from absl import flags

    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {argv[1:]}")
    fv = flags.FLAGS
    try:
        count = fv[f"n_{unit}"].value
        summary = generate_dataset(fv.out, count, seed=fv.seed, verbose=True, **options(fv))
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(summary['uids'])} {unit}, {details(summary)} to {summary['out_dir']} "
        f"in {summary['seconds']:.1f} s"
    )
    return 0


# --------------------------------------------------------------------------------------------
# Synthetic LUNA16
# --------------------------------------------------------------------------------------------


def define_luna16_flags(flag_values=None) -> None:
    """Defines the synthetic LUNA16 generator's absl flags."""
    from absl import flags

    where = define_dataset_flags(flag_values, "LUNA16", "scans", 10)
    flags.DEFINE_string("shape", None, "D,H,W voxels per scan (default ~120,256,256).", **where)
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Delete scans of another dataset in OUT's layout folders instead of refusing.",
        **where,
    )
    flags.DEFINE_enum(
        "profile",
        "default",
        ["default", "realistic"],
        "default: the demo's easy set; realistic: dense vessels, ground-glass / part-solid / "
        "juxta-pleural / juxta-vascular nodules, partial volume, and the benchmark split "
        "(subsets 0-5 train, 6-9 held out; docs/benchmark.md).",
        **where,
    )


def luna16_main(argv) -> int:
    """absl entry point: generates the LUNA16 dataset the flags describe, prints a summary."""

    def options(fv) -> dict:
        return {"shape": parse_shape(fv.shape), "overwrite": fv.overwrite}

    def details(summary: dict) -> str:
        text = (
            f"{summary['n_nodules']} nodules, {len(summary['negative_uids'])} negative and "
            f"{len(summary['flipped_uids'])} flipped scans"
        )
        if "split" in summary:
            split = summary["split"]
            text += (
                f" (realistic; held out: {len(split['heldout'])} scans, "
                f"{split['heldout_nodules']} nodules)"
            )
        return text

    from absl import flags

    realistic = flags.FLAGS.profile == "realistic"
    return dataset_main(
        argv,
        synthetic_realistic.generate_dataset if realistic else synthetic_luna16.generate_dataset,
        "scans",
        options,
        details,
        (ValueError, FileExistsError),
    )


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

    where = define_dataset_flags(flag_values, "DeepLesion", "series", 12)
    flags.DEFINE_integer(
        "size", 128, "Pixels per slice side (real data: 512).", lower_bound=64, **where
    )


def deeplesion_main(argv) -> int:
    """absl entry point: generates the DeepLesion dataset the flags describe, prints a summary."""

    def details(summary: dict) -> str:
        n_lesions = sum(len(v) for v in summary["lesions"].values())
        return (
            f"{summary['rows']} DL_info rows, {n_lesions} lesions ({summary['large']} >= 48 mm, "
            f"{summary['duplicated']} annotated twice)"
        )

    return dataset_main(
        argv,
        synthetic_deeplesion.generate_dataset,
        "series",
        lambda fv: {"size": fv.size},
        details,
        (ValueError, OSError),
    )


def run_deeplesion() -> None:
    """``python -m tf_agg3d.data.synthetic_deeplesion``: flags, then :func:`deeplesion_main`."""
    define_deeplesion_flags()
    cli_exit.run(deeplesion_main, doc=__doc__)
