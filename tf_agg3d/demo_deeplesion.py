r"""The whole chain on synthetic DeepLesion, as `make demo-deeplesion` runs it.

generate -> preprocess_deeplesion -> train (phase 1 RPN, then joint RPN + FPRN, on split 1,
`configs/deeplesion_demo_cpu.yaml`) -> predict on split 3 -> evaluate (FROC with the LUNA16
criterion, with and without lesions >= 48 mm, by lesion type and by diameter bucket, as the
paper's Tables V and VI), then a per-type table is printed.

Each step runs the real command-line entry point in a subprocess, exactly as a user would type
it. Re-running resumes: converted series are skipped and training resumes from checkpoints.

Usage:
  python -m tf_agg3d.demo_deeplesion --out demo_out/deeplesion [--n-series 16] [--seed 0] \
      [--size 128] [--config configs/deeplesion_demo_cpu.yaml] [--rpn-steps N] [--joint-steps N]
"""

from __future__ import annotations

import json
import os

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.cli.demo_steps import Demo

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "demo_out/deeplesion", "Folder for every artefact of the demo.")
flags.DEFINE_integer("n-series", 16, "Synthetic DeepLesion series to generate.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.", lower_bound=0)
flags.DEFINE_integer("size", 128, "Pixels per synthetic slice side (real data: 512).")
cli_flags.define_config_flags(
    "Training config.", with_set=False, default_config="configs/deeplesion_demo_cpu.yaml"
)
flags.DEFINE_integer("rpn-steps", 0, "Phase-1 steps (0: the config's).")
flags.DEFINE_integer("joint-steps", 0, "Joint-phase steps (0: the config's).")
flags.DEFINE_integer("workers", 1, "Conversion worker processes.", lower_bound=1)


def _fmt(value) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def breakdown_table(summary: dict) -> str:
    """A text table of an evaluation summary's DeepLesion groups (paper Tables V and VI).

    Rows: all lesions, without large ones, each lesion type (with and without large ones) and
    each diameter bucket; columns: lesions, detected, FROC score and the sensitivity at each
    FP rate.

    Args:
      summary: the JSON summary written by ``python -m tf_agg3d.evaluate`` (summary.json).
    """
    rates = summary["fp_rates"]
    groups = summary["breakdown"]
    head = f"{'group':32s} {'lesions':>7s} {'found':>5s} {'FROC':>6s} " + " ".join(
        f"{r:>6g}" for r in rates
    )
    lines = [head, "-" * len(head)]

    def add(name: str, group: dict) -> None:
        if not group.get("nodules"):
            return  # a type or bucket without lesions on the evaluated scans
        sens = group.get("sensitivities") or [None] * len(rates)
        # Groups say "detected"; the top level of the summary says "true_positives".
        found = group.get("detected", group.get("true_positives", 0))
        lines.append(
            f"{name:32s} {group.get('nodules', 0):7d} {found:5d} "
            f"{_fmt(group.get('froc_score'))} " + " ".join(_fmt(s) for s in sens)
        )

    add("all lesions", summary)
    if "overall_without_large" in groups:
        add(f"without large (>= {groups['large_mm']:g} mm)", groups["overall_without_large"])
    for name, group in groups.get("by_lesion_type", {}).items():
        add(f"type {name}", group)
    for name, group in groups.get("by_lesion_type_without_large", {}).items():
        add(f"type {name}, no large", group)
    for name, group in groups.get("by_size", {}).items():
        add(f"diameter {name} mm", group)
    return "\n".join(lines)


def main(argv) -> int:
    """The command's body (flags already parsed): returns the exit status."""
    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {argv[1:]}")
    opts = cli_flags.values()
    demo = Demo(opts.out, "deeplesion")
    demo.generate(
        "tf_agg3d.data.synthetic_deeplesion",
        "series",
        opts.n_series,
        opts.seed,
        ["--size", str(opts.size)],
    )
    demo.step(
        "preprocess",
        [
            "tf_agg3d.preprocess_deeplesion",
            "--root",
            demo.raw,
            "--out",
            demo.cache,
            "--workers",
            str(opts.workers),
            "--config",
            opts.config,
        ],
    )
    lists = {name: os.path.join(demo.cache, f"{name}_seriesuids.csv") for name in ("train", "test")}
    counts = {}
    for name, path in lists.items():
        with open(path) as f:
            counts[name] = sum(1 for line in f if line.strip())
        if not counts[name]:
            raise SystemExit(f"no {name} series in {path}: generate more series (--n-series)")
    print(f"{counts['train']} training series (split 1), {counts['test']} test (split 3)")

    demo.train_phases(
        opts.config, lists["train"], {"rpn": opts.rpn_steps, "joint": opts.joint_steps}
    )

    summary, eval_dir = demo.predict_and_evaluate(
        lists["test"], demo.cache, ["--config", opts.config, "--size-edges-mm", "10,30"]
    )
    print("\n=== FROC on split 3 (LUNA16 criterion), by lesion type and diameter", flush=True)
    print(breakdown_table(summary), flush=True)
    print("\n=== demo finished", flush=True)
    print(
        json.dumps(
            {
                "froc_score": summary["froc_score"],
                "froc_without_large": summary["breakdown"]
                .get("overall_without_large", {})
                .get("froc_score"),
                "test_series": counts["test"],
                "seconds": demo.seconds(),
                "evaluation": eval_dir,
            },
            indent=1,
        ),
        flush=True,
    )
    return cli_exit.OK


def run() -> None:
    """``agg3d-demo-deeplesion`` / ``python -m tf_agg3d.demo_deeplesion``."""
    cli_exit.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
