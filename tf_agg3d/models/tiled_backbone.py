"""Whole-scan pyramid features of a DenseUNet3D: each voxel computed once, in tiles, exactly.

The sliding-window path (:mod:`tf_agg3d.models.whole_scan`, ``inference.mode: windows``) runs
the backbone on overlapping 128^3 windows: every voxel of a 220 x 300 x 300 scan is evaluated
~1.9 times, and each window sees zero padding at its borders inside the scan. This module runs
the backbone **once over the whole scan** instead, and bounds the memory by tiling the only part
whose activations are large.

**Stem and trunk.** :class:`InferenceBackbone` re-expresses ``DenseUNet3D.call`` (inference
mode) in two stages:

- the *stem*: PreBlock (two 3x3x3 convs at full resolution, max pool), Encode(1) (dense block at
  stride 2) and Transition(1) (1x1x1 conv, average pool), ending at stride 4. It holds ~85 % of
  the network's multiply-adds and nearly all of its activation memory (24-56 channels at
  strides 1-2, against 64-112 channels on 64x fewer cells below);
- the *trunk*: everything from Encode(2) on (strides 4-16, the decoder, the pyramid laterals).

The stem is computed in tiles (:func:`plan_tiles`) and its stride-4 output assembled into one
map of the whole scan; the trunk then runs on that map in one pass. The whole computation is
then *exactly* one backbone pass over the whole (padded) scan, the reference "whole-volume"
result, with no artificial border anywhere inside the scan.

**The halo** (:func:`receptive_field`). A stem output cell at stride 4 covers input voxels
``[4q, 4q + 4)`` and depends on voxels ``[4q - r, 4q + 3 + r]`` with ``r = 2 + 2 L`` (the
PreBlock's two 3x3x3 convs reach 1 voxel each; Encode(1)'s L 3x3x3 convs reach 1 cell = 2
voxels each; the pools add nothing for an aligned cell): r = 6 for the paper's L = 2. A tile
therefore starts on a multiple of 4 (so its pools see the same 2x2x2 groups as the whole
scan) and is cut with a halo of ``ceil(r / 4) * 4`` = 8 voxels on each side that lies inside
the scan; where a tile touches the scan border it gets the same 'same' zero padding the
whole-volume pass applies there. Its interior output then equals the whole-volume stem output
exactly. The full backbone's receptive field is far larger (r = 94 voxels for the stride-4
pyramid map of the paper's network, 78 at stride 8, 62 at stride 16): tiling the *whole*
network would need a 96-voxel halo, and a 2 x 2 x 2 tiling of a 224 x 304 x 304 scan would
then evaluate ~5 times its voxels. Tiling only the stem costs ``(T + 16) / T`` per split axis
instead (1.07 for two 112-voxel slabs).

**Skipping fill.** The cache sets every voxel farther than ``preprocess.lung_dilation_mm`` from
the lungs to ``fill_hu``. Within each tile only the box of stride-4 cells that have a non-fill
voxel within r voxels is computed (nothing when there is none). Every other cell sees nothing
but fill in its receptive field, so its stem output is the network's response to an all-fill
input at the same distance from the scan borders: that response is computed once per scan on
a small all-fill probe (``2 * halo + 4`` voxels a side) and copied in. Skipping is therefore
exact, whatever the model does on fill, and the trunk, the RPN and the FPRN see the same maps
as without it.

**Precision.** The same functions run in float32 or bfloat16 (``compute_dtype``): weights are
cast once per graph, activations stay in the compute dtype between layers, BatchNorm that
directly follows a convolution is folded into it (a fused conv + bias + ReLU), and the pyramid
maps are returned in float32 for the RPN and FPRN heads.

Only ``DenseUNet3D`` backbones are supported (:func:`supports`); a detector with another
backbone runs the sliding-window path.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tf_agg3d.backbones.dense_unet3d import DenseUNet3D
from tf_agg3d.layers.hu_normalization import HUNormalization

# Stride of the stem's output (PreBlock max pool and Transition(1) average pool).
STEM_STRIDE = 4


def supports(detector) -> bool:
    """Whether `detector` has a backbone this module can tile (a ``DenseUNet3D``)."""
    backbone = getattr(detector, "backbone", None)
    normalizer = getattr(detector, "normalizer", None)
    return (
        isinstance(backbone, DenseUNet3D)
        and getattr(backbone, "built", False)
        and isinstance(normalizer, HUNormalization)
    )


# --------------------------------------------------------------------------------------------
# Receptive field
# --------------------------------------------------------------------------------------------


def _grow(iv, r):
    return [iv[0] - r, iv[1] + r]


def _finer(iv):
    """Cells one level finer that a 2x2x2 pool over `iv` reads: ``[2a, 2b + 1]``."""
    return [2 * iv[0], 2 * iv[1] + 1]


def _coarser(iv):
    """Cells one level coarser that a 2x2x2 stride-2 transposed conv over `iv` reads."""
    return [iv[0] // 2, iv[1] // 2]


def _union(a, b):
    return list(b) if a is None else [min(a[0], b[0]), max(a[1], b[1])]


def _preblock_voxels(pool_input_cells, layers_per_block):
    """Voxels that Encode(1) over max-pooled stride-2 cells `pool_input_cells` needs."""
    # Encode(1): L 3x3x3 convs at stride 2; the max pool; the PreBlock's two 3x3x3 convs.
    return _grow(_finer(_grow(pool_input_cells, layers_per_block)), 2)


def stem_radius(backbone: DenseUNet3D) -> int:
    """Voxels beyond its own 4 voxels that a stride-4 stem output cell depends on (one side).

    Cell ``[0, 4)`` -> Transition(1)'s pool reads stride-2 cells [0, 1] -> Encode(1)'s L convs
    widen that to [-L, 1 + L] -> the max pool reads voxels [-2L, 3 + 2L] -> the PreBlock's two
    convs widen it to [-2L - 2, 5 + 2L]: r = 2L + 2 (6 for the paper's L = 2).
    """
    iv = _preblock_voxels(_finer([0, 0]), backbone.layers_per_block)
    return max(-iv[0], iv[1] - (STEM_STRIDE - 1))


def receptive_field(backbone: DenseUNet3D) -> dict[int, int]:
    """Input voxels each pyramid output depends on beyond an aligned block (one axis).

    Propagates the interval of cells each tensor of ``DenseUNet3D.call`` must provide backwards,
    from the outputs of one aligned block of ``B`` input voxels (B = the coarsest stride) to the
    input: a 3x3x3 conv widens it by one cell per side, a 2x2x2 pool maps cells ``[a, b]`` to
    ``[2a, 2b + 1]`` one level finer, a 2x2x2 stride-2 transposed conv maps ``[a, b]`` to
    ``[a // 2, b // 2]`` one level coarser, and a tensor consumed twice (dense concatenation,
    U-Net skips) must provide the union.

    Returns:
      ``{stride: r}``: the outputs of input voxels ``[0, B)`` on that pyramid level depend on
      voxels ``[-r, B - 1 + r]``. The paper's network: ``{4: 94, 8: 78, 16: 62}``.
    """
    strides = backbone.strides
    coarsest = strides[-1]
    per_block = backbone.layers_per_block
    n = len(backbone.transition_channels)

    def need(stride):
        dec = {stride: [0, coarsest // stride - 1]}  # lateral convs are 1x1x1
        enc = {}
        for s in strides[:-1]:  # finest first: decoder level s reads level 2s and skip s
            if s in dec:
                cat = _grow(dec[s], per_block)
                dec[2 * s] = _union(dec.get(2 * s), _coarser(cat))
                enc[s] = _union(enc.get(s), cat)
        trans = {coarsest: _grow(dec[coarsest], backbone.detector_layers)}
        for i in range(n, 0, -1):  # Transition(i): encoder stride 2**i -> 2**(i + 1)
            s_in, s_out = 2**i, 2 ** (i + 1)
            if s_out in trans:
                enc[s_in] = _union(enc.get(s_in), _finer(trans[s_out]))
            if i > 1 and s_in in enc:
                trans[s_in] = _union(trans.get(s_in), _grow(enc[s_in], per_block))
        iv = _preblock_voxels(enc[2], per_block)
        return max(-iv[0], iv[1] - (coarsest - 1))

    return {s: need(s) for s in strides}


def stem_halo(backbone: DenseUNet3D) -> int:
    """Halo (voxels, a multiple of the stem stride) that makes tiled stem outputs exact."""
    r = stem_radius(backbone)
    return -(-r // STEM_STRIDE) * STEM_STRIDE


# --------------------------------------------------------------------------------------------
# The backbone in raw TensorFlow ops (inference only)
# --------------------------------------------------------------------------------------------


def _bn_affine(bn) -> tuple[tf.Tensor, tf.Tensor]:
    """Inference BatchNorm as ``x * scale + shift`` (float32), as Keras computes it."""
    inv = tf.math.rsqrt(tf.cast(bn.moving_variance, tf.float32) + bn.epsilon)
    if bn.scale:
        inv = inv * tf.cast(bn.gamma, tf.float32)
    shift = -tf.cast(bn.moving_mean, tf.float32) * inv
    if bn.center:
        shift = shift + tf.cast(bn.beta, tf.float32)
    return inv, shift


@dataclasses.dataclass
class _Conv:
    kernel: tf.Tensor
    bias: tf.Tensor | None


class InferenceBackbone:
    """``DenseUNet3D`` + HU normalisation in plain TF ops, split into stem and trunk.

    Reads the Keras layers' variables when called (in a ``tf.function``, once per trace), so the
    traced graph captures the same variables as the Keras model (one set in a SavedModel).

    Args:
      backbone: a built ``DenseUNet3D``.
      normalizer: the detector's ``HUNormalization``.
      pyramid_strides: strides to return (default all of the backbone's).
    """

    def __init__(self, backbone: DenseUNet3D, normalizer: HUNormalization, pyramid_strides=None):
        self.backbone = backbone
        self.normalizer = normalizer
        self.strides = tuple(backbone.strides)
        self.pyramid_strides = tuple(pyramid_strides or self.strides)
        self.stem_halo = stem_halo(backbone)
        self.stem_channels = int(backbone.transition_channels[0])
        self.stem_stride = STEM_STRIDE

    def stem_bytes_per_voxel(self, compute_dtype=tf.float32) -> int:
        """Peak memory of the stem per region voxel (a model measured on the paper's network).

        The full-resolution PreBlock dominates: about three live ``preblock_filters``-channel
        tensors (a conv's input, its output and oneDNN's blocked copy), plus the float32 HU
        and normalised input. Measured: 292 (float32) and 120 (bfloat16) bytes per voxel for
        24 filters; the model gives 304 and 156.
        """
        item = tf.as_dtype(compute_dtype).size
        return (3 * int(self.backbone.preblock_filters) + 2) * item + 8

    # -- weights -------------------------------------------------------------------------------

    @staticmethod
    def _conv(layer, dtype, bn=None) -> _Conv:
        """A conv's kernel and bias in `dtype`, with a following BatchNorm folded in."""
        kernel = tf.cast(layer.kernel, tf.float32)
        bias = tf.cast(layer.bias, tf.float32) if layer.use_bias else None
        if bn is not None:
            scale, shift = _bn_affine(bn)
            kernel = kernel * scale
            bias = shift if bias is None else bias * scale + shift
        return _Conv(tf.cast(kernel, dtype), None if bias is None else tf.cast(bias, dtype))

    @staticmethod
    def _bn_relu(x, bn):
        scale, shift = _bn_affine(bn)
        return tf.nn.relu(x * tf.cast(scale, x.dtype) + tf.cast(shift, x.dtype))

    @staticmethod
    def _apply(x, conv: _Conv, relu=False):
        y = tf.nn.conv3d(x, conv.kernel, [1, 1, 1, 1, 1], "SAME")
        if conv.bias is not None:
            y = tf.nn.bias_add(y, conv.bias)
        return tf.nn.relu(y) if relu else y

    def _first_conv(self, x, conv: _Conv):
        """The PreBlock's first 3x3x3 conv (+ bias + ReLU) of a one-channel input.

        A Conv3D with one input channel is a poor fit for oneDNN's kernels (measured ~1.5x
        slower than this form): the three z-taps are stacked as channels and the conv runs as a
        2D 3x3 conv over each z-slice, with the same zero padding ('same' in z by the explicit
        pad, in y and x by conv2d's).
        """
        if x.shape[-1] != 1 or tuple(conv.kernel.shape[:3]) != (3, 3, 3):
            return self._apply(x, conv, relu=True)
        shape = tf.shape(x)
        v = tf.pad(x[..., 0], [[0, 0], [1, 1], [0, 0], [0, 0]])
        stack = tf.stack([v[:, :-2], v[:, 1:-1], v[:, 2:]], axis=-1)  # taps z-1, z, z+1
        stack = tf.reshape(stack, tf.concat([[-1], shape[2:4], [3]], 0))
        kernel = tf.transpose(conv.kernel[:, :, :, 0, :], [1, 2, 0, 3])  # [kh, kw, kz, out]
        y = tf.nn.conv2d(stack, kernel, 1, "SAME")
        if conv.bias is not None:
            y = tf.nn.bias_add(y, conv.bias)
        y = tf.nn.relu(y)
        return tf.reshape(y, tf.concat([shape[:4], [tf.shape(conv.kernel)[-1]]], 0))

    def _dense_block(self, x, block):
        for layer in block.dense_layers:
            # BN1-ReLU, then conv1 with BN2 folded in (+ReLU), then the 3x3x3 conv2.
            h = self._bn_relu(x, layer.bn1)
            h = self._apply(h, self._conv(layer.conv1, x.dtype, bn=layer.bn2), relu=True)
            h = self._apply(h, self._conv(layer.conv2, x.dtype))
            x = tf.concat([x, h], axis=-1)
        return x

    def _transition(self, x, trans):
        h = self._bn_relu(x, trans.bn)
        if trans.pool:
            # avgpool(conv1x1(h)) == conv1x1(avgpool(h)): both linear; pooling first is 8x cheaper.
            h = tf.nn.avg_pool3d(h, 2, 2, "VALID")
        return self._apply(h, self._conv(trans.conv, x.dtype))

    # -- stages --------------------------------------------------------------------------------

    def normalize(self, hu: tf.Tensor, compute_dtype=tf.float32) -> tf.Tensor:
        """HU [B, D, H, W] or [B, D, H, W, 1] -> [B, D, H, W, 1] in [0, 1], `compute_dtype`."""
        x = tf.cast(hu, tf.float32)
        if x.shape.rank == 4:
            x = x[..., None]
        lo, hi = self.normalizer.window_min, self.normalizer.window_max
        x = (tf.clip_by_value(x, lo, hi) - lo) / (hi - lo)
        return tf.cast(x, compute_dtype)

    def stem(self, hu: tf.Tensor, compute_dtype=tf.float32) -> tf.Tensor:
        """HU [B, D, H, W(, 1)] (sides multiples of 4) -> stride-4 map [B, D/4, H/4, W/4, C0]."""
        net = self.backbone
        x = self.normalize(hu, compute_dtype)
        x = self._first_conv(x, self._conv(net.pre_conv1, compute_dtype, bn=net.pre_bn1))
        x = self._apply(x, self._conv(net.pre_conv2, compute_dtype, bn=net.pre_bn2), relu=True)
        x = tf.nn.max_pool3d(x, 2, 2, "VALID")
        x = self._dense_block(x, net.encode_blocks[0])
        return self._transition(x, net.transitions[0])

    def trunk(self, x: tf.Tensor) -> dict[int, tf.Tensor]:
        """Stride-4 stem map -> ``{stride: float32 [B, d, h, w, C]}`` (the pyramid strides)."""
        net = self.backbone
        skips = {}
        for i in range(1, len(net.transition_channels)):
            x = self._dense_block(x, net.encode_blocks[i])
            skips[2 ** (i + 1)] = x
            x = self._transition(x, net.transitions[i])
        x = self._dense_block(x, net.detector_block)
        outputs = {self.strides[-1]: self._transition(x, net.lateral_layers[0])}
        for stride, bn, up, reduce, block, lateral in zip(
            reversed(self.strides[:-1]),
            net.upsample_bn,
            net.upsample,
            net.reduce,
            net.decode_blocks,
            net.lateral_layers[1:],
            strict=False,
        ):
            h = self._bn_relu(x, bn)
            shape = tf.shape(h)
            out_shape = tf.stack([shape[0], 2 * shape[1], 2 * shape[2], 2 * shape[3], up.filters])
            conv = self._conv(up, x.dtype)
            h = tf.nn.conv3d_transpose(h, conv.kernel, out_shape, [1, 2, 2, 2, 1], "VALID")
            if conv.bias is not None:
                h = tf.nn.bias_add(h, conv.bias)
            x = tf.concat([h, skips[stride]], axis=-1)
            x = self._dense_block(self._transition(x, reduce), block)
            outputs[stride] = self._transition(x, lateral)
        return {s: tf.cast(outputs[s], tf.float32) for s in self.pyramid_strides}

    def features(self, hu: tf.Tensor, compute_dtype=tf.float32) -> dict[int, tf.Tensor]:
        """The whole backbone on HU [B, D, H, W(, 1)] (sides multiples of the coarsest stride)."""
        return self.trunk(self.stem(hu, compute_dtype))


# --------------------------------------------------------------------------------------------
# Tiling the stem
# --------------------------------------------------------------------------------------------


def _axis_options(size: tf.Tensor, halo: int, align: int, max_tiles: int):
    """Per candidate tile count n = 1..max_tiles along one axis of `size` voxels.

    Returns:
      (interior [N] int32: tile interior side (multiple of `align`), count [N] int32: tiles
       actually needed, total [N] int32: voxels of all tile regions summed along the axis,
       largest [N] int32: the largest region side).
    """
    size = tf.cast(size, tf.int32)
    n = tf.range(1, max_tiles + 1, dtype=tf.int32)
    units = size // align
    interior = (units + n - 1) // n * align
    count = (size + interior - 1) // interior
    i = tf.range(max_tiles, dtype=tf.int32)[None, :]
    lo = i * interior[:, None]
    hi = tf.minimum(size, lo + interior[:, None])
    real = i < count[:, None]
    region = tf.minimum(size, hi + halo) - tf.maximum(0, lo - halo)
    region = tf.where(real, region, 0)
    return interior, count, tf.reduce_sum(region, axis=1), tf.reduce_max(region, axis=1)


def plan_tiles(
    padded_shape: tf.Tensor,
    halo: int,
    max_region_voxels: int,
    align: int = STEM_STRIDE,
    max_tiles_per_axis: int = 32,
    tile_cost_voxels: int = 32768,
) -> dict[str, tf.Tensor]:
    """Tiles of the stem: fewest evaluated voxels with every tile region under a budget.

    Tiles form a regular grid per axis (interiors of equal side, a multiple of `align`, the last
    one shorter); each tile's region is its interior plus `halo` voxels on each side, clipped to
    the volume. Among all grids of up to `max_tiles_per_axis` tiles per axis whose largest
    region holds at most `max_region_voxels` voxels, the plan minimises the voxels evaluated
    plus `tile_cost_voxels` per tile (a tie-breaker for per-call overhead). When no grid fits,
    the one with the smallest largest region is taken.

    Args:
      padded_shape: int [3], multiples of `align` (a tensor; dynamic in exported graphs).
      halo: voxels of context on each inner side, a multiple of `align`.
      max_region_voxels: the memory budget, in region voxels.

    Returns:
      dict: ``interior`` int32 [3] (tile side per axis), ``counts`` int32 [3], ``num_tiles``
      int32 scalar, ``region_voxels`` int64 scalar (sum over tiles), ``largest_region`` int64
      scalar.
    """
    options = [_axis_options(padded_shape[a], halo, align, max_tiles_per_axis) for a in range(3)]
    (iz, cz, tz, lz), (iy, cy, ty, ly), (ix, cx, tx, lx) = options
    i64 = tf.int64

    def outer(a, b, c):
        a, b, c = (tf.cast(t, i64) for t in (a, b, c))
        return a[:, None, None] * b[None, :, None] * c[None, None, :]

    total = outer(tz, ty, tx)
    largest = outer(lz, ly, lx)
    tiles = outer(cz, cy, cx)
    fits = largest <= max_region_voxels
    cost = total + tiles * tile_cost_voxels
    big = tf.constant(2**62, i64)
    score = tf.where(fits, cost, big // 2 + largest)
    best = tf.argmin(tf.reshape(score, [-1]), output_type=tf.int32)
    n = max_tiles_per_axis
    a, b, c = best // (n * n), (best // n) % n, best % n
    return {
        "interior": tf.stack([iz[a], iy[b], ix[c]]),
        "counts": tf.stack([cz[a], cy[b], cx[c]]),
        "num_tiles": cz[a] * cy[b] * cx[c],
        "region_voxels": total[a, b, c],
        "largest_region": largest[a, b, c],
    }


def occupied_cells(volume: tf.Tensor, fill_value: float, radius_cells: int) -> tf.Tensor:
    """Stem cells that must be computed: a non-fill voxel lies within `radius_cells` cells.

    Args:
      volume: [D, H, W] (sides multiples of the stem stride).
      fill_value: the cache's fill HU.
      radius_cells: the stem halo in cells.

    Returns:
      bool [D/4, H/4, W/4].
    """
    s = STEM_STRIDE
    shape = tf.shape(volume)
    blocks = tf.reshape(
        tf.not_equal(volume, tf.cast(fill_value, volume.dtype)),
        [shape[0] // s, s, shape[1] // s, s, shape[2] // s, s],
    )
    cells = tf.reduce_any(blocks, axis=[1, 3, 5])
    if radius_cells <= 0:
        return cells
    k = 2 * radius_cells + 1
    grown = tf.nn.max_pool3d(tf.cast(cells, tf.float32)[None, ..., None], k, 1, "SAME")
    return grown[0, ..., 0] > 0


def _bbox(mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """[lo, hi) int32 [3] of the true cells of a 3D mask; lo == hi (0) when there is none."""
    lo, hi = [], []
    for axis in range(3):
        other = [a for a in range(3) if a != axis]
        line = tf.reduce_any(mask, axis=other)
        idx = tf.cast(tf.where(line)[:, 0], tf.int32)
        lo.append(tf.reduce_min(tf.concat([idx, [tf.shape(line)[0]]], 0)))
        hi.append(tf.reduce_max(tf.concat([idx + 1, [0]], 0)))
    lo, hi = tf.stack(lo), tf.stack(hi)
    empty = tf.reduce_any(hi <= lo)
    return tf.where(empty, 0, lo), tf.where(empty, 0, hi)


def _fill_index(cells: tf.Tensor, probe_cells: tf.Tensor, border: int) -> tf.Tensor:
    """Probe cell equivalent of each cell along one axis (same distance to the nearer border)."""
    c = tf.range(cells)
    middle = tf.minimum(border, probe_cells - 1)
    return tf.where(c < border, c, tf.where(c >= cells - border, probe_cells - (cells - c), middle))


def tiled_stem(
    net: InferenceBackbone,
    padded: tf.Tensor,
    plan: dict[str, tf.Tensor],
    fill_value: float,
    compute_dtype=tf.float32,
    skip_fill: bool = True,
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """The stem's stride-4 map of a whole padded volume, computed tile by tile.

    Args:
      net: the inference backbone.
      padded: float32 HU [D, H, W], sides multiples of the coarsest stride.
      plan: from :func:`plan_tiles` (with ``net.stem_halo``).
      fill_value: the fill HU (what skipped cells hold).
      compute_dtype: float32 or bfloat16.
      skip_fill: compute only cells with a non-fill voxel in reach (exact either way).

    Returns:
      (map [1, D/4, H/4, W/4, C0] in `compute_dtype`, stats: ``tiles_computed`` int32,
       ``evaluated_voxels`` int64 (stem input voxels of every computed region)).
    """
    s, halo = STEM_STRIDE, net.stem_halo
    k = halo // s
    shape = tf.shape(padded)
    cells = shape // s
    interior = plan["interior"] // s  # cells
    counts = plan["counts"]
    num_tiles = plan["num_tiles"]
    if skip_fill:
        needed = occupied_cells(padded, fill_value, k)
    else:
        needed = tf.ones(tf.unstack(cells), tf.bool)

    channels = net.stem_channels

    def body(t, blocks, los, his, computed, voxels):
        index = tf.unravel_index(t, counts)
        tile_lo = tf.cast(index, tf.int32) * interior
        tile_hi = tf.minimum(cells, tile_lo + interior)
        sub = tf.slice(needed, tile_lo, tile_hi - tile_lo)
        lo, hi = _bbox(sub)
        lo, hi = tile_lo + lo, tile_lo + hi
        any_cell = tf.reduce_all(hi > lo)

        def compute():
            r_lo = tf.maximum(0, lo - k) * s
            r_hi = tf.minimum(cells, hi + k) * s
            region = tf.slice(padded, r_lo, r_hi - r_lo)
            out = net.stem(region[None], compute_dtype)[0]
            block = tf.slice(out, tf.concat([lo - r_lo // s, [0]], 0), tf.concat([hi - lo, [-1]], 0))
            return tf.reshape(block, [-1, channels]), tf.cast(tf.reduce_prod(r_hi - r_lo), tf.int64)

        def skip():
            return tf.zeros([0, channels], compute_dtype), tf.constant(0, tf.int64)

        block, n_voxels = tf.cond(any_cell, compute, skip)
        return (
            t + 1,
            blocks.write(t, block),
            los.write(t, lo),
            his.write(t, hi),
            computed + tf.cast(any_cell, tf.int32),
            voxels + n_voxels,
        )

    blocks = tf.TensorArray(
        compute_dtype, size=num_tiles, infer_shape=False, element_shape=[None, channels]
    )
    bounds = [tf.TensorArray(tf.int32, size=num_tiles, element_shape=[3]) for _ in range(2)]
    _, blocks, los, his, computed, voxels = tf.while_loop(
        lambda t, *_: t < num_tiles,
        body,
        (tf.constant(0), blocks, *bounds, tf.constant(0), tf.constant(0, tf.int64)),
        parallel_iterations=1,
    )
    flat = blocks.concat()
    los, his = los.stack(), his.stack()
    sizes = tf.reduce_prod(his - los, axis=1)
    offsets = tf.cumsum(sizes, exclusive=True)

    # Where each cell of the whole map comes from: its tile's block, or the fill response.
    grids = tf.meshgrid(*[tf.range(cells[a]) for a in range(3)], indexing="ij")
    coords = tf.stack(grids, axis=-1)  # [cz, cy, cx, 3]
    tile_index = coords // interior
    tile = (tile_index[..., 0] * counts[1] + tile_index[..., 1]) * counts[2] + tile_index[..., 2]
    lo = tf.gather(los, tile)
    hi = tf.gather(his, tile)
    inside = tf.reduce_all(tf.logical_and(coords >= lo, coords < hi), axis=-1)
    ext = hi - lo
    local = coords - lo
    in_block = (local[..., 0] * ext[..., 1] + local[..., 1]) * ext[..., 2] + local[..., 2]
    source = tf.gather(offsets, tile) + in_block
    all_inside = tf.reduce_all(inside)

    def with_fill():
        probe_cells = tf.minimum(cells, 2 * k + 1)
        probe = net.stem(
            tf.fill(probe_cells * s, tf.cast(fill_value, tf.float32))[None], compute_dtype
        )[0]
        for axis in range(3):
            probe = tf.gather(probe, _fill_index(cells[axis], probe_cells[axis], k), axis=axis)
        fill_flat = tf.reshape(probe, [-1, channels])
        linear = (coords[..., 0] * cells[1] + coords[..., 1]) * cells[2] + coords[..., 2]
        index = tf.where(inside, source, tf.shape(flat)[0] + linear)
        return tf.gather(tf.concat([flat, fill_flat], 0), index)

    def without_fill():
        return tf.gather(flat, tf.where(inside, source, 0))

    stem = tf.cond(all_inside, without_fill, with_fill)
    stem = tf.reshape(stem, tf.concat([cells, [channels]], 0))[None]
    return stem, {"tiles_computed": computed, "evaluated_voxels": voxels}
