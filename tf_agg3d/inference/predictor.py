"""Whole scan -> findings in world mm: the in-process predictor behind `tf_agg3d.predict`.

:class:`Predictor` runs :class:`~tf_agg3d.models.whole_scan.WholeScanDetector` on a cache
entry (written by `python -m tf_agg3d.preprocess`) or on any scan SimpleITK reads (preprocessed
on the fly, lungs found by the threshold fallback), and maps each detection back to the world
through the entry's affine (cache voxel ``(z, y, x, 1)`` -> world ``(x, y, z, 1)`` mm, README
"Conventions"). Diameters go through the affine's scale: ``d`` voxels times the voxel size.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import tensorflow as tf

from tf_agg3d.config import ExperimentConfig
from tf_agg3d.models.whole_scan import WholeScanDetector
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.filesystems import is_url

# Extra columns of the submission CSV, after LUNA16's seriesuid,coordX,coordY,coordZ,probability.
EXTRA_COLUMNS = ("diameter_mm", "rpn_score", "fpr_score")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One detection of a scan.

    Attributes:
      x, y, z: world centre in mm (LUNA16's order).
      diameter_mm: cube side / sphere diameter in mm.
      probability: final score (mean of RPN and FPRN probabilities; the RPN's without FPRN).
      rpn_score: RPN probability.
      fpr_score: FPRN probability (equal to `rpn_score` without FPRN).
      voxel_zyx: centre in voxels of the preprocessed volume (z, y, x).
    """

    x: float
    y: float
    z: float
    diameter_mm: float
    probability: float
    rpn_score: float
    fpr_score: float
    voxel_zyx: tuple[float, float, float]

    def as_row(self, seriesuid: str) -> dict:
        """The submission CSV row (LUNA16 columns + diameter_mm, rpn_score, fpr_score)."""
        return {
            "seriesuid": seriesuid,
            "coordX": self.x,
            "coordY": self.y,
            "coordZ": self.z,
            "probability": self.probability,
            "diameter_mm": self.diameter_mm,
            "rpn_score": self.rpn_score,
            "fpr_score": self.fpr_score,
        }


@dataclasses.dataclass(frozen=True)
class RunStats:
    """What the last scan cost: windows run, seconds (detection only), findings returned."""

    num_windows: int
    seconds: float
    num_findings: int


def findings_from_detections(detections: dict, affine) -> list[Finding]:
    """Maps detections in preprocessed-volume voxels to world findings.

    Args:
      detections: numpy dict from :meth:`WholeScanDetector.detect` (``boxes`` [N, 4] z, y, x,
        d; ``scores``, ``rpn_scores``, ``fpr_scores`` [N]).
      affine: 4x4, preprocessed voxel (z, y, x, 1) -> world (x, y, z, 1) mm.

    Returns:
      Findings in the detections' order (decreasing score).
    """
    a = np.asarray(affine, np.float64).reshape(4, 4)
    boxes = np.asarray(detections["boxes"], np.float64).reshape(-1, 4)
    zyx = boxes[:, :3]
    xyz = zyx @ a[:3, :3].T + a[:3, 3]
    # Voxel size in mm along each voxel axis: the norms of the affine's columns. The cache is
    # isotropic, so the mean is the one voxel size; a flipped direction does not change it.
    voxel_mm = float(np.mean(np.linalg.norm(a[:3, :3], axis=0)))
    out = []
    for i in range(boxes.shape[0]):
        out.append(
            Finding(
                x=float(xyz[i, 0]),
                y=float(xyz[i, 1]),
                z=float(xyz[i, 2]),
                diameter_mm=float(boxes[i, 3] * voxel_mm),
                probability=float(detections["scores"][i]),
                rpn_score=float(detections["rpn_scores"][i]),
                fpr_score=float(detections["fpr_scores"][i]),
                voxel_zyx=(float(zyx[i, 0]), float(zyx[i, 1]), float(zyx[i, 2])),
            )
        )
    return out


