"""Local Magnification (Section III.D, Table I): enlarge small RoI crops before RoI Align.

Instead of a finer (memory-prohibitive) feature map, each proposal's crop is processed locally
by ``[2x2x2 transposed conv + 2 bottleneck dense layers] x stages`` (Table I's "Magnify"
column), then a BN-ReLU-Conv 1x1x1 back to the pyramid width. One layer instance is applied to
the crops of every level, so its weights are shared across levels (paper).

Two variants, chosen by ``model.fpr.magnify_mode``:

``table1`` (default; our reading of the paper's Table I)
  Table I gives "[2x2x2 deconv + Bottle Neck x2] x 2, Magnify Output 5 x 5 x 5", then "RoI
  Align Output 2 x 2 x 2"; Fig. 3 and Section III.C say the feature maps are cropped "with some
  margins with a fixed crop size ... to ensure the transposed convolution in later Local
  Magnification works correctly". A 2x2x2 transposed conv of stride 2 always gives an even side
  (``2n``), so 5 cannot come from doubling; with stride 1 and 'valid' extent (Keras
  ``Conv3DTranspose(k=2, strides=1, padding="valid")``, output ``n + 1``) two stages give
  ``3 -> 4 -> 5``. So each level is cut as a fixed ``3^3``-cell crop: the cell that holds the
  proposal centre plus a one-cell margin on every side. (With the anchor layout of Section
  III.B and Diameter Alignment a proposal measures about 1-1.5 cells on its reference level and
  hence on every level, so the fixed crop holds it with its margin.) The output has the level's
  own cell spacing: this variant adds learned capacity and extent, not sampling density.

  Coordinates: output cell ``i`` of one stride-1 stage combines input cells ``i - 1`` and
  ``i``, whose centres are ``i - 1/2`` and ``i + 1/2``; its centre ``i + 1/2`` therefore stands
  for input coordinate ``i`` (it interpolates between them), i.e. ``u = v + 1/2`` per stage
  (``v``: input continuous coordinate, cell ``j`` spans ``[j, j + 1)``). After two stages
  ``u = v + 1``: the 5^3 output spans crop coordinates ``[-1, 4)``, its cell ``i`` is centred
  on cell ``origin - 1 + i`` of the level, its three middle cells on the three cropped cells.
  The aligned crop box ``[b1, b2)`` (level coordinates) goes to RoI Align as
  ``[b1 - origin + 1, b2 - origin + 1)``, clipped to ``[0, 5]``.

``patch`` (our earlier variant)
  A fixed ``4^3``-cell patch (``magnify_patch_cells``) magnified by stride-2 transposed convs,
  x2 per stage, to ``16^3``. A stride-2 2x2x2 transposed conv maps cell ``[j, j+1)`` onto
  ``[2j, 2j+2)``, so ``u = 2 v`` per stage and ``u = 4 v`` after two; RoI Align gets
  ``4 (b - origin)`` clipped to ``[0, 16]``.

In general, a 2x2x2 'valid' transposed conv of stride ``s`` maps ``u = s v + (2 - s) / 2`` and
``n -> (n - 1) s + 2`` cells; :attr:`LocalMagnification.scale`, :attr:`~LocalMagnification.
offset` and :meth:`~LocalMagnification.output_cells` compose these over the stages.

Batched procedure (used by :class:`tf_agg3d.models.detector.Agg3DDetector`):

1. :func:`gather_patches` cuts a fixed ``P^3``-cell patch around each proposal centre on each
   level with an integer-aligned gather (cells outside the map read zero). A static ``P`` lets
   all crops of all levels be magnified in one batched call.
2. :class:`LocalMagnification` maps ``[R, P, P, P, C]`` to ``[R, Q, Q, Q, C]``
   (``Q = output_cells(P)``: 5 for table1, 16 for patch).
3. :func:`magnified_boxes` expresses the aligned crop box in the output's coordinates
   ``scale * (b - origin) + offset`` (clipped to ``[0, Q]``) for 3D RoI Align.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_agg3d.layers.dense_block import DenseBlock, Transition, channels_shape
from tf_agg3d.layers.tracking import track_sublayers


def gather_patches(
    features: tf.Tensor, centres: tf.Tensor, batch_indices: tf.Tensor, patch_cells: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Integer-aligned ``P^3`` patches of a feature map around continuous centres.

    Args:
      features: [B, d, h, w, C] one pyramid level.
      centres: [R, 3] (z, y, x) in the level's continuous coordinates (cell j spans [j, j+1)).
      batch_indices: [R] int, the batch element of each centre.
      patch_cells: P, the static patch side in cells.

    Returns:
      (patches [R, P, P, P, C], zero outside the map;
       origin float32 [R, 3], the continuous coordinate of each patch's lower corner).
    """
    p = int(patch_cells)
    # The P cells whose span is centred closest to the centre: [start, start + P).
    start = tf.floor(tf.cast(centres, tf.float32) - p / 2.0 + 0.5)
    start_i = tf.cast(start, tf.int32)
    offsets = tf.range(p, dtype=tf.int32)
    limits = tf.shape(features)[1:4]
    axes = []
    inside = []
    for a in range(3):
        idx = start_i[:, a : a + 1] + offsets[None, :]  # [R, P]
        inside.append(tf.logical_and(idx >= 0, idx < limits[a]))
        axes.append(tf.clip_by_value(idx, 0, limits[a] - 1))
    r = tf.shape(centres)[0]
    shape = tf.stack([r, p, p, p])
    b = tf.broadcast_to(tf.cast(batch_indices, tf.int32)[:, None, None, None], shape)
    z = tf.broadcast_to(axes[0][:, :, None, None], shape)
    y = tf.broadcast_to(axes[1][:, None, :, None], shape)
    x = tf.broadcast_to(axes[2][:, None, None, :], shape)
    patches = tf.gather_nd(features, tf.stack([b, z, y, x], axis=-1))
    mask = tf.logical_and(
        tf.logical_and(inside[0][:, :, None, None], inside[1][:, None, :, None]),
        inside[2][:, None, None, :],
    )
    patches = patches * tf.cast(mask, patches.dtype)[..., None]
    return patches, start


