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
usage or model-loading error or a missing optional package.

Every path (--model-dir, --cache, --luna-root, --scan, --seriesuids, --config, --out) may be local or an
``s3://`` / ``gs://`` URL (README "Object storage"); ``s3://`` needs tensorflow-io.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging

from tf_agg3d.utils.process import exit_after

FLAGS = flags.FLAGS
# The issue spells the flags --model-dir / --max-marks; absl keeps dashes as written.
flags.DEFINE_string("model-dir", None, "Model directory (config.yaml + checkpoints).")
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
flags.DEFINE_string("config", None, "YAML file merged over the model's config.yaml.")
flags.DEFINE_multi_string("set", [], "key=value config override, e.g. inference.overlap=16.")


def build_config(model_dir: str, config_path: str | None, overrides, threshold, max_marks):
    """The experiment config: model config.yaml <- --config <- --set <- flags.

    Raises:
      ConfigError, FileNotFoundError: an unreadable or invalid file / override.
    """
    from tf_agg3d.config import load_config
    from tf_agg3d.inference.model_loading import load_model_config

    overrides = list(overrides)
    if threshold is not None:
        overrides.append(f"inference.score_threshold={threshold!r}")
    if max_marks is not None:
        overrides.append(f"inference.max_marks={max_marks}")
    return load_config(config_path, overrides, base=load_model_config(model_dir))


def _missing(reason: str):
    def job(predictor):
        del predictor
        raise FileNotFoundError(reason)

    return job


def _luna16_jobs(root, subsets, uids):
    from tf_agg3d.data import luna16

    scans = luna16.find_luna16_scans(root, subsets)
    wanted = uids if uids is not None else list(scans)
    jobs = []
    for uid in wanted:
        if uid not in scans:
            where = f" in subsets {sorted(subsets)}" if subsets is not None else ""
            jobs.append((uid, _missing(f"no subset*/{uid}.mhd under {root}{where}")))
            continue
        path, mask = scans[uid][0], luna16.find_lung_mask(root, uid)
        jobs.append((uid, lambda p, path=path, mask=mask: p.predict_scan(path, mask)))
    return jobs


def _jobs(cache, luna_root, subsets, seriesuids, scans):
    """[(label, callable(predictor) -> (uid, findings))] in prediction order."""
    if scans:
        return [(path, lambda p, path=path: p.predict_scan(path)) for path in scans]
    from tf_agg3d.data import cache as cache_lib
    from tf_agg3d.data.luna16_csv import read_seriesuids

    uids = read_seriesuids(seriesuids) if seriesuids else None
    if luna_root:
        return _luna16_jobs(luna_root, subsets, uids)
    uids = uids if uids is not None else cache_lib.list_uids(cache)
    return [(uid, lambda p, uid=uid: (uid, p.predict_cache_entry(cache, uid))) for uid in uids]


def run(argv) -> int:
    del argv
    import tensorflow as tf

    from tf_agg3d.config import ConfigError
    from tf_agg3d.data.errors import DataError
    from tf_agg3d.data.luna16_csv import write_predictions
    from tf_agg3d.inference.model_loading import CheckpointNotFoundError
    from tf_agg3d.inference.predictor import Predictor
    from tf_agg3d.utils.io import ensure_filesystems

    if not FLAGS["model-dir"].value or not FLAGS.out:
        raise app.UsageError("--model-dir and --out are required")
    luna_root = FLAGS["luna-root"].value
    if sum(bool(v) for v in (FLAGS.cache, luna_root, FLAGS.scan)) != 1:
        raise app.UsageError("give exactly one of --cache, --luna-root or --scan")
    if FLAGS.seriesuids and not (FLAGS.cache or luna_root):
        raise app.UsageError("--seriesuids needs --cache or --luna-root")
    if FLAGS.subsets and not luna_root:
        raise app.UsageError("--subsets needs --luna-root")
    try:
        subsets = [int(k) for k in FLAGS.subsets] if FLAGS.subsets else None
    except ValueError:
        raise app.UsageError(f"--subsets must be integers 0..9, got {FLAGS.subsets}") from None
    try:
        # Before the model load: a missing tensorflow-io is reported at once, not after it.
        ensure_filesystems(
            FLAGS["model-dir"].value,
            FLAGS.cache,
            luna_root,
            FLAGS.out,
            FLAGS.seriesuids,
            FLAGS.config,
            *(FLAGS.scan or []),
        )
    except ImportError as err:  # MissingExtraError: s3:// without tensorflow-io
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        config = build_config(
            FLAGS["model-dir"].value,
            FLAGS.config,
            FLAGS.set,
            FLAGS.threshold,
            FLAGS["max-marks"].value,
        )
        predictor = Predictor(FLAGS["model-dir"].value, config=config, checkpoint=FLAGS.checkpoint)
        jobs = _jobs(FLAGS.cache, luna_root, subsets, FLAGS.seriesuids, FLAGS.scan)
    except (ConfigError, CheckpointNotFoundError, FileNotFoundError, DataError, ValueError) as err:
        logging.error("%s", err)
        return 2
    except tf.errors.OpError as err:  # storage errors: permissions, an unreachable endpoint
        logging.error("%s", err.message)
        return 2
    inf = config.inference
    logging.info(
        "predicting %d scan(s): windows %s overlap %d batch %d, threshold %.4g, max marks %d",
        len(jobs),
        "x".join(str(n) for n in inf.window_size),
        inf.overlap,
        inf.window_batch_size,
        inf.score_threshold,
        inf.max_marks,
    )
    rows, failed = [], []
    start = time.perf_counter()
    for n, (label, job) in enumerate(jobs, start=1):
        try:
            uid, findings = job(predictor)
        except Exception as err:  # noqa: BLE001 - one bad scan must not stop the others
            failed.append(label)
            logging.error("[%d/%d] %s FAILED: %s: %s", n, len(jobs), label, type(err).__name__, err)
            continue
        stats = predictor.last_stats
        logging.info(
            "[%d/%d] %s: %d windows, %.1f s, %d findings",
            n,
            len(jobs),
            uid,
            stats.num_windows,
            stats.seconds,
            len(findings),
        )
        rows.extend(f.as_row(uid) for f in findings)
    try:
        write_predictions(FLAGS.out, rows)
    except (DataError, OSError, tf.errors.OpError) as err:
        logging.error("%s: cannot write the predictions: %s", FLAGS.out, err)
        return 1
    logging.info(
        "wrote %d findings of %d scan(s) to %s in %.1f s; %d failed%s",
        len(rows),
        len(jobs) - len(failed),
        FLAGS.out,
        time.perf_counter() - start,
        len(failed),
        f": {', '.join(failed)}" if failed else "",
    )
    return 1 if failed else 0


def main(argv):
    # After S3 use the interpreter can abort at shutdown (utils/process.py); the status run
    # returned must still be the process's.
    exit_after(run(argv))


if __name__ == "__main__":
    app.run(main)
