r"""The whole chain on synthetic LUNA16, as `make demo` runs it.

generate -> preprocess -> train (phase 1 RPN, then joint RPN + FPRN, `configs/demo_cpu.yaml`)
-> predict on held-out scans -> evaluate (FROC, bootstrap CI, TNP, curve, hard-case gallery).

Each step runs the real command-line entry point in a subprocess, exactly as a user would type
it, so the demo also proves the CLIs. Re-running resumes: finished scans are skipped and
training resumes from its checkpoints.

Usage:
  python -m tf_agg3d.demo --out demo_out [--n-scans 30] [--seed 0] [--test-subsets 0,1] \
      [--min-froc 0.5]

Exit status: 0 done; 1 a step failed or the held-out FROC is below --min-froc; 2 a usage error.
"""

from __future__ import annotations

import json
import os

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.cli.demo_steps import Demo
from tf_agg3d.utils.atomic_write import atomic_write_text

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "demo_out", "Folder for every artefact of the demo.")
flags.DEFINE_integer("n-scans", 30, "Synthetic scans to generate (spread over subset0..9).")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
flags.DEFINE_list("test-subsets", ["0", "1"], "LUNA16 subsets held out for prediction/evaluation.")
cli_flags.define_config_flags(
    "Training config.", with_set=False, default_config="configs/demo_cpu.yaml"
)
flags.DEFINE_integer("rpn-steps", 0, "Phase-1 steps (0: the config's).")
flags.DEFINE_integer("joint-steps", 0, "Joint-phase steps (0: the config's).")
flags.DEFINE_float(
    "min-froc", 0.0, "Exit with status 1 when the held-out FROC is below this (CI's guard)."
)


def _uids_by_subset(cache: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name in sorted(os.listdir(cache)):
        if name.endswith(".json"):
            with open(os.path.join(cache, name)) as f:
                meta = json.load(f)
            out.setdefault(int(meta["subset"]), []).append(meta["seriesuid"])
    return out


def main(argv) -> int:
    """The command's body (flags already parsed): returns the exit status."""
    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {argv[1:]}")
    opts = cli_flags.values()
    demo = Demo(opts.out, "luna16")
    test_subsets = set(cli_flags.integers("test-subsets", opts.test_subsets))
    demo.generate("tf_agg3d.data.synthetic", "scans", opts.n_scans, opts.seed)
    demo.step("preprocess", ["tf_agg3d.preprocess", "--luna-root", demo.raw, "--out", demo.cache])
    by_subset = _uids_by_subset(demo.cache)
    train_uids = [u for s, us in by_subset.items() if s not in test_subsets for u in us]
    test_uids = [u for s, us in by_subset.items() if s in test_subsets for u in us]
    lists = {}
    for name, uids in (("train", train_uids), ("test", test_uids)):
        lists[name] = os.path.join(opts.out, f"{name}_seriesuids.csv")
        atomic_write_text(lists[name], "".join(f"{u}\n" for u in uids))
    print(f"{len(train_uids)} training scans, {len(test_uids)} held-out scans", flush=True)

    demo.train_phases(
        opts.config, lists["train"], {"rpn": opts.rpn_steps, "joint": opts.joint_steps}
    )

    summary, eval_dir = demo.predict_and_evaluate(lists["test"], demo.raw)
    print("\n=== demo finished", flush=True)
    print(
        json.dumps(
            {
                "froc_score": summary["froc_score"],
                "sensitivities": dict(
                    zip(map(str, summary["fp_rates"]), summary["sensitivities"], strict=False)
                ),
                "held_out_scans": len(test_uids),
                "seconds": demo.seconds(),
                "froc_curve": os.path.join(eval_dir, "froc.png"),
                "gallery": os.path.join(eval_dir, "gallery"),
            },
            indent=1,
        )
    )
    if summary["froc_score"] < opts.min_froc:
        raise SystemExit(
            f"held-out FROC {summary['froc_score']:.3f} is below --min-froc {opts.min_froc}"
        )
    return cli_exit.OK


def run() -> None:
    """``agg3d-demo`` / ``python -m tf_agg3d.demo``."""
    cli_exit.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
