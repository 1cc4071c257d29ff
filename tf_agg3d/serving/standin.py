"""A stand-in servable: the whole-scan detector's serving contract over a few stock ops.

Exporting and loading the real detector takes tens of seconds before the first request. The
stand-in exports and loads in seconds and answers every signature as an export of
``WholeScanDetector`` does (the same inputs, outputs and dtypes, and a weight that the export
must save and restore), so the serving path itself (export, publishing, transfer, request
validation, preprocessing, gRPC, the development server's admission) can be exercised and
timed without the detector's cost: the serving tests run their protocol and error-path cases
on it, and ``bench/serving_load.py`` measures the serving path with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from tf_agg3d.config import load_config
from tf_agg3d.serving import contract
from tf_agg3d.serving.publishing import ExportResult, export_saved_model, next_version
from tf_agg3d.serving.signatures import Agg3DExportModule
from tf_agg3d.utils.files import join

# The crop signature's window, and the largest volume an export accepts by default: small, so
# that the size checks of the export, the server and the client are reached with small scans.
STANDIN_WINDOW = (16, 16, 16)
STANDIN_MAX_SHAPE = (96, 96, 96)
STANDIN_TOP_K = 5


class StandInWholeScan(tf.Module):
    """WholeScanDetector's contract with a trivial "model": the brightest 4-voxel blocks.

    ``detect`` average-pools the volume by 4, takes the top-5 cells and reports them as 6 mm
    boxes at the cell centres; scores depend on a variable (``detector.scale``) so that
    exporting must save and restore a weight.

    Args:
      scale: the weight; versions exported with different scales answer differently.
    """

    def __init__(self, scale: float = 1.0):
        super().__init__(name="standin")
        self.detector = tf.Module(name="standin_detector")
        self.detector.scale = tf.Variable(scale, dtype=tf.float32, name="scale")

    @tf.function(reduce_retracing=True)
    def detect(self, volume):
        v = tf.cast(volume, tf.float32)[None, ..., None]
        pooled = tf.nn.avg_pool3d(v, 4, 4, "SAME")[0, ..., 0]
        shape = tf.shape(pooled)
        flat = tf.reshape(pooled, [-1])
        k = tf.minimum(STANDIN_TOP_K, tf.size(flat))
        top = tf.math.top_k(flat, k=k, sorted=True)
        cells = tf.cast(tf.transpose(tf.unravel_index(top.indices, shape)), tf.float32)
        centres = cells * 4.0 + 1.5
        rpn = tf.sigmoid(top.values / 100.0 * self.detector.scale)
        fpr = tf.sigmoid(top.values / 200.0)
        boxes = tf.concat([centres, tf.fill([k, 1], 6.0)], axis=1)
        return {
            "boxes": boxes,
            "scores": (rpn + fpr) / 2.0,
            "rpn_scores": rpn,
            "fpr_scores": fpr,
            "num_detections": k,
            "num_windows": tf.constant(1),
        }

    @tf.function(reduce_retracing=True)
    def detect_crops(self, crops):
        x = tf.cast(crops, tf.float32)
        peak = tf.reduce_max(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1)
        half = [n / 2.0 for n in STANDIN_WINDOW]
        boxes = tf.tile(tf.constant([[[*half, 6.0]]], tf.float32), [tf.shape(x)[0], 2, 1])
        scores = tf.sigmoid(tf.stack([peak, peak - 100.0], axis=1) / 100.0)
        return {"boxes": boxes, "scores": scores, "valid": tf.ones_like(scores, tf.bool)}


def export_standin(
    export_base: str,
    version: int | None = None,
    scale: float = 1.0,
    *,
    max_volume_shape: Sequence[int] = STANDIN_MAX_SHAPE,
    overwrite: bool = False,
    warmup_shape: Sequence[int] | None = None,
) -> ExportResult:
    """Exports a :class:`StandInWholeScan` as ``<export_base>/agg3d/<version>/``.

    Args:
      export_base: the folder above the model's (local or URL).
      version: the version number (default: the next one).
      scale: the stand-in's weight.
      max_volume_shape: the largest (D, H, W) the export accepts.
      overwrite, warmup_shape: as :func:`~tf_agg3d.serving.publishing.export_saved_model`.
    """
    window = ",".join(map(str, STANDIN_WINDOW))
    config = load_config(None, [f"inference.window_size=[{window}]"])
    base = str(export_base)
    version = version or next_version(join(base, contract.MODEL_NAME))
    module = Agg3DExportModule(
        StandInWholeScan(scale), config, version=version, max_volume_shape=max_volume_shape
    )
    return export_saved_model(module, base, overwrite=overwrite, warmup_shape=warmup_shape)
