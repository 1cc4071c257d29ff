r"""LUNA16 10-fold cross-validation: train one model per held-out subset, pool, ONE FROC.

Usage:
  python -m tf_agg3d.crossval --config C --cache CACHE --out DIR [--folds 0-9] \
      [--stages rpn,joint,abs] [--parallel N [--gpus 0,1]] [--set key=value ...] \
      [--annotations annotations.csv --excluded annotations_excluded.csv]
  python -m tf_agg3d.crossval --config C --cache CACHE --out DIR --combine [--allow-missing]

Fold k trains on every subset but k (``data.fold=k``) in ``DIR/fold{k}/`` -- the stages in
order: ``rpn`` (phase 1), ``joint`` / ``alternating`` (phase 2), ``abs`` (Anchor Based Sampling
mines hard negatives, then a phase-2 round trains on them: ``tf_agg3d.train``'s recipe rpn,
joint, abs, joint) -- then predicts the scans of subset k with that model into
``DIR/fold{k}/predictions.csv`` and writes ``DIR/fold{k}/DONE.json`` last. Once every fold is
done the folds' predictions are pooled into ``DIR/predictions.csv`` (each held-out scan of the
cache exactly once) and evaluated the LUNA16 way (what ``tf_agg3d.evaluate`` computes) into
``DIR/evaluation/``; ``DIR/folds.csv`` and the printed table give each fold's scans, nodules,
FROC alone and seconds, ``DIR/summary.json`` the pooled FROC, its bootstrap CI and the FROC of
each branch (combined, RPN, FPRN).

--folds: ``3``, ``0-9``, ``0,2,5`` (default: every subset the cache has scans of). A run of
some folds pools only when every fold is done (``--allow-missing``: the done ones).
--stages: default the config's ``train.stages`` when it has one, else ``rpn,joint``.
--combine: no training; pools and evaluates the folds done under DIR (folds may be run on
different machines writing to one DIR); refuses, naming them, when some are missing unless
``--allow-missing``.
--parallel N: N folds at once, each ``python -m tf_agg3d.crossval ... --folds k`` in its own
process; ``--gpus 0,1`` gives each process one GPU (``CUDA_VISIBLE_DEVICES``), round robin.
--annotations / --excluded: default ``CACHE/annotations.csv``, else the CSVs of the LUNA16 root
the cache was preprocessed from, else the cache sidecars' nodules.

Resuming: rerun the same command. Done folds are skipped, training resumes from the newest
checkpoint of each phase (a finished phase returns at once), the ABS pass is not redone, a fold
without DONE.json predicts its scans again. Every path may be an ``s3://`` / ``gs://`` URL.

Exit status: 0 done; 1 a fold failed (its scans, or training mid-run); 2 a usage, config or data
error (an unknown fold spec, missing folds for --combine, a pool that is not one scan per
fold); 143 after SIGTERM (a checkpoint was saved; rerun to resume). Every flag also takes its
underscore spelling.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import experiment_runs
from tf_agg3d.cli import flags as cli_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("cache", None, "Preprocessed LUNA16 cache (sidecars say each scan's subset).")
flags.DEFINE_string("out", None, "Output folder: fold<k>/ model dirs, the pool, the evaluation.")
flags.DEFINE_string("folds", None, "Folds to run: '3', '0-9', '0,2,5' (default: the cache's).")
flags.DEFINE_string(
    "stages", None, "Stages of each fold: rpn,joint[,abs] (default: train.stages or rpn,joint)."
)
cli_flags.define_experiment_flags(
    "Folds",
    "YAML experiment config (configs/*.yaml).",
    "Config override key=value for every fold and stage, e.g. train.max_steps=100.",
)
flags.DEFINE_bool("combine", False, "No training: pool and evaluate the done folds.")
flags.DEFINE_bool("allow-missing", False, "Pool the done folds even when some are not done.")
flags.DEFINE_bool("pool", True, "Pool and evaluate after the folds (--no-pool: folds only).")


def _report(summary: dict) -> None:
    from tf_agg3d.experiments.crossval import format_table

    print(format_table(summary), flush=True)
    brief = {
        "froc_score": summary["froc_score"],
        "froc_ci": summary["froc_ci"],
        "sensitivities": dict(
            zip(map(str, summary["fp_rates"]), summary["sensitivities"], strict=True)
        ),
        "branches": None
        if summary["branches"] is None
        else {k: v["froc_score"] for k, v in summary["branches"].items()},
        "scans": summary["scans"],
        "nodules": summary["nodules"],
        "folds": summary["folds_pooled"],
        "summary": f"{FLAGS.out.rstrip('/')}/summary.json",
    }
    if summary["branches_note"]:
        brief["branches_note"] = summary["branches_note"]
    print(json.dumps(brief, indent=1), flush=True)


class _Folds(experiment_runs.Runs):
    """The cross-validation's runs: one per fold."""

    title = "cross-validation"

    def name(self, fold) -> str:
        return f"fold {fold}"

    def skipped(self, folds) -> str:
        from tf_agg3d.experiments.crossval import format_folds

        return f"fold(s) {format_folds(folds)} already done; skipped"

    def command(self, fold) -> list[str]:
        # No pooling in the child: the parent pools.
        opts = self.opts
        command = [sys.executable, "-m", "tf_agg3d.crossval", "--cache", opts.cache]
        command += ["--out", opts.out, "--folds", str(fold), "--nopool"]
        if opts.config:
            command += ["--config", opts.config]
        if opts.stages:
            command += ["--stages", opts.stages]
        for override in opts.set:
            command += ["--set", override]
        return command

    def failed(self, statuses) -> str:
        from tf_agg3d.experiments.crossval import format_folds

        folds = sorted(statuses)
        codes = ", ".join(f"{k}: {statuses[k]}" for k in folds)
        return f"fold(s) {format_folds(folds)} failed ({codes}); rerun to resume them"

    def distribute(self, fold) -> str:
        return self.experiment.base_config.train.distribute

    def train(self, fold, strategy) -> None:
        self.experiment.run_fold(fold, strategy=strategy)


