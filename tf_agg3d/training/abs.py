"""Anchor Based Sampling (Section IV.C) and the whole-scan checks used during training.

ABS is boosting by hard examples: after a training round, the current model runs over every
training scan, and its confident false positives (proposals scoring at least
``train.abs_score_threshold`` whose centre lies in no nodule's sphere and no excluded finding)
are stored; the next round centres ``data.abs_fraction`` of its crops on them
(:class:`tf_agg3d.dataloaders.input_pipeline.CropSampler`). The file lives in the model
directory, written atomically::

  {"format": "tf_agg3d.abs.v1", "checkpoint": ..., "step": ..., "score_threshold": ...,
   "num_scans": ..., "hard_negatives": [{"seriesuid", "z", "y", "x", "d", "score"}, ...]}

(cache voxels / mm, like the sidecar's nodules).

The scans are searched by the same whole-scan graph as ``predict``
(:class:`~tf_agg3d.models.whole_scan.WholeScanDetector`) on the path of ``inference.mode``: one
pass over the scan (``tiles``), or windows of the training crop size (``windows``); each scan
is padded with its own ``fill_hu``. The same search gives the validation summaries
(sensitivity and false positives per scan on a few held-out scans).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tf_agg3d.config import ExperimentConfig
from tf_agg3d.data import cache as cache_lib
from tf_agg3d.dataloaders.input_pipeline import ABS_FORMAT, CachedScan
from tf_agg3d.models.whole_scan import WholeScanDetector
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_json

ABS_FILE = "abs_hard_negatives.json"


class ScanScorer:
    """Whole-scan detections of cache volumes by a (training) detector.

    A thin layer over :class:`~tf_agg3d.models.whole_scan.WholeScanDetector`, the code
    that ``predict`` and the SavedModel run (``inference.mode``: tiles, or windows of the
    training crop size); it adds what training needs: the padding value of each scan (from its
    sidecar) and NumPy results.

    Args:
      model: the detector (``features``, ``rpn``, ``propose``, ``classify``).
      config: the experiment config (``data.crop_size`` is the window of the windows path,
        ``inference`` the rest).
      overlap: voxels shared by neighbouring windows (windows path).
      proposal_threshold: RPN probability a proposal must exceed.
      max_detections: detections kept per scan.
      use_fpr: score = mean(RPN, FPRN probability); else the RPN probability.
    """

    def __init__(
        self,
        model,
        config: ExperimentConfig,
        overlap: int,
        proposal_threshold: float,
        max_detections: int = 100,
        use_fpr: bool = True,
    ):
        self.model = model
        self.use_fpr = bool(use_fpr) and getattr(model, "fpr_head", None) is not None
        self.inference = dataclasses.replace(
            config.inference,
            window_size=tuple(int(n) for n in config.data.crop_size),
            overlap=int(overlap),
            score_threshold=float(proposal_threshold),
            max_marks=int(max_detections),
            max_proposals_per_scan=max(config.inference.max_proposals_per_scan, max_detections),
        )
        # One traced graph per padding value (a cache normally has one).
        self._detectors: dict[float, WholeScanDetector] = {}

    def detect(self, volume: np.ndarray, fill_hu: float) -> tuple[np.ndarray, np.ndarray]:
        """Detections of one scan.

        Args:
          volume: [D, H, W] HU (cache volume).
          fill_hu: padding value.

        Returns:
          (float32 [N, 4] boxes (z, y, x, d) in cache voxels, float32 [N] scores), best first.
        """
        fill = float(fill_hu)
        if fill not in self._detectors:
            self._detectors[fill] = WholeScanDetector(
                self.model, self.inference, fill_hu=fill, use_fpr=self.use_fpr
            )
        out = self._detectors[fill].detect(tf.convert_to_tensor(np.asarray(volume)))
        return out["boxes"].numpy(), out["scores"].numpy()


def inside_any(centres: np.ndarray, spheres: np.ndarray) -> np.ndarray:
    """bool [N]: centre strictly inside some sphere (LUNA16's hit criterion)."""
    centres = np.asarray(centres, np.float64).reshape(-1, 3)
    spheres = np.asarray(spheres, np.float64).reshape(-1, 4)
    if len(spheres) == 0 or len(centres) == 0:
        return np.zeros(len(centres), bool)
    dist = np.linalg.norm(centres[:, None, :] - spheres[None, :, :3], axis=-1)
    return np.any(dist < spheres[None, :, 3] / 2.0, axis=1)


def evaluate_scans(
    scorer: ScanScorer,
    scans: Sequence[CachedScan],
    cache_dir: str,
    thresholds: Sequence[float] = (0.269, 0.5, 0.9),
) -> dict:
    """Sensitivity and false positives per scan at score thresholds (validation summaries).

    A nodule is found when a detection at or above the threshold has its centre inside the
    nodule's sphere; a detection is a false positive when its centre is inside no nodule and
    no excluded finding.

    Returns:
      {"scans", "nodules", "seconds", "at": {str(threshold): {"sensitivity", "fp_per_scan",
      "found", "false_positives"}}}.
    """
    start = time.time()
    found = dict.fromkeys(thresholds, 0)
    fps = dict.fromkeys(thresholds, 0)
    total = 0
    for scan in scans:
        volume = cache_lib.read_volume(cache_dir, scan.uid, mmap=True)
        boxes, scores = scorer.detect(volume, scan.fill_hu)
        total += len(scan.nodules)
        negative = ~inside_any(boxes[:, :3], np.concatenate([scan.nodules, scan.excluded]))
        for t in thresholds:
            sel = boxes[scores >= t]
            fps[t] += int(np.sum(negative[scores >= t]))
            for nodule in scan.nodules:
                if inside_any(sel[:, :3], nodule[None]).any():
                    found[t] += 1
    n = max(len(scans), 1)
    return {
        "scans": len(scans),
        "nodules": total,
        "seconds": round(time.time() - start, 2),
        "at": {
            f"{t:g}": {
                "sensitivity": found[t] / total if total else 0.0,
                "fp_per_scan": fps[t] / n,
                "found": found[t],
                "false_positives": fps[t],
            }
            for t in thresholds
        },
    }


def find_hard_negatives(
    scorer: ScanScorer,
    scans: Sequence[CachedScan],
    cache_dir: str,
    score_threshold: float,
    max_per_scan: int,
    log=print,
) -> list[dict]:
    """Confident false positives of every scan, best first per scan.

    Returns:
      ``[{"seriesuid", "z", "y", "x", "d", "score"}]`` in cache voxels / mm.
    """
    out = []
    for i, scan in enumerate(scans):
        volume = cache_lib.read_volume(cache_dir, scan.uid, mmap=True)
        boxes, scores = scorer.detect(volume, scan.fill_hu)
        hits = inside_any(boxes[:, :3], np.concatenate([scan.nodules, scan.excluded]))
        keep = np.flatnonzero((scores >= score_threshold) & ~hits)[:max_per_scan]
        for j in keep:
            z, y, x, d = (float(v) for v in boxes[j])
            out.append(
                {"seriesuid": scan.uid, "z": z, "y": y, "x": x, "d": d, "score": float(scores[j])}
            )
        log(f"abs: scan {i + 1}/{len(scans)} {scan.uid}: {len(keep)} hard negatives")
    return out


def write_abs_file(path: str, entries: list[dict], checkpoint: str, step: int, config) -> None:
    """Writes the ABS file atomically (see the module docstring for the format)."""
    atomic_write_json(
        path,
        {
            "format": ABS_FORMAT,
            "checkpoint": checkpoint,
            "step": int(step),
            "score_threshold": float(config.train.abs_score_threshold),
            "num_scans": len({e["seriesuid"] for e in entries}),
            "hard_negatives": entries,
        },
    )


def run_abs(
    config: ExperimentConfig, model_dir: str, model, train_scans: Sequence[CachedScan], log=print
) -> dict:
    """The ``abs`` phase: hard negatives of every training scan -> ``MODEL_DIR/abs_...json``.

    Args:
      config: experiment config (data, proposals, train.abs_*).
      model_dir: the model directory (its newest checkpoint is already restored in `model`).
      model: the restored detector.
      train_scans: the scans to mine.
      log: progress printer.

    Returns:
      A summary dict (file, counts, seconds).
    """
    from tf_agg3d.models.checkpoints import checkpoint_step, latest_model_checkpoint

    start = time.time()
    t = config.train
    scorer = ScanScorer(
        model,
        config,
        t.abs_window_overlap,
        # Final score = mean(RPN, FPRN): a hard negative may have an RPN probability below
        # the ABS threshold, but never below the detector's own proposal threshold.
        proposal_threshold=min(t.abs_score_threshold, config.model.proposals.score_threshold),
        max_detections=max(t.abs_max_per_scan * 4, 100),
    )
    entries = find_hard_negatives(
        scorer, train_scans, config.data.cache_dir, t.abs_score_threshold, t.abs_max_per_scan, log
    )
    prefix = latest_model_checkpoint(model_dir) or ""
    path = uio.join(model_dir, ABS_FILE)
    write_abs_file(path, entries, prefix, checkpoint_step(prefix) if prefix else 0, config)
    return {
        "phase": "abs",
        "abs_file": path,
        "checkpoint": prefix,
        "scans": len(train_scans),
        "hard_negatives": len(entries),
        "seconds": round(time.time() - start, 1),
    }
