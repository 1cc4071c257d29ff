"""Whole-scan pyramid features of a DenseUNet3D: each voxel computed once, in tiles, exactly.

The sliding-window path (:mod:`tf_agg3d.models.whole_scan`, ``inference.mode: windows``) runs
the backbone on overlapping 128^3 windows: every voxel of a 220 x 300 x 300 scan is evaluated
~1.9 times, and each window sees zero padding at its borders inside the scan. This module runs
the backbone **once over the whole scan** instead, and bounds the memory by tiling the only part
whose activations are large.

The backbone runs as :class:`~tf_agg3d.models.inference_backbone.InferenceBackbone`: a *stem*
(full resolution down to stride 4: ~85 % of the multiply-adds and nearly all of the activation
memory) and a *trunk* (strides 4-16, the decoder, the pyramid laterals).

The stem is computed in tiles (:func:`plan_tiles`) and its stride-4 output assembled into one
map of the whole scan; the trunk then runs on that map in one pass. The whole computation is
then *exactly* one backbone pass over the whole (padded) scan, the reference "whole-volume"
result, with no artificial border anywhere inside the scan.

**The halo** (:func:`~tf_agg3d.models.receptive_field.receptive_field`). A stem output cell at
stride 4 covers input voxels ``[4q, 4q + 4)`` and depends on voxels ``[4q - r, 4q + 3 + r]``
with ``r = 2 + 2 L`` (the PreBlock's two 3x3x3 convs reach 1 voxel each; Encode(1)'s L 3x3x3
convs reach 1 cell = 2 voxels each; the pools add nothing for an aligned cell): r = 6 for the
paper's L = 2. A tile therefore starts on a multiple of 4 (so its pools see the same 2x2x2
groups as the whole scan) and is cut with a halo of ``ceil(r / 4) * 4`` = 8 voxels on each side
that lies inside the scan; where a tile touches the scan border it gets the same 'same' zero
padding the whole-volume pass applies there. Its interior output then equals the whole-volume
stem output exactly. The full backbone's receptive field is far larger (r = 94 voxels for the
stride-4 pyramid map of the paper's network, 78 at stride 8, 62 at stride 16): tiling the
*whole* network would need a 96-voxel halo, and a 2 x 2 x 2 tiling of a 224 x 304 x 304 scan
would then evaluate ~5 times its voxels. Tiling only the stem costs ``(T + 16) / T`` per split
axis instead (1.07 for two 112-voxel slabs).

**Skipping fill.** The cache sets every voxel farther than ``preprocess.lung_dilation_mm`` from
the lungs to ``fill_hu``. Within each tile only the box of stride-4 cells that have a non-fill
voxel within r voxels is computed (nothing when there is none). Every other cell sees nothing
but fill in its receptive field, so its stem output is the network's response to an all-fill
input at the same distance from the scan borders: that response is computed once per scan on
a small all-fill probe (``2 * halo + 4`` voxels a side) and copied in. Skipping is therefore
exact, whatever the model does on fill, and the trunk, the RPN and the FPRN see the same maps
as without it.

Only ``DenseUNet3D`` backbones are supported
(:func:`~tf_agg3d.models.inference_backbone.supports`); a detector with another backbone runs
the sliding-window path.
"""

from __future__ import annotations

import tensorflow as tf

from tf_agg3d.models.inference_backbone import InferenceBackbone
from tf_agg3d.models.receptive_field import STEM_STRIDE


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
            block = tf.slice(
                out, tf.concat([lo - r_lo // s, [0]], 0), tf.concat([hi - lo, [-1]], 0)
            )
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
