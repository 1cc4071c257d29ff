r"""Ablations of the paper's Tables II and III: every variant x seed trained, scored, compared.

Usage:
  python -m tf_agg3d.ablate --suite table3 [--suite table2] --data CACHE --base-config C \
      --out DIR [--seeds 3] [--parallel N [--gpus 0,1]] [--test-subsets 0,1] \
      [--train-subsets 2,3,...] [--variants 3d_ag,no_da] [--set key=value ...] \
      [--annotations annotations.csv --excluded annotations_excluded.csv]
  python -m tf_agg3d.ablate --suite table3 --data CACHE --base-config C --out DIR --report-only

Suites (tf_agg3d/experiments/ablation_suites.py; docs/ablation.md): ``table3`` (RPN only, 3D-AG,
3D-AG-LM, without Diameter Alignment, alternating instead of joint; ``crop96`` when --variants
names it), ``table2`` (adaptive focal, focal, OHEM; RPN only), ``smoke`` (3D-AG and RPN only,
one seed, 4 steps per phase). Each variant is the base config with only its row's settings
changed. Every variant x seed (``train.seed`` = ``data.seed`` = 0..N-1) trains on the cache's
training subsets in ``DIR/runs/<suite>/<variant>/seed<s>/``, predicts the held-out subsets'
scans, scores the combined, RPN-branch and FPRN-branch FROC, and writes ``DONE.json`` last.
Then ``DIR/ablation.csv`` (a row per run plus one aggregate row per variant), ``ablation.md``
(mean ± std [min, max] over seeds, the difference from the suite's baseline with a paired
bootstrap 95% CI over held-out scans, the branch FROCs, the paper's number) and
``ablation.png``.

--seeds N: seeds per variant (default: the suite's, 3; smoke 1).
--test-subsets / --train-subsets: the held-out subsets (default 0,1, as make demo) and the
training ones (default: every other subset).
--parallel N: N runs at once, each ``python -m tf_agg3d.ablate ... --runs suite/variant/seed``
in its own process; ``--gpus 0,1`` gives each process one GPU, round robin.
--report-only: no training; the report of the runs done so far.

Resuming: rerun the same command. Done runs are skipped, an unfinished run resumes from its
newest checkpoints. Exit status: 0 done; 1 a run failed; 2 a usage, config or data error;
143 after SIGTERM (a checkpoint was saved; rerun to resume). Every flag also takes its
underscore spelling.
"""

from __future__ import annotations

import json
import shlex
import sys

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import experiment_runs
from tf_agg3d.cli import flags as cli_flags

FLAGS = flags.FLAGS
cli_flags.define_experiment_flags(
    "Runs",
    "Base YAML config every variant changes (e.g. configs/bench_cpu.yaml); alias --base-config.",
    "Config override key=value for every run, e.g. train.max_steps=100.",
)
flags.DEFINE_alias("base-config", "config")
flags.DEFINE_multi_string("suite", [], "Suite(s): table3, table2, smoke (repeatable).")
flags.DEFINE_string("data", None, "Preprocessed LUNA16 cache (sidecars say each scan's subset).")
flags.DEFINE_string("out", None, "Output folder: runs/, split/, ablation.csv/.md/.png.")
flags.DEFINE_integer("seeds", 0, "Seeds per variant (0: the suite's: 3, smoke 1).")
flags.DEFINE_list("test-subsets", ["0", "1"], "Held-out subsets (predicted and scored).")
flags.DEFINE_list("train-subsets", [], "Training subsets (default: every other subset).")
flags.DEFINE_list("variants", [], "Only these variants (an optional one, crop96, when named).")
flags.DEFINE_list(
    "runs", [], "Only these runs, suite/variant/seed (what --parallel's children get)."
)
flags.DEFINE_bool("report", True, "Write the report after the runs (--no-report: runs only).")
flags.DEFINE_bool("report-only", False, "No training: the report of the runs done so far.")


class _Runs(experiment_runs.Runs):
    """The ablation's runs: one per suite/variant/seed key."""

    title = "ablation"

    def name(self, key) -> str:
        return key.name

    def skipped(self, keys) -> str:
        return f"{len(keys)} run(s) already done; skipped: {', '.join(k.name for k in keys)}"

    def command(self, key) -> list[str]:
        # No report in the child: the parent writes it.
        opts = self.opts
        command = [sys.executable, "-m", "tf_agg3d.ablate", "--data", opts.data, "--out", opts.out]
        command += ["--runs", key.name, "--no-report", "--seeds", str(opts.seeds)]
        command += ["--test-subsets", ",".join(opts.test_subsets)]
        for name in ("config", "annotations", "excluded"):
            if getattr(opts, name):
                command += [f"--{name}", getattr(opts, name)]
        for name in ("train_subsets", "variants"):
            if getattr(opts, name):
                command += [f"--{name.replace('_', '-')}", ",".join(getattr(opts, name))]
        for suite in opts.suite:
            command += ["--suite", suite]
        for override in opts.set:
            command += ["--set", override]
        return command

    def failed(self, statuses) -> str:
        return f"run(s) {', '.join(sorted(k.name for k in statuses))} failed; rerun to resume"

    def distribute(self, key) -> str:
        return self.experiment.config(key).train.distribute

    def train(self, key, strategy) -> None:
        opts = self.opts
        self.experiment.run(key, strategy, opts.annotations or "", opts.excluded or "")


def main(argv: list[str]) -> int:
    """The command's body (flags already parsed): returns the exit status."""
    opts = experiment_runs.checked_options(argv, "suite", "data", "out")
    if opts.report_only and not opts.report:
        raise cli_exit.UsageError("--report-only writes the report; not with --no-report")
    from tf_agg3d.experiments.ablation import Ablation, parse_run
    from tf_agg3d.utils.filesystems import ensure_filesystems

    ensure_filesystems(opts.data, opts.out, opts.config, opts.annotations, opts.excluded)
    # Errors before any work (ConfigError, ExperimentError, DataError: all ValueErrors) end
    # with one line and status 2 (tf_agg3d.cli.exit.run).
    ablation = Ablation(
        opts.out,
        opts.data,
        opts.suite,
        base_config=opts.config,
        seeds=opts.seeds,
        overrides=opts.set,
        train_subsets=cli_flags.integers("train-subsets", opts.train_subsets),
        test_subsets=cli_flags.integers("test-subsets", opts.test_subsets),
        variants=opts.variants,
    )
    keys = ablation.keys()
    if opts.runs:
        wanted = [parse_run(spec) for spec in opts.runs]
        for key in wanted:
            ablation.planned_for(key)  # an ExperimentError for a run not in the plan
        keys = wanted
    if not opts.report_only:
        ablation.write_split()
        ablation.validate()
        print(
            f"ablation of suite(s) {', '.join(opts.suite)} in {opts.out}: {len(keys)} run(s)"
            + (f", {opts.parallel} at once" if opts.parallel > 1 else ""),
            flush=True,
        )
        status = _Runs(opts, ablation).run(keys)
        if status != cli_exit.OK or not opts.report:
            return status
    from tf_agg3d.experiments.ablation_report import write_report
    from tf_agg3d.utils.files import read_text

    command = "python -m tf_agg3d.ablate " + shlex.join(sys.argv[1:])
    report = write_report(ablation, opts.annotations or "", opts.excluded or "", command)
    print(read_text(report["files"]["ablation.md"]), flush=True)
    print(json.dumps(report["files"], indent=1), flush=True)
    return cli_exit.OK


def run() -> None:
    """``agg3d-ablate`` / ``python -m tf_agg3d.ablate``."""
    cli_exit.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
