r"""The whole chain on synthetic LUNA16, as `make demo` runs it.

generate -> preprocess -> train (phase 1 RPN, then joint RPN + FPRN) -> predict on held-out
scans -> evaluate (FROC, bootstrap CI, TNP, curve, hard-case gallery).

Two data profiles (`--profile`), each with its own defaults:
  - realistic (the default, issue 18): 50 scans of the realistic profile (vessel trees;
    solid, part-solid, ground-glass, juxta-pleural and juxta-vascular nodules; partial volume),
    the benchmark split (subsets 0-5 train, 6-9 held out) and `configs/demo_realistic_cpu.yaml`,
    the benchmark's 3D-AG recipe with 1000 + 1000 steps (docs/benchmark.md, "make demo").
  - default: the easy set of 30 scans, subsets 0-1 held out, `configs/demo_cpu.yaml`.

Each step runs the real command-line entry point in a subprocess, exactly as a user would type
it, so the demo also proves the CLIs. Re-running resumes: finished scans are skipped and
training resumes from its checkpoints.

Usage:
  python -m tf_agg3d.demo --out demo_out [--profile realistic|default] [--n-scans N] \
      [--seed 0] [--test-subsets 6,7,8,9] [--config YAML] [--min-froc 0.5]

Exit status: 0 done; 1 a step failed or the held-out FROC is below --min-froc; 2 a usage error.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.cli.demo_steps import Demo
from tf_agg3d.utils.atomic_write import atomic_write_text


@dataclasses.dataclass(frozen=True)
class DemoProfile:
    """What the demo runs on one synthetic data profile unless flags say otherwise."""

    n_scans: int
    test_subsets: tuple[int, ...]
    config: str


PROFILES = {
    # 30 training and 20 held-out scans: generation (~3 s a scan) and 1000 + 1000 steps fit
    # in about 15 minutes on 2 cores (docs/benchmark.md, "make demo").
    "realistic": DemoProfile(50, (6, 7, 8, 9), "configs/demo_realistic_cpu.yaml"),
    "default": DemoProfile(30, (0, 1), "configs/demo_cpu.yaml"),
}

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "demo_out", "Folder for every artefact of the demo.")
flags.DEFINE_enum(
    "profile",
    "realistic",
    sorted(PROFILES),
    "Synthetic data profile (tf_agg3d.data.synthetic --profile); it sets the defaults of "
    "--n-scans, --test-subsets and --config.",
)
flags.DEFINE_integer("n-scans", None, "Synthetic scans to generate (spread over subset0..9).")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")
flags.DEFINE_list("test-subsets", None, "LUNA16 subsets held out for prediction/evaluation.")
cli_flags.define_config_flags("Training config (default: the profile's).", with_set=False)
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


def _claim_out(out: str, settings: dict) -> None:
    """Records the settings that shape OUT's data and model in OUT/demo_settings.json, or
    refuses a folder that holds a demo run with other ones (or files without that record).

    Both profiles give the same seriesuids for a seed, and the steps resume from what OUT holds
    (cached scans, checkpoints), so a re-run with other settings would mix the two runs.
    """
    path = os.path.join(out, "demo_settings.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            changed = ", ".join(
                f"{k}: {before.get(k)!r} -> {settings[k]!r}"
                for k in settings
                if before.get(k) != settings[k]
            )
            raise cli_exit.UsageError(
                f"{out} holds a demo run with other settings ({changed}; {path}); "
                "choose another --out or delete that folder"
            )
        return
    if os.path.isdir(out) and os.listdir(out):
        raise cli_exit.UsageError(
            f"{out} holds files but no demo_settings.json (a run of an older demo, or not a "
            "demo folder); choose another --out or delete that folder"
        )
    os.makedirs(out, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


def main(argv) -> int:
    """The command's body (flags already parsed): returns the exit status."""
    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {argv[1:]}")
    opts = cli_flags.values()
    profile = PROFILES[opts.profile]
    n_scans = profile.n_scans if opts.n_scans is None else opts.n_scans
    config = opts.config or profile.config
    if opts.test_subsets is None:
        test_subsets = set(profile.test_subsets)
    else:
        test_subsets = set(cli_flags.integers("test-subsets", opts.test_subsets))
    print(
        f"profile {opts.profile}: {n_scans} scans, held-out subsets {sorted(test_subsets)}, "
        f"config {config}",
        flush=True,
    )
    # The generators put scan i in subset i % 10.
    n_test = sum(i % 10 in test_subsets for i in range(n_scans))
    if not 0 < n_test < n_scans:
        raise cli_exit.UsageError(
            f"--n-scans {n_scans} with held-out subsets {sorted(test_subsets)} leaves "
            f"{n_scans - n_test} training and {n_test} held-out scans; both must be > 0"
        )
    _claim_out(
        opts.out,
        {
            "profile": opts.profile,
            "n_scans": n_scans,
            "seed": opts.seed,
            "test_subsets": sorted(test_subsets),
            "config": config,
        },
    )
    demo = Demo(opts.out, "luna16")
    demo.generate(
        "tf_agg3d.data.synthetic", "scans", n_scans, opts.seed, ["--profile", opts.profile]
    )
    demo.step(
        "preprocess",
        ["tf_agg3d.preprocess", "--luna-root", demo.raw, "--out", demo.cache, "--config", config],
    )
    by_subset = _uids_by_subset(demo.cache)
    train_uids = [u for s, us in by_subset.items() if s not in test_subsets for u in us]
    test_uids = [u for s, us in by_subset.items() if s in test_subsets for u in us]
    lists = {}
    for name, uids in (("train", train_uids), ("test", test_uids)):
        lists[name] = os.path.join(opts.out, f"{name}_seriesuids.csv")
        atomic_write_text(lists[name], "".join(f"{u}\n" for u in uids))
    print(f"{len(train_uids)} training scans, {len(test_uids)} held-out scans", flush=True)

    demo.train_phases(config, lists["train"], {"rpn": opts.rpn_steps, "joint": opts.joint_steps})

    summary, eval_dir = demo.predict_and_evaluate(lists["test"], demo.raw)
    print("\n=== demo finished", flush=True)
    print(
        json.dumps(
            {
                "froc_score": summary["froc_score"],
                "sensitivities": dict(
                    zip(map(str, summary["fp_rates"]), summary["sensitivities"], strict=False)
                ),
                "profile": opts.profile,
                "config": config,
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
