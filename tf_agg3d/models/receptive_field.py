"""Receptive field of a DenseUNet3D, and the halo that makes tiles of its stem exact.

Derived from the network's structure (layer counts, strides), not measured: each tensor of
``DenseUNet3D.call`` is traced back to the interval of cells it must provide. The stem's halo
(:func:`stem_halo`) is what :mod:`tf_agg3d.models.tiled_backbone` cuts its tiles with;
:func:`receptive_field` of the whole network says why only the stem is tiled.
"""

from __future__ import annotations

from tf_agg3d.backbones.dense_unet3d import DenseUNet3D

# Stride of the stem's output (PreBlock max pool and Transition(1) average pool).
STEM_STRIDE = 4


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
