"""A ``DenseUNet3D`` in plain TensorFlow ops for inference, split into stem and trunk.

:class:`InferenceBackbone` re-expresses ``DenseUNet3D.call`` (inference mode) in two stages:

- the *stem*: PreBlock (two 3x3x3 convs at full resolution, max pool), Encode(1) (dense block at
  stride 2) and Transition(1) (1x1x1 conv, average pool), ending at stride 4. It holds ~85 % of
  the network's multiply-adds and nearly all of its activation memory (24-56 channels at
  strides 1-2, against 64-112 channels on 64x fewer cells below);
- the *trunk*: everything from Encode(2) on (strides 4-16, the decoder, the pyramid laterals).

:mod:`tf_agg3d.models.tiled_backbone` runs the stem in tiles and the trunk once on the assembled
stride-4 map.

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
from tf_agg3d.models.receptive_field import STEM_STRIDE, stem_halo


def supports(detector) -> bool:
    """Whether `detector` has a backbone this module can run (a built ``DenseUNet3D``)."""
    backbone = getattr(detector, "backbone", None)
    normalizer = getattr(detector, "normalizer", None)
    return (
        isinstance(backbone, DenseUNet3D)
        and getattr(backbone, "built", False)
        and isinstance(normalizer, HUNormalization)
    )


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
        for stride, bn, up, reduce, block, lateral in net.decoder_levels():
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