def scan_uid(path: str) -> str:
    """Seriesuid of a scan file or DICOM folder, local or URL: its name without image extensions."""
    path = str(path)
    # normpath would fold the '//' of 's3://' and trailing slashes differ by backend; URLs take
    # the object name.
    name = uio.basename(path) if is_url(path) else os.path.basename(os.path.normpath(path))
    for ext in (".nii.gz", ".mhd", ".mha", ".nii", ".nrrd", ".nhdr", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


class Predictor:
    """Findings of whole scans from a trained model.

    Give either `model_dir` (config.yaml + checkpoints) or an in-memory `detector` and
    `config`.

    Args:
      model_dir: model directory; see :func:`tf_agg3d.models.loading.load_detector`.
      detector: an already built (and trained) detector, instead of `model_dir`.
      config: experiment config; with `model_dir` it replaces the directory's config.yaml
        (e.g. with inference overrides), with `detector` it is required.
      checkpoint: checkpoint name/number in `model_dir` (None: the latest).
      use_fpr: force FPRN rescoring on/off (None: the detector's configuration).

    Raises:
      ValueError: neither a model_dir nor a detector with its config.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        *,
        detector=None,
        config: ExperimentConfig | None = None,
        checkpoint: str | None = None,
        use_fpr: bool | None = None,
    ):
        if model_dir is not None:
            from tf_agg3d.models.loading import load_detector

            detector, config = load_detector(model_dir, config=config, checkpoint=checkpoint)
        elif detector is None or config is None:
            raise ValueError("Predictor needs a model_dir, or a detector and its config")
        self.config = config
        self.detector = detector
        self.module = WholeScanDetector(
            detector, config.inference, fill_hu=config.preprocess.fill_hu, use_fpr=use_fpr
        )
        self.last_stats: RunStats | None = None

    def detect_volume(self, volume: np.ndarray) -> dict[str, np.ndarray]:
        """Runs the whole-scan graph on a preprocessed HU volume.

        Args:
          volume: int16 (or float32) [D, H, W] HU at the model's spacing.

        Returns:
          numpy dict: ``boxes`` [N, 4] (z, y, x, d voxels), ``scores``, ``rpn_scores``,
          ``fpr_scores`` [N], ``num_windows``; also sets :attr:`last_stats`.
        """
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"expected a [D, H, W] volume, got shape {volume.shape}")
        if volume.dtype != np.int16:
            volume = volume.astype(np.float32)
        start = time.perf_counter()
        out = self.module.detect(tf.convert_to_tensor(volume))
        result = {k: v.numpy() for k, v in out.items()}
        seconds = time.perf_counter() - start
        self.last_stats = RunStats(
            int(result["num_windows"]), seconds, int(result["num_detections"])
        )
        return result

    def predict_volume(self, volume: np.ndarray, affine) -> list[Finding]:
        """Findings of a preprocessed volume whose voxel -> world affine is `affine`."""
        return findings_from_detections(self.detect_volume(volume), affine)

    def predict_cache_entry(self, cache_dir: str, uid: str) -> list[Finding]:
        """Findings of one cache entry (``CACHE/<uid>.npy`` + sidecar), world mm.

        Raises:
          DataError: a missing or corrupt entry, or a sidecar whose shape is not its array's
            (naming the file).
        """
        from tf_agg3d.data import cache

        meta, volume = cache.read_entry(cache_dir, uid)  # also: the sidecar fits the array
        return self.predict_volume(volume, meta["affine"])

    def predict_scan(
        self, path: str, lung_mask_path: str | None = None
    ) -> tuple[str, list[Finding]]:
        """Reads, preprocesses and predicts one scan.

        Args:
          path: an `.mhd`/`.mha`/NIfTI/NRRD file or a DICOM series folder.
          lung_mask_path: its lung mask (a LUNA16 `seg-lungs-LUNA16/<uid>.mhd`), or None for
            the threshold lung segmentation.

        Returns:
          (seriesuid from the file/folder name, findings in world mm).

        Raises:
          DataError: an unreadable scan or mask.
        """
        from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
        from tf_agg3d.data.readers.sitk import read_lung_mask, read_scan

        scan = read_scan(path)
        mask = read_lung_mask(lung_mask_path) if lung_mask_path else None
        volume, meta = preprocess_scan(scan, mask, self.config.preprocess)
        return scan_uid(path), self.predict_volume(volume, meta["affine"])