# magnify_mode -> stride of the 2x2x2 transposed convs (see the module docstring).
MAGNIFY_MODES: dict[str, int] = {"table1": 1, "patch": 2}


def deconv_stride_of(mode: str) -> int:
    """Transposed-conv stride of a ``model.fpr.magnify_mode``: table1 1, patch 2.

    Raises:
      ValueError: an unknown mode.
    """
    if mode not in MAGNIFY_MODES:
        raise ValueError(f"magnify_mode {mode!r} not in {sorted(MAGNIFY_MODES)}")
    return MAGNIFY_MODES[mode]


def magnified_boxes(
    boxes: tf.Tensor,
    origin: tf.Tensor,
    patch_cells: int,
    scale: float,
    offset: float = 0.0,
    output_cells: int | None = None,
) -> tf.Tensor:
    """Crop boxes of a level in the continuous coordinates of their magnified patches.

    Args:
      boxes: [R, 6] (z1, y1, x1, z2, y2, x2) in the level's continuous coordinates.
      origin: [R, 3] patch lower corners from :func:`gather_patches`.
      patch_cells: P.
      scale: the magnifier's coordinate scale k (``stride ** stages``).
      offset: the magnifier's coordinate offset (0 for stride 2; ``stages / 2`` for stride 1).
      output_cells: Q, the magnified side; default ``k * P``.

    Returns:
      [R, 6] boxes ``k * (boxes - origin) + offset``, clipped to the output ``[0, Q]``.
    """
    q = float(scale * patch_cells if output_cells is None else output_cells)
    corner = tf.concat([origin, origin], axis=-1)
    return tf.clip_by_value((boxes - corner) * float(scale) + float(offset), 0.0, q)


