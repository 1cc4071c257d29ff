"""Whole-scan detection in one TensorFlow graph: backbone, proposals, FPRN rescoring, NMS.

:class:`WholeScanDetector` wraps a trained detector for a whole preprocessed scan. Its
:meth:`~WholeScanDetector.detect` takes the scan's HU volume and returns its findings; everything
runs in-graph with stock TensorFlow ops (``tf.while_loop`` over tiles or window batches,
``TensorArray`` s, :func:`~tf_agg3d.ops.nms.nms_3d_padded`), so the same code serves training's
whole-scan checks (:mod:`tf_agg3d.training.abs`), in-process prediction and the exported
SavedModel. Two paths, chosen by ``inference.mode``:

**tiles** (default; needs a ``DenseUNet3D`` backbone, any other runs ``windows``):

1. The volume is padded at its end to a multiple of the coarsest stride (16) with the fill
   value; that padded volume is what "one whole-volume pass" means.
2. The backbone runs once over it (:mod:`tf_agg3d.models.tiled_backbone`): its
   full-resolution stem in tiles with an exact 8-voxel halo, as few as the memory budget
   (``inference.memory_budget_mb``) allows, skipping cells whose receptive field is all fill
   (``inference.skip_fill``; exact: they get the all-fill response); the rest of the network
   on the assembled stride-4 map in one pass. The features equal a single whole-volume pass.
3. The RPN heads run on the whole pyramid maps; anchors above ``inference.score_threshold``
   are decoded, the best ``inference.tiles_pre_nms_top_k`` go through 3D NMS (IoU
   ``model.proposals.nms_iou``, as a window's proposals do) keeping at most
   ``max_proposals_per_scan`` (:mod:`tf_agg3d.models.scan_proposals`).
4. The FPRN rescores them on the whole-scan maps; the final score is the mean of the RPN and
   FPRN probabilities; 3D NMS (IoU ``nms_iou``) on it keeps at most ``max_marks``.

**windows** (the paper's sliding-window test; the loop over windows is
:mod:`tf_agg3d.models.windowed_scan`):

1. The volume is padded to at least one window per axis and covered by overlapping windows
   (:mod:`tf_agg3d.ops.sliding_window`), processed `window_batch_size` at a time.
2. Each window batch goes through the backbone, the RPN and the detector's proposal decoding
   (decode per level, threshold, per-window NMS, top-k).
3. Only proposals whose centre lies in the window's **core** are kept: the cores partition the
   scan, so every location is proposed by exactly one window, the one where it is farthest
   from a window border (least truncated context, no double counting).
4. Those core proposals are rescored by the FPRN **on the same window's features**, right away
   (only they: the FPRN runs on the valid slots, not on the whole padded proposal quota).
5. The window's features are then dropped; only the kept proposals (a few per window) are
   carried to the next iteration in a ``TensorArray``.
6. After the last window: proposals with an RPN probability at or below the threshold are
   dropped, the final score is the mean of the RPN and FPRN probabilities, the best
   `max_proposals_per_scan` go through 3D NMS (IoU `nms_iou`) on the final score and at most
   `max_marks` remain, sorted by decreasing score.
7. With ``skip_fill``, a batch whose windows are all fill is not run: its outputs are those of
   one all-fill window, computed once per scan when needed (identical input, identical
   output: exact).

Why the windows path runs the FPRN per window, before the cross-window NMS (and not after it,
as the paper's "merge, NMS, then rescore" reading would suggest): rescoring after the merge
would need every window's pyramid features at once or a second backbone pass per surviving
proposal. The tiles path has the whole scan's pyramid maps at once (47 MiB for a 224 x 304 x 304
scan), so it merges first and rescores after.

**How the two paths differ.** The tiles path equals one backbone pass over the whole scan
(tests: features within 1e-5). A window instead sees zero padding (HU -1200 after
normalisation) at its own borders inside the scan, and the network's receptive field reaches
94 voxels past a stride-4 cell (:func:`~tf_agg3d.models.receptive_field.receptive_field`),
more than the 16 voxels between a core boundary and its window's border at the default overlap
of 32; window features therefore differ from whole-scan ones near window borders, and so can
scores and, for proposals that straddle two window cores, which of two overlapping proposals
survives the first NMS (per window there, per scan here). ``tests/models/
test_tiled_whole_scan.py`` measures the difference on a trained model.

**Precision** (``inference.precision``, :mod:`tf_agg3d.models.precision`): the backbone runs in
bfloat16 or float32; the RPN and FPRN heads always run in float32. The float32 windows path is
the Keras model itself; the others run :class:`~tf_agg3d.models.inference_backbone.
InferenceBackbone` (the same network in plain ops).

With the FPRN disabled (`use_fpr=False`, or a detector built without it), ``scores`` are the
RPN probabilities and ``fpr_scores`` repeat them, so callers and the SavedModel keep one output
layout.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tf_agg3d.config import InferenceConfig
from tf_agg3d.models.inference_backbone import InferenceBackbone, supports
from tf_agg3d.models.precision import resolve_precision
from tf_agg3d.models.scan_proposals import scan_proposals
from tf_agg3d.models.tiled_backbone import plan_tiles, tiled_stem
from tf_agg3d.models.windowed_scan import window_candidates
from tf_agg3d.ops import sliding_window as sw
from tf_agg3d.ops.nms import nms_3d_padded

# Inputs accepted by :meth:`WholeScanDetector.detect` (concrete functions for export).
VOLUME_SPECS = (
    tf.TensorSpec([None, None, None], tf.int16, name="volume"),
    tf.TensorSpec([None, None, None], tf.float32, name="volume"),
)


def detector_has_fpr(detector) -> bool:
    """Whether `detector` runs an FPRN branch (``fpr_enabled``, else it has an ``fpr_head``)."""
    enabled = getattr(detector, "fpr_enabled", None)
    if enabled is not None:
        return bool(enabled)
    return getattr(detector, "fpr_head", None) is not None


class WholeScanDetector(tf.Module):
    """Whole-scan detection (tiles or sliding windows), exportable as a SavedModel.

    Args:
      detector: an ``Agg3DDetector`` (or any object with its ``features``, ``rpn``, ``propose``
        and ``classify`` methods), already built.
      inference_config: path, precision, memory budget, windows, threshold, NMS and output
        limits.
      fill_hu: the cache's fill value: pads volumes (to a window, or to a multiple of 16), and
        marks the regions ``skip_fill`` skips.
      use_fpr: rescore with the FPRN; None: when the detector has an enabled FPRN.
      name: module name.

    Attributes:
      mode: the path that runs, ``"tiles"`` or ``"windows"`` (``windows`` when tiles were asked
        for but the backbone is not a ``DenseUNet3D``).
      precision: ``"float32"`` or ``"bfloat16"``, the resolved ``inference.precision`` (float32
        for a backbone :mod:`~tf_agg3d.models.inference_backbone` cannot run).

    Raises:
      ValueError: an invalid window size / overlap / batch size.
    """

    def __init__(
        self,
        detector,
        inference_config: InferenceConfig,
        fill_hu: float = 0,
        use_fpr: bool | None = None,
        name: str | None = None,
    ):
        super().__init__(name=name)
        cfg = inference_config
        self.inference_config = cfg
        self.detector = detector
        self.window_size = sw.validate_windows(cfg.window_size, cfg.overlap)
        self.overlap = int(cfg.overlap)
        if cfg.window_batch_size < 1:
            raise ValueError(f"window_batch_size must be >= 1, got {cfg.window_batch_size}")
        if cfg.max_marks < 1 or cfg.max_proposals_per_scan < 1:
            raise ValueError("max_marks and max_proposals_per_scan must be >= 1")
        self.window_batch_size = int(cfg.window_batch_size)
        self.score_threshold = float(cfg.score_threshold)
        self.nms_iou = float(cfg.nms_iou)
        self.max_marks = int(cfg.max_marks)
        self.max_candidates = int(cfg.max_proposals_per_scan)
        self.fill_hu = float(fill_hu)
        self.use_fpr = detector_has_fpr(detector) if use_fpr is None else bool(use_fpr)
        self.skip_fill = bool(cfg.skip_fill)
        self.memory_budget_mb = int(cfg.memory_budget_mb)
        self.tiles_pre_nms_top_k = int(cfg.tiles_pre_nms_top_k)
        tileable = supports(detector)
        # A plain object (not tracked): it holds no variables, it reads the detector's.
        self._net = (
            InferenceBackbone(detector.backbone, detector.normalizer, detector.pyramid_strides)
            if tileable
            else None
        )
        self.mode = "tiles" if cfg.mode == "tiles" and tileable else "windows"
        self.precision = resolve_precision(cfg.precision) if tileable else "float32"

    @property
    def compute_dtype(self) -> tf.DType:
        return tf.bfloat16 if self.precision == "bfloat16" else tf.float32

    def for_export(self) -> WholeScanDetector:
        """The module an exported SavedModel runs: the same path, ``auto`` precision as float32.

        A SavedModel is served on CPUs this process cannot see: a bfloat16 graph on a CPU
        without native bfloat16 runs its convolutions emulated, slower than float32. Only an
        explicit ``inference.precision: bfloat16`` exports bfloat16.
        """
        cfg = self.inference_config
        if cfg.precision != "auto" or self.precision == "float32":
            return self
        return WholeScanDetector(
            self.detector,
            dataclasses.replace(cfg, precision="float32"),
            fill_hu=self.fill_hu,
            use_fpr=self.use_fpr,
            name=self.name,
        )

    def describe(self) -> dict:
        """The resolved settings (for logs and benchmarks)."""
        out = {"mode": self.mode, "precision": self.precision, "skip_fill": self.skip_fill}
        if self.mode == "tiles":
            out.update(
                memory_budget_mb=self.memory_budget_mb,
                stem_halo=self._net.stem_halo,
                max_region_voxels=self.max_region_voxels,
            )
        else:
            out.update(window_size=list(self.window_size), overlap=self.overlap)
        return out

    @property
    def max_region_voxels(self) -> int:
        """Largest stem tile region (voxels) the memory budget allows."""
        per_voxel = self._net.stem_bytes_per_voxel(self.compute_dtype)
        return max(1, self.memory_budget_mb * 2**20 // per_voxel)

    # ----------------------------------------------------------------------------------------
    # One batch of windows
    # ----------------------------------------------------------------------------------------

    def _features(self, volume: tf.Tensor) -> dict:
        """Pyramid features of float32 HU [B, D, H, W, 1] in the configured precision."""
        if self.precision == "bfloat16":
            return self._net.features(volume, tf.bfloat16)
        return self.detector.features(volume, training=False)

    def _classify_kept(self, features, boxes, levels, valid) -> tf.Tensor:
        """FPRN logits [B, P] of the valid proposals only (0 elsewhere).

        The FPRN's cost (Local Magnification of every proposal on every level) grows with the
        number of boxes it sees, and after the threshold and the core test only a few of the
        P proposal slots of a window are valid. The valid ones are moved to the front, the
        FPRN runs on the first ``max_b(#valid_b)`` slots, and the logits are put back in place.
        """
        num = tf.shape(valid)[1]
        order = tf.argsort(tf.cast(valid, tf.int32), axis=1, direction="DESCENDING", stable=True)
        count = tf.reduce_max(tf.reduce_sum(tf.cast(valid, tf.int32), axis=1))

        def run():
            head = [tf.gather(t, order, batch_dims=1)[:, :count] for t in (boxes, levels, valid)]
            logits = tf.cast(self.detector.classify(features, *head, training=False), tf.float32)
            logits = tf.pad(logits, [[0, 0], [0, num - count]])
            return tf.gather(logits, tf.argsort(order, axis=1), batch_dims=1)

        logits = tf.cond(count > 0, run, lambda: tf.zeros(tf.shape(valid), tf.float32))
        return tf.where(valid, logits, tf.zeros_like(logits))

    def _rescore(self, features, boxes, levels, rpn_scores, valid) -> dict[str, tf.Tensor]:
        """FPRN and final scores of the valid proposals; every score 0 where invalid."""
        if self.use_fpr:
            fpr_scores = tf.sigmoid(self._classify_kept(features, boxes, levels, valid))
            scores = (rpn_scores + fpr_scores) / 2.0
        else:
            fpr_scores = rpn_scores
            scores = rpn_scores
        zeros = tf.zeros_like(scores)
        return {
            "rpn_scores": tf.where(valid, rpn_scores, zeros),
            "fpr_scores": tf.where(valid, fpr_scores, zeros),
            "scores": tf.where(valid, scores, zeros),
        }

    def _forward(self, crops: tf.Tensor, mask_fn=None) -> dict[str, tf.Tensor]:
        """Proposals and scores of a batch of windows.

        Args:
          crops: float32 [B, wd, wh, ww] HU.
          mask_fn: optional ``(boxes [B, P, 4]) -> bool [B, P]``, applied to the proposals
            before the FPRN (the core test), so it only classifies proposals that are kept.

        Returns:
          dict of ``boxes`` float32 [B, P, 4] (z, y, x, d in crop voxels), ``levels`` int32
          [B, P], ``rpn_scores``, ``fpr_scores``, ``scores`` float32 [B, P] (probabilities),
          ``valid`` bool [B, P] (real proposal, RPN probability above the threshold, mask_fn).
        """
        volume = crops[..., None]
        features = self._features(volume)
        logits, deltas = self.detector.rpn(features, training=False)
        # The detector's own decoding (per level, top-k, per-window NMS), gated by the
        # inference threshold rather than the training-time proposal threshold.
        proposals = self.detector.propose(
            logits, deltas, self.window_size, score_threshold=self.score_threshold
        )
        boxes = tf.cast(proposals["boxes"], tf.float32)
        rpn_scores = tf.cast(proposals["rpn_scores"], tf.float32)
        valid = tf.logical_and(proposals["valid"], rpn_scores > self.score_threshold)
        if mask_fn is not None:
            valid = tf.logical_and(valid, mask_fn(boxes))
        levels = tf.cast(proposals["levels"], tf.int32)
        out = self._rescore(features, boxes, levels, rpn_scores, valid)
        out.update(boxes=boxes, levels=levels, valid=valid)
        return out

    @tf.function(reduce_retracing=True)
    def detect_crops(self, crops: tf.Tensor) -> dict[str, tf.Tensor]:
        """Proposals of independent crops (the single-crop / streaming signature).

        Args:
          crops: int16 or float32 HU [B, wd, wh, ww], the configured window size.

        Returns:
          Per crop, padded to the detector's proposal count P: ``boxes`` float32 [B, P, 4]
          (z, y, x, d in crop voxels), ``levels`` int32 [B, P], ``rpn_scores``, ``fpr_scores``,
          ``scores`` float32 [B, P] (0 where invalid) and ``valid`` bool [B, P].
        """
        crops = tf.ensure_shape(tf.cast(crops, tf.float32), [None, *self.window_size])
        return self._forward(crops)

    # ----------------------------------------------------------------------------------------
    # Whole scan
    # ----------------------------------------------------------------------------------------

    @tf.function(reduce_retracing=True)
    def detect(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        """Findings of a whole preprocessed scan.

        Args:
          volume: int16 or float32 HU [D, H, W] at the model's spacing (any size).

        Returns:
          dict of ``boxes`` float32 [N, 4] (z, y, x, d in voxels of `volume`), ``scores`` [N]
          (mean of RPN and FPRN probabilities), ``rpn_scores`` [N], ``fpr_scores`` [N],
          ``num_detections`` int32 scalar (= N <= max_marks), ``num_windows`` int32 scalar
          (backbone calls: windows, or stem tiles, that were computed, not skipped) and
          ``evaluated_voxels`` int64 scalar (input voxels those calls evaluated); rows sorted
          by decreasing score.
        """
        volume = tf.ensure_shape(tf.cast(volume, tf.float32), [None, None, None])
        if self.mode == "tiles":
            return self._detect_tiles(volume)
        return self._detect_windows(volume)

    def _finish(self, boxes, rpn_scores, fpr_scores, scores) -> dict[str, tf.Tensor]:
        """The best `max_candidates` by final score, 3D NMS on it, at most `max_marks`."""
        # Bound the NMS cost (its IoU matrix is quadratic) by the best candidates only.
        k = tf.minimum(tf.shape(scores)[0], self.max_candidates)
        top = tf.math.top_k(scores, k=k, sorted=True).indices
        boxes, rpn_scores, fpr_scores, scores = (
            tf.gather(t, top) for t in (boxes, rpn_scores, fpr_scores, scores)
        )
        kept, count = nms_3d_padded(boxes, scores, self.nms_iou, self.max_marks)
        kept = kept[:count]
        return {
            "boxes": tf.gather(boxes, kept),
            "scores": tf.gather(scores, kept),
            "rpn_scores": tf.gather(rpn_scores, kept),
            "fpr_scores": tf.gather(fpr_scores, kept),
            "num_detections": count,
        }

    # -- windows -------------------------------------------------------------------------------

    def _detect_windows(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        candidates, calls = window_candidates(
            volume,
            self._forward,
            self._proposal_count(),
            window_size=self.window_size,
            overlap=self.overlap,
            batch_size=self.window_batch_size,
            fill_hu=self.fill_hu,
            skip_fill=self.skip_fill,
        )
        out = self._finish(*candidates)
        window_voxels = int(self.window_size[0] * self.window_size[1] * self.window_size[2])
        out["num_windows"] = calls
        out["evaluated_voxels"] = tf.cast(calls, tf.int64) * window_voxels
        return out

    def _proposal_count(self) -> int:
        """P, the proposal slots of a window (the detector's ``max_proposals``)."""
        config = getattr(self.detector, "proposal_config", None)
        if config is not None:
            return int(config.max_proposals)
        return int(self.detector.max_proposals)

    # -- tiles ---------------------------------------------------------------------------------

    def _detect_tiles(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        det, net = self.detector, self._net
        multiple = max(net.strides)
        shape = tf.shape(volume)
        padded_shape = (shape + multiple - 1) // multiple * multiple
        padded = tf.pad(
            volume,
            tf.stack([tf.zeros([3], tf.int32), padded_shape - shape], axis=1),
            constant_values=self.fill_hu,
        )
        plan = plan_tiles(padded_shape, net.stem_halo, self.max_region_voxels)
        stem, stats = tiled_stem(
            net, padded, plan, self.fill_hu, self.compute_dtype, skip_fill=self.skip_fill
        )
        features = net.trunk(stem)
        logits, deltas = det.rpn(features, training=False)
        proposals = scan_proposals(
            det,
            logits,
            deltas,
            padded_shape,
            self.score_threshold,
            self.tiles_pre_nms_top_k,
            self.max_candidates,
        )
        boxes, levels, rpn_scores, valid = (
            proposals[k][None] for k in ("boxes", "levels", "rpn_scores", "valid")
        )
        scored = self._rescore(features, boxes, levels, rpn_scores, valid)
        count = proposals["count"]
        out = self._finish(
            boxes[0, :count],
            scored["rpn_scores"][0, :count],
            scored["fpr_scores"][0, :count],
            scored["scores"][0, :count],
        )
        out["num_windows"] = stats["tiles_computed"]
        out["evaluated_voxels"] = stats["evaluated_voxels"]
        return out
