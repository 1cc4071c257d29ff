r"""Predict findings of whole scans and write a LUNA16 submission CSV.

Usage:
  python -m tf_agg3d.predict --model-dir DIR --cache CACHE [--seriesuids LIST] \
      --out predictions.csv [--threshold T] [--max-marks N] [--config YAML] [--set k=v ...]
  python -m tf_agg3d.predict --model-dir DIR --luna-root LUNA16 [--subsets 0,1] \
      [--seriesuids LIST] --out predictions.csv
  python -m tf_agg3d.predict --model-dir DIR --scan PATH --out predictions.csv

`--model-dir` holds config.yaml and the training checkpoints. The config used is the model's
config.yaml, then `--config` (a YAML file of sections to change, e.g. ``inference:``), then each
`--set key=value`, then `--threshold` / `--max-marks`. `--luna-root` and `--scan` preprocess each
scan in memory as `tf_agg3d.preprocess` would (the LUNA16 lung mask when the root has one, the
threshold segmentation otherwise); `--cache` reads the preprocessed cache. The CSV has LUNA16's columns
``seriesuid,coordX,coordY,coordZ,probability`` plus ``diameter_mm,rpn_score,fpr_score``, at most
max-marks rows per scan, and is written atomically at the end. A scan that fails is logged and
skipped; the exit status is 1 when any scan failed (or the CSV could not be written), 2 on a
usage or model-loading error or a missing optional package. Progress lines go to stderr;
``-v 0`` / ``--verbosity=0`` adds TensorFlow's INFO logging. Every flag also takes its
underscore spelling (``--model_dir``, ``--max_marks``).

Every path (--model-dir, --cache, --luna-root, --scan, --seriesuids, --config, --out) may be local or an
``s3://`` / ``gs://`` URL (README "Object storage"); ``s3://`` needs tensorflow-io.
"""

from __future__ import annotations

import time

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.cli.output import note

FLAGS = flags.FLAGS
cli_flags.define_model_dir_flag("Model directory (config.yaml + checkpoints).")
flags.DEFINE_string(
    "checkpoint", None, "Checkpoint name/number in --model-dir (default: the latest)."
)
flags.DEFINE_string("cache", None, "Preprocessed cache folder (python -m tf_agg3d.preprocess).")
flags.DEFINE_string(
    "luna-root",
    None,
    "LUNA16 folder (subset*/<uid>.mhd): scans are preprocessed on the fly, with their "
    "seg-lungs-LUNA16 mask when present.",
)
flags.DEFINE_list("subsets", None, "With --luna-root: the subsets to predict (default: all).")
flags.DEFINE_string(
    "seriesuids", None, "With --cache or --luna-root: file listing the seriesuids (default: all)."
)
flags.DEFINE_multi_string("scan", None, "Scan file / DICOM folder / NIfTI to predict instead.")
flags.DEFINE_string("out", None, "Output CSV.")
flags.DEFINE_float("threshold", None, "RPN probability threshold (default: the config's).")
flags.DEFINE_integer("max-marks", None, "Most findings per scan (default: the config's, 100).")
cli_flags.define_config_flags(
    "YAML file merged over the model's config.yaml.",
    "key=value config override, e.g. inference.overlap=16.",
)


def build_config(model_dir: str, config_path: str | None, overrides, threshold, max_marks):
    """The experiment config: model config.yaml <- --config <- --set <- flags.

    Raises:
      ConfigError, FileNotFoundError: an unreadable or invalid file / override.
    """
    from tf_agg3d.config import load_config
    from tf_agg3d.models.loading import load_model_config

    overrides = list(overrides)
    if threshold is not None:
        overrides.append(f"inference.score_threshold={threshold!r}")
    if max_marks is not None:
        overrides.append(f"inference.max_marks={max_marks}")
    return load_config(config_path, overrides, base=load_model_config(model_dir))


def _check_usage(opts) -> list[int] | None:
    """Raises a usage error for a bad flag combination; returns the --subsets as ints."""
    if not opts.model_dir or not opts.out:
        raise cli_exit.UsageError("--model-dir and --out are required")
    if sum(bool(v) for v in (opts.cache, opts.luna_root, opts.scan)) != 1:
        raise cli_exit.UsageError("give exactly one of --cache, --luna-root or --scan")
    if opts.seriesuids and not (opts.cache or opts.luna_root):
        raise cli_exit.UsageError("--seriesuids needs --cache or --luna-root")
    if opts.subsets and not opts.luna_root:
        raise cli_exit.UsageError("--subsets needs --luna-root")
    return cli_flags.integers("subsets", opts.subsets) or None


def main(argv) -> int:
    """The command's body (flags already parsed): returns the exit status."""
    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {argv[1:]}")
    opts = cli_flags.values()
    subsets = _check_usage(opts)
    from tf_agg3d.utils.filesystems import ensure_filesystems

    # Before the model load: a missing tensorflow-io is reported at once, not after it.
    ensure_filesystems(
        opts.model_dir,
        opts.cache,
        opts.luna_root,
        opts.out,
        opts.seriesuids,
        opts.config,
        *(opts.scan or []),
    )
    import tensorflow as tf

    from tf_agg3d.data.errors import DataError
    from tf_agg3d.data.luna16.csv_io import write_predictions
    from tf_agg3d.inference.jobs import prediction_jobs, run_jobs
    from tf_agg3d.inference.predictor import Predictor

    try:
        config = build_config(opts.model_dir, opts.config, opts.set, opts.threshold, opts.max_marks)
        predictor = Predictor(opts.model_dir, config=config, checkpoint=opts.checkpoint)
        jobs = prediction_jobs(
            cache=opts.cache,
            luna_root=opts.luna_root,
            subsets=subsets,
            seriesuids=opts.seriesuids,
            scans=opts.scan,
        )
    except tf.errors.OpError as err:  # storage errors: permissions, an unreachable endpoint
        cli_exit.report(err)
        return cli_exit.USAGE
    inf = config.inference
    if inf.mode == "tiles":
        coverage = f"whole-scan tiles within {inf.memory_budget_mb} MB"
    else:
        coverage = (
            f"windows {'x'.join(str(n) for n in inf.window_size)} "
            f"overlap {inf.overlap} batch {inf.window_batch_size}"
        )
    unit = "tile(s)" if inf.mode == "tiles" else "windows"
    note(
        f"predicting {len(jobs)} scan(s): {coverage}, precision {inf.precision}, threshold "
        f"{inf.score_threshold:.4g}, max marks {inf.max_marks}"
    )
    start = time.perf_counter()
    rows, failed = run_jobs(jobs, predictor, note, unit=unit)
    try:
        write_predictions(opts.out, rows)
    except (DataError, OSError, tf.errors.OpError) as err:
        cli_exit.print_error("error", f"{opts.out}: cannot write the predictions: {err}")
        return cli_exit.ITEMS_FAILED
    note(
        f"wrote {len(rows)} findings of {len(jobs) - len(failed)} scan(s) to {opts.out} in "
        f"{time.perf_counter() - start:.1f} s; {len(failed)} failed"
        + (f": {', '.join(label for label, _ in failed)}" if failed else "")
    )
    return cli_exit.ITEMS_FAILED if failed else cli_exit.OK


def run() -> None:
    """``agg3d-predict`` / ``python -m tf_agg3d.predict``."""
    cli_exit.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
