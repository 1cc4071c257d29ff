"""Scans as the serving client sends and returns them.

- the request side: :func:`as_int16_volume` (the ``volume`` input's dtype and rank, floats
  rounded and clipped as the scan reader does) and :func:`voxel_affine` (the affine of a volume
  without a known position);
- the reply side: :class:`ScanResult` (one scan's findings or error, from
  :meth:`~tf_agg3d.serving.client.Agg3DClient.detect_many`) and :func:`write_findings_csv`
  (the successful ones as one LUNA16 submission CSV).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from tf_agg3d.inference.predictor import Finding

_INT16 = np.iinfo(np.int16)


def as_int16_volume(volume: Any) -> np.ndarray:
    """A [D, H, W] int16 HU array; floats are rounded and clipped as the scan reader does.

    Raises:
      ValueError: not three-dimensional, or not finite.
    """
    array = np.asarray(volume)
    if array.ndim != 3:
        raise ValueError(f"volume: expected a [D, H, W] array, got shape {list(array.shape)}")
    if array.dtype == np.int16:
        return array
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise ValueError("volume: expected finite HU values, found NaN or inf")
        array = np.rint(array)
    elif array.dtype.kind not in "iub":
        raise ValueError(f"volume: expected numeric HU values, got dtype {array.dtype}")
    return np.clip(array, _INT16.min, _INT16.max).astype(np.int16)


def voxel_affine(spacing_mm: float = 1.0) -> np.ndarray:
    """The affine of a volume without a known position: voxel (z, y, x) -> (x, y, z) * spacing."""
    a = np.zeros((4, 4))
    a[0, 2] = a[1, 1] = a[2, 0] = float(spacing_mm)
    a[3, 3] = 1.0
    return a


@dataclasses.dataclass
class ScanResult:
    """The outcome of one scan of :meth:`~tf_agg3d.serving.client.Agg3DClient.detect_many`.

    Attributes:
      source: the path given (or ``"<array>"``).
      seriesuid: from the file or folder name.
      findings: world-mm findings, best first (empty on error).
      seconds: wall time of reading, preprocessing and the Predict call.
      error: the exception for a failed scan, else None.
    """

    source: str
    seriesuid: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def write_findings_csv(path: str, results: Sequence[ScanResult]) -> int:
    """Writes the LUNA16 CSV (+ diameter_mm, rpn_score, fpr_score) of the successful scans."""
    from tf_agg3d.data.luna16.csv_io import write_predictions

    rows = [f.as_row(r.seriesuid) for r in results if r.ok for f in r.findings]
    return write_predictions(path, rows)
