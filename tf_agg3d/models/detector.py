"""Agg3DDetector: the 3D Aggregated Faster R-CNN, composed of injected parts.

Data flow of :meth:`Agg3DDetector.call` (``volume`` float32 HU ``[B, D, H, W, 1]``, sides
divisible by the coarsest stride and static)::

  HUNormalization -> backbone -> {s: [B, D/s, H/s, W/s, C]}, every pyramid level  features()
  one RPN head per anchor level -> logits {s: [B,d,h,w,A]}, deltas {s: [...,A,4]}  rpn()
  decode with the anchors, top-k, 3D NMS, pad to P           -> proposals        propose()
  Diameter Alignment -> (Local Magnification) -> 3D RoI Align per pyramid level,
  concatenation over all levels -> FPR head                   -> [B, P]          classify()
  final score = mean(RPN probability, FPRN probability)

The anchor levels (:attr:`Agg3DDetector.strides`, ``anchor_config.strides``) are any subset of
the backbone's pyramid levels (:attr:`Agg3DDetector.pyramid_strides`): all three in the paper's
"Multi-Scale" setting, only stride 4 in our reading of Table II's single-scale rows (all six
anchor1 sizes on the stride-4 map). The FPRN aggregates every pyramid level either way.

The level of a proposal is the index (into :attr:`strides`) of the anchor level that produced
it; its Diameter Alignment reference stride is that level's stride. The backbone, the RPN heads
(a dict ``{stride: layer}`` or a factory ``callable(stride, num_anchors) -> layer``), the FPR
head and the Local Magnification layer are constructor arguments, so each can be replaced by
any layer of the same contract; see :mod:`tf_agg3d.heads.rpn_head` and
:mod:`tf_agg3d.heads.fpr_head`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf

from tf_agg3d.config import AnchorConfig, ConfigError, FPRConfig, ProposalConfig, from_dict
from tf_agg3d.layers.diameter_alignment import DiameterAlignment, voxel_to_feature
from tf_agg3d.layers.hu_normalization import HUNormalization
from tf_agg3d.layers.local_magnification import (
    LocalMagnification,
    deconv_stride_of,
    gather_patches,
    magnified_boxes,
)
from tf_agg3d.layers.tracking import track_sublayers
from tf_agg3d.ops import roi_align_op
from tf_agg3d.ops.anchors import multilevel_anchors
from tf_agg3d.ops.box_coding import decode_boxes
from tf_agg3d.ops.nms import nms_3d_padded
from tf_agg3d.ops.roi_align import roi_align_3d


def default_roi_align_fn(use_custom_op: bool = True) -> Callable:
    """The compiled 3D RoI Align when wanted and loadable, else the pure-TF reference."""
    if use_custom_op and roi_align_op.custom_op_available():
        return roi_align_op.roi_align_3d_fast
    return roi_align_3d


@tf.function(reduce_retracing=True)
def _batched_nms(boxes, scores, iou_threshold, max_output_size, score_threshold):
    """Padded 3D NMS per sample; a tf.function so eager callers do not run the loop op by op."""

    def one(args):
        return nms_3d_padded(args[0], args[1], iou_threshold, max_output_size, score_threshold)

    return tf.map_fn(
        one,
        (boxes, scores),
        fn_output_signature=(
            tf.TensorSpec([max_output_size], tf.int32),
            tf.TensorSpec([], tf.int32),
        ),
    )


def _as_config(value, cls):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return from_dict(cls, value)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


@keras.saving.register_keras_serializable(package="tf_agg3d")
class Agg3DDetector(keras.Model):
    """3D Aggregated Faster R-CNN.

    Args:
      backbone: layer mapping ``[B, D, H, W, 1]`` normalised intensities to
        ``{stride: [B, D/s, H/s, W/s, C]}`` with every stride of `pyramid_strides`.
      rpn_heads: ``{stride: layer}`` (one per anchor stride), a list in anchor-stride order, or
        a factory ``callable(stride, num_anchors) -> layer`` called once per anchor stride.
        Each head maps ``[B, d, h, w, C]`` to ``(logits [B, d, h, w, A], deltas [..., A, 4])``.
      fpr_head: layer ``[R, F] -> [R]`` logits, or None for an RPN-only model.
      anchor_config: :class:`AnchorConfig` (or its dict): anchor strides (a subset of the
        pyramid strides) and anchor sizes, one list per anchor stride.
      proposal_config: :class:`ProposalConfig` (or dict): decoding, top-k, NMS, P.
      fpr_config: :class:`FPRConfig` (or dict): FPR branch switches and crop settings.
      local_magnification: layer ``[R, P, P, P, C] -> [R, Q, Q, Q, C]`` with a ``scale``
        attribute k and optionally ``offset`` (default 0) and ``output_cells(P)`` (default
        ``k * P``): patch coordinate ``v`` maps to output coordinate ``k * v + offset``. None
        builds :class:`LocalMagnification` from `fpr_config` when Local Magnification is on.
        P is ``fpr_config.magnify_crop_cells`` (table1) or ``magnify_patch_cells`` (patch).
      hu_window: (min, max) HU mapped to [0, 1] by the first layer.
      pyramid_strides: the backbone levels the FPRN aggregates; default the backbone's
        ``strides`` attribute, else the anchor strides.

    Attributes:
      strides: the anchor (RPN) strides; proposal levels index them.
      pyramid_strides: every backbone level, finest first; the FPRN aggregates all of them.
      roi_align_fn: the 3D RoI Align used by :meth:`classify`, with the signature of
        :func:`tf_agg3d.ops.roi_align.roi_align_3d`. Defaults to the custom op when
        ``fpr_config.use_custom_op`` and it is built; assign the pure-TF function before
        exporting a SavedModel for stock TF-Serving.
    """

    def __init__(
        self,
        backbone,
        rpn_heads,
        fpr_head=None,
        anchor_config=None,
        proposal_config=None,
        fpr_config=None,
        local_magnification=None,
        hu_window=(-1200.0, 600.0),
        pyramid_strides=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.anchor_config = _as_config(anchor_config, AnchorConfig)
        self.proposal_config = _as_config(proposal_config, ProposalConfig)
        self.fpr_config = _as_config(fpr_config, FPRConfig)
        self.strides = tuple(int(s) for s in self.anchor_config.strides)
        self.pyramid_strides = self._resolve_pyramid(backbone, pyramid_strides)
        # Level index (into self.strides) -> index into self.pyramid_strides.
        self._level_to_pyramid = tuple(self.pyramid_strides.index(s) for s in self.strides)
        self.hu_window = tuple(float(v) for v in hu_window)
        self.normalizer = HUNormalization(*self.hu_window, name="hu_normalization")
        self.backbone = backbone
        self.rpn_heads = track_sublayers(self, "rpn_head", self._resolve_heads(rpn_heads))
        self.fpr_head = fpr_head if self.fpr_config.enabled else None
        if self.fpr_head is not None and self.fpr_config.local_magnification:
            self.magnifier = local_magnification or LocalMagnification(
                num_stages=self.fpr_config.magnify_stages,
                layers_per_stage=self.fpr_config.magnify_layers_per_stage,
                deconv_stride=deconv_stride_of(self.fpr_config.magnify_mode),
                name="local_magnification",
            )
        else:
            self.magnifier = None
        self.aligner = DiameterAlignment(
            self.pyramid_strides,
            self.fpr_config.diameter_alignment,
            self.fpr_config.crop_margin_cells,
            name="diameter_alignment",
        )
        self._roi_align_fn = None

    # ----------------------------------------------------------------------------------------
    # Construction helpers
    # ----------------------------------------------------------------------------------------

    def _resolve_pyramid(self, backbone, pyramid_strides) -> tuple[int, ...]:
        backbone_strides = getattr(backbone, "strides", None)
        if backbone_strides is not None:
            backbone_strides = tuple(int(s) for s in backbone_strides)
        if pyramid_strides is None:
            pyramid = backbone_strides if backbone_strides is not None else self.strides
        else:
            pyramid = tuple(int(s) for s in pyramid_strides)
            if backbone_strides is not None and not set(pyramid) <= set(backbone_strides):
                raise ConfigError(
                    f"pyramid strides {list(pyramid)} are not all backbone strides "
                    f"{list(backbone_strides)}"
                )
        extra = [s for s in self.strides if s not in pyramid]
        if extra:
            raise ConfigError(
                f"model.anchors.strides {list(self.strides)} must be a subset of the backbone's "
                f"pyramid strides {list(pyramid)}; {extra} not among them"
            )
        return pyramid

    def _resolve_heads(self, rpn_heads) -> list:
        if isinstance(rpn_heads, dict):
            keyed = {int(k): v for k, v in rpn_heads.items()}
            if sorted(keyed) != sorted(self.strides):
                raise ValueError(f"rpn_heads keys {sorted(keyed)} != strides {self.strides}")
            return [keyed[s] for s in self.strides]
        if isinstance(rpn_heads, (list, tuple)):
            if len(rpn_heads) != len(self.strides):
                raise ValueError(f"{len(rpn_heads)} rpn heads for {len(self.strides)} strides")
            return list(rpn_heads)
        if callable(rpn_heads):
            return [
                rpn_heads(s, len(sizes))
                for s, sizes in zip(self.strides, self.anchor_config.sizes, strict=False)
            ]
        raise TypeError("rpn_heads must be a dict {stride: layer}, a list or a factory")

    @property
    def magnify_input_cells(self) -> int:
        """P, the side of the fixed crop each level gives Local Magnification (mode's field)."""
        cfg = self.fpr_config
        return cfg.magnify_crop_cells if cfg.magnify_mode == "table1" else cfg.magnify_patch_cells

    @property
    def rpn_heads_by_stride(self) -> dict:
        """``{stride: head}``."""
        return dict(zip(self.strides, self.rpn_heads, strict=False))

    @property
    def fpr_enabled(self) -> bool:
        """Whether the FPR branch runs (enabled in the config and a head is present)."""
        return self.fpr_head is not None

    @property
    def roi_align_fn(self) -> Callable:
        if self._roi_align_fn is None:
            self._roi_align_fn = default_roi_align_fn(self.fpr_config.use_custom_op)
        return self._roi_align_fn

    @roi_align_fn.setter
    def roi_align_fn(self, fn: Callable) -> None:
        self._roi_align_fn = fn

    # ----------------------------------------------------------------------------------------
    # Stages
    # ----------------------------------------------------------------------------------------

    def features(self, volume, training=None) -> dict:
        """Pyramid features of a HU volume.

        Args:
          volume: float32 HU [B, D, H, W, 1]; D, H, W divisible by the coarsest stride.
          training: BatchNormalization mode.

        Returns:
          ``{stride: [B, D/s, H/s, W/s, C]}`` for every stride of :attr:`pyramid_strides` (the
          anchor strides are among them).
        """
        feats = self.backbone(self.normalizer(volume), training=training)
        return {s: feats[s] for s in self.pyramid_strides}

    def rpn(self, features, training=None) -> tuple[dict, dict]:
        """Per-level RPN outputs, on the anchor levels only.

        Args:
          features: ``{stride: [B, d, h, w, C]}`` (at least the anchor strides).
          training: head training mode.

        Returns:
          (logits ``{s: [B, d, h, w, A]}``, deltas ``{s: [B, d, h, w, A, 4]}``).
        """
        logits, deltas = {}, {}
        for stride, head in zip(self.strides, self.rpn_heads, strict=False):
            logits[stride], deltas[stride] = head(features[stride], training=training)
        return logits, deltas

    def propose(
        self, logits, deltas, input_shape, score_threshold=None, max_proposals=None
    ) -> dict:
        """Proposals of every sample: decode, threshold, top-k, 3D NMS, pad. No gradients.

        Args:
          logits: ``{s: [B, d, h, w, A]}``.
          deltas: ``{s: [B, d, h, w, A, 4]}``.
          input_shape: static (D, H, W) of the network input (anchor positions).
          score_threshold: RPN probability a proposal must exceed; default
            ``proposal_config.score_threshold`` (0.269 = sigmoid(-1)).
          max_proposals: static P; default ``proposal_config.max_proposals``.

        Returns:
          dict: ``boxes`` float32 [B, P, 4] (z, y, x, d) in input voxels, centres clipped into
          the input; ``levels`` int32 [B, P] (index into :attr:`strides`); ``rpn_scores``
          float32 [B, P] probabilities; ``valid`` bool [B, P]. Real proposals come first in
          decreasing score; padding rows are zero.
        """
        cfg = self.proposal_config
        threshold = cfg.score_threshold if score_threshold is None else float(score_threshold)
        num_out = int(cfg.max_proposals if max_proposals is None else max_proposals)
        input_shape = tuple(int(n) for n in input_shape)
        anchors = multilevel_anchors(input_shape, self.strides, self.anchor_config.sizes)
        all_logits, all_boxes, all_levels = [], [], []
        for index, stride in enumerate(self.strides):
            lg = tf.stop_gradient(tf.cast(logits[stride], tf.float32))
            batch = tf.shape(lg)[0]
            an = tf.reshape(anchors[stride], [1, -1, 4])
            dl = tf.reshape(tf.stop_gradient(tf.cast(deltas[stride], tf.float32)), [batch, -1, 4])
            all_logits.append(tf.reshape(lg, [batch, -1]))
            all_boxes.append(decode_boxes(dl, an))
            all_levels.append(tf.fill([an.shape[1]], index))
        scores = tf.sigmoid(tf.concat(all_logits, axis=1))
        boxes = self._clip_boxes(tf.concat(all_boxes, axis=1), input_shape)
        levels = tf.concat(all_levels, axis=0)
        k = min(int(cfg.pre_nms_top_k), int(levels.shape[0]))
        top_scores, top_index = tf.math.top_k(scores, k=k)
        top_boxes = tf.gather(boxes, top_index, batch_dims=1)
        top_levels = tf.gather(levels, top_index)
        keep, count = _batched_nms(top_boxes, top_scores, cfg.nms_iou, num_out, threshold)
        valid = tf.range(num_out)[None, :] < count[:, None]
        out_boxes = tf.gather(top_boxes, keep, batch_dims=1)
        return {
            "boxes": tf.where(valid[..., None], out_boxes, tf.zeros_like(out_boxes)),
            "levels": tf.where(valid, tf.gather(top_levels, keep, batch_dims=1), 0),
            "rpn_scores": tf.where(valid, tf.gather(top_scores, keep, batch_dims=1), 0.0),
            "valid": valid,
        }

    @staticmethod
    def _clip_boxes(boxes, input_shape):
        upper = tf.constant([n - 1 for n in input_shape], tf.float32)
        centre = tf.clip_by_value(boxes[..., :3], 0.0, upper)
        diameter = tf.clip_by_value(boxes[..., 3:], 1.0, float(max(input_shape)))
        return tf.concat([centre, diameter], axis=-1)

    def classify(self, features, boxes, levels, valid=None, training=None):
        """FPRN logits of proposals: Diameter Alignment, Local Magnification, RoI Align, head.

        Args:
          features: ``{stride: [B, d, h, w, C]}`` for every pyramid stride.
          boxes: [B, P, 4] (z, y, x, d) input voxels.
          levels: int [B, P] anchor-level index (into :attr:`strides`) of each proposal.
          valid: bool [B, P]; padding rows get logit 0 (their scores are zeroed by `call`).
          training: mode of the magnifier and head.

        Returns:
          [B, P] float32 logits.
        """
        if self.fpr_head is None:
            raise ValueError("the FPR branch is disabled (no fpr_head / fpr.enabled false)")
        cfg = self.fpr_config
        boxes = tf.cast(boxes, tf.float32)
        batch, num = tf.shape(boxes)[0], tf.shape(boxes)[1]
        flat_boxes = tf.reshape(boxes, [-1, 4])
        flat_levels = tf.reshape(tf.cast(levels, tf.int32), [-1])
        rois = tf.shape(flat_boxes)[0]
        batch_index = tf.repeat(tf.range(batch), num)
        # Diameter Alignment takes the proposal's reference stride by pyramid index.
        ref_index = tf.gather(tf.constant(self._level_to_pyramid, tf.int32), flat_levels)
        crops = self.aligner(flat_boxes, ref_index)
        size, ratio = cfg.roi_output_size, cfg.roi_sampling_ratio
        pyramid = self.pyramid_strides
        if self.magnifier is not None:
            patch = self.magnify_input_cells
            scale = float(self.magnifier.scale)
            offset = float(getattr(self.magnifier, "offset", 0.0))
            out_cells = getattr(self.magnifier, "output_cells", None)
            out_cells = int(out_cells(patch)) if callable(out_cells) else None
            patches, roi_boxes = [], []
            for stride in pyramid:
                centre = voxel_to_feature(flat_boxes[:, :3], float(stride))
                p, origin = gather_patches(features[stride], centre, batch_index, patch)
                patches.append(p)
                roi_boxes.append(
                    magnified_boxes(crops[stride], origin, patch, scale, offset, out_cells)
                )
            # One batched call: the same weights magnify every level's crops.
            magnified = self.magnifier(tf.concat(patches, axis=0), training=training)
            pooled = self.roi_align_fn(
                magnified,
                tf.concat(roi_boxes, axis=0),
                tf.range(len(pyramid) * rois),
                output_size=size,
                sampling_ratio=ratio,
            )
            per_level = tf.split(pooled, len(pyramid), axis=0)
        else:
            per_level = [
                self.roi_align_fn(
                    features[s], crops[s], batch_index, output_size=size, sampling_ratio=ratio
                )
                for s in pyramid
            ]
        flat = [tf.reshape(x, [-1, size**3 * int(x.shape[-1])]) for x in per_level]
        logits = tf.reshape(self.fpr_head(tf.concat(flat, axis=-1), training=training), [-1])
        logits = tf.reshape(tf.cast(logits, tf.float32), [batch, num])
        if valid is not None:
            logits = tf.where(tf.cast(valid, tf.bool), logits, tf.zeros_like(logits))
        return logits

    def call(self, volume, training=False):
        """Runs the whole detector.

        Args:
          volume: float32 HU [B, D, H, W, 1] with static D, H, W.
          training: mode of BatchNormalization / dropout.

        Returns:
          dict: ``rpn_logits``, ``rpn_deltas`` (dicts by stride); the proposals ``boxes``
          [B, P, 4], ``levels`` [B, P], ``valid`` [B, P], ``rpn_scores`` [B, P]; with the FPR
          branch ``fpr_logits`` and ``fpr_scores`` [B, P]; ``scores`` [B, P], the mean of the
          RPN and FPRN probabilities (the RPN probability without the FPR branch), 0 on
          padding rows.
        """
        feats = self.features(volume, training=training)
        logits, deltas = self.rpn(feats, training=training)
        outputs = {"rpn_logits": logits, "rpn_deltas": deltas}
        proposals = self.propose(logits, deltas, volume.shape[1:4])
        outputs.update(proposals)
        if self.fpr_head is None:
            outputs["scores"] = proposals["rpn_scores"]
            return outputs
        fpr_logits = self.classify(
            feats, proposals["boxes"], proposals["levels"], proposals["valid"], training=training
        )
        valid = proposals["valid"]
        fpr_scores = tf.where(valid, tf.sigmoid(fpr_logits), 0.0)
        outputs["fpr_logits"] = fpr_logits
        outputs["fpr_scores"] = fpr_scores
        outputs["scores"] = tf.where(valid, 0.5 * (proposals["rpn_scores"] + fpr_scores), 0.0)
        return outputs

    # ----------------------------------------------------------------------------------------
    # Serialization
    # ----------------------------------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        serialize = keras.saving.serialize_keras_object
        config.update(
            backbone=serialize(self.backbone),
            rpn_heads=[serialize(h) for h in self.rpn_heads],
            fpr_head=None if self.fpr_head is None else serialize(self.fpr_head),
            local_magnification=None if self.magnifier is None else serialize(self.magnifier),
            anchor_config=dataclasses.asdict(self.anchor_config),
            proposal_config=dataclasses.asdict(self.proposal_config),
            fpr_config=dataclasses.asdict(self.fpr_config),
            hu_window=list(self.hu_window),
            pyramid_strides=list(self.pyramid_strides),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        deserialize = keras.saving.deserialize_keras_object
        config["backbone"] = deserialize(config["backbone"])
        config["rpn_heads"] = [deserialize(h) for h in config["rpn_heads"]]
        for key in ("fpr_head", "local_magnification"):
            if config.get(key) is not None:
                config[key] = deserialize(config[key])
        fpr = config.get("fpr_config")
        if isinstance(fpr, dict) and "magnify_mode" not in fpr:
            # Saved before the table1 variant existed: Local Magnification was the patch one.
            config["fpr_config"] = {**fpr, "magnify_mode": "patch"}
        return cls(**config)