@keras.saving.register_keras_serializable(package="tf_agg3d")
class LocalMagnification(keras.layers.Layer):
    """``[2x2x2 transposed conv + dense bottleneck layers] x stages`` then 1x1x1.

    Args:
      channels: channels of the transposed convs and of the output; None = input channels.
      num_stages: number of transposed conv + bottleneck stages (2 in Table I).
      layers_per_stage: bottleneck dense layers after each transposed conv (2).
      growth_rate: growth rate of those layers (16).
      bottleneck_width: bottleneck multiplier of those layers (4).
      sync_batch_norm: synchronized BatchNormalization across replicas.
      deconv_stride: stride of the 2x2x2 'valid' transposed convs: 1 (Table I reading, each
        stage adds one cell: 3 -> 4 -> 5) or 2 (our earlier "patch" variant, x2 per stage).

    Call:
      inputs: [R, P, P, P, C] patches (of any level: the same weights serve all levels).
      training: BatchNormalization mode.

    Returns:
      [R, Q, Q, Q, channels] with ``Q = output_cells(P)``; input coordinate ``v`` maps to
      output coordinate ``scale * v + offset``.
    """

    def __init__(
        self,
        channels=None,
        num_stages=2,
        layers_per_stage=2,
        growth_rate=16,
        bottleneck_width=4,
        sync_batch_norm=False,
        deconv_stride=1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.channels = None if channels is None else int(channels)
        self.num_stages = int(num_stages)
        self.layers_per_stage = int(layers_per_stage)
        self.growth_rate = int(growth_rate)
        self.bottleneck_width = int(bottleneck_width)
        self.sync_batch_norm = bool(sync_batch_norm)
        self.deconv_stride = int(deconv_stride)
        if self.deconv_stride not in (1, 2):
            raise ValueError(f"deconv_stride must be 1 or 2, got {deconv_stride}")

    @property
    def scale(self) -> int:
        """Coordinate scale k = ``deconv_stride ** num_stages`` (1 for table1, 4 for patch)."""
        return self.deconv_stride**self.num_stages

    @property
    def offset(self) -> float:
        """Coordinate offset: ``u = scale * v + offset`` (``stages / 2`` for stride 1, else 0)."""
        s, u = self.deconv_stride, 0.0
        for _ in range(self.num_stages):
            u = s * u + (2 - s) / 2.0
        return u

    def output_cells(self, n):
        """Output side of an input side `n` (``(n - 1) * stride + 2`` per stage); None stays."""
        if n is None:
            return None
        for _ in range(self.num_stages):
            n = (int(n) - 1) * self.deconv_stride + 2
        return n

    def build(self, input_shape):
        c = int(input_shape[-1])
        width = self.channels or c
        self.deconvs, self.blocks = [], []
        for i in range(self.num_stages):
            deconv = keras.layers.Conv3DTranspose(
                width,
                2,
                strides=self.deconv_stride,
                padding="valid",
                kernel_initializer="he_normal",
                name=f"deconv{i + 1}",
            )
            deconv.build(channels_shape(c))
            block = DenseBlock(
                self.layers_per_stage,
                self.growth_rate,
                self.bottleneck_width,
                self.sync_batch_norm,
                name=f"bottleneck{i + 1}",
            )
            block.build(channels_shape(width))
            c = width + self.layers_per_stage * self.growth_rate
            self.deconvs.append(deconv)
            self.blocks.append(block)
        track_sublayers(self, "deconv", self.deconvs)
        track_sublayers(self, "block", self.blocks)
        self.project = Transition(
            width, pool=False, use_bias=True, sync_batch_norm=self.sync_batch_norm, name="project"
        )
        self.project.build(channels_shape(c))
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        for deconv, block in zip(self.deconvs, self.blocks, strict=False):
            x = block(deconv(x), training=training)
        return self.project(x, training=training)

    def compute_output_shape(self, input_shape):
        width = self.channels or input_shape[-1]
        return (input_shape[0], *(self.output_cells(n) for n in input_shape[1:4]), width)

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            num_stages=self.num_stages,
            layers_per_stage=self.layers_per_stage,
            growth_rate=self.growth_rate,
            bottleneck_width=self.bottleneck_width,
            sync_batch_norm=self.sync_batch_norm,
            deconv_stride=self.deconv_stride,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # Saved before the table1 variant existed: those were all stride-2 ("patch") layers.
        config.setdefault("deconv_stride", 2)
        return cls(**config)