def main(argv: list[str]) -> int:
    """The command's body (flags already parsed): returns the exit status."""
    opts = experiment_runs.checked_options(argv, "cache", "out")
    if opts.combine and not opts.pool:
        raise cli_exit.UsageError("--combine pools; it cannot be given with --no-pool")
    from tf_agg3d.experiments.crossval import CrossValidation, format_folds, parse_folds
    from tf_agg3d.utils.filesystems import ensure_filesystems

    ensure_filesystems(opts.cache, opts.out, opts.config, opts.annotations, opts.excluded)
    # Errors before any work (ConfigError, CrossvalError, DataError: all ValueErrors) end with
    # one line and status 2 (tf_agg3d.cli.exit.call).
    folds = parse_folds(opts.folds) if opts.folds is not None else None
    cv = CrossValidation(
        opts.out, opts.cache, config_path=opts.config, overrides=opts.set, stages=opts.stages
    )
    folds = cv.check_folds(folds if folds is not None else cv.cache_folds())
    if not opts.combine:
        cv.validate(folds)
        print(
            f"cross-validation of fold(s) {format_folds(folds)} in {opts.out}: stages "
            f"{','.join(cv.stages)}" + (f", {opts.parallel} at once" if opts.parallel > 1 else ""),
            flush=True,
        )
        status = _Folds(opts, cv).run(folds)
        if status != cli_exit.OK or not opts.pool:
            return status
        expected = cv.cache_folds()
        missing = [k for k in expected if not cv.is_done(k)]
        if missing and not opts.allow_missing:
            print(
                f"fold(s) {format_folds(folds)} done; not pooled yet: fold(s) "
                f"{format_folds(missing)} of the cache's {format_folds(expected)} are not done "
                "(run them, then --combine; or --allow-missing)",
                flush=True,
            )
            return cli_exit.OK
        folds = expected
    pool = cv.pool(folds, allow_missing=opts.allow_missing)
    summary = cv.evaluate(pool, annotations=opts.annotations or "", excluded=opts.excluded or "")
    _report(summary)
    return cli_exit.OK


def run() -> None:
    """``agg3d-crossval`` / ``python -m tf_agg3d.crossval``."""
    cli_exit.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
