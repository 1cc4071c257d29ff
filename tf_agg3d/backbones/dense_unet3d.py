"""DenseUNet3D: the DenseNet-block 3D U-Net of Table I, returning a feature pyramid.

Layout for the default (paper) configuration, sizes for a 128^3 input::

  PreBlock      Conv3x3x3(24)-BN-ReLU, Conv3x3x3(24)-BN-ReLU, MaxPool 2      -> 64^3 x 24  (s 2)
  Encode(1)     dense block [1x1x1, 3x3x3] x 2, growth 16                    -> 64^3 x 56
  Transition(1) BN-ReLU-Conv1x1x1(64), AvgPool 2                             -> 32^3 x 64  (s 4)
  Encode(2)     dense block x 2                                              -> 32^3 x 96  skip 4
  Transition(2) -> 16^3 x 64 (s 8);  Encode(3) -> 16^3 x 96 (skip 8)
  Transition(3) -> 8^3 x 64 (s 16)
  Detector      dense bottleneck layers x 2                                  -> 8^3 x 96
  Pyramid 16    BN-ReLU-Conv1x1x1(32)                                        -> 8^3 x 32
  Decode (x2)   BN-ReLU-ConvTranspose 2x2x2 s2 (64), concat skip (not add),
                BN-ReLU-Conv1x1x1(64), dense block x 2, BN-ReLU-Conv1x1x1(32) -> pyramid 8, 4

Every pyramid map has `pyramid_channels` (32) channels, so the RPN heads have one shape and
the FPRN can concatenate crops of all levels. The decoder upsamples the dense-block features
(not the 32-channel pyramid projection), as in a U-Net; the pyramid maps are lateral outputs.

Parameter count of the full Table I configuration (``BackboneConfig()`` defaults):
**552,840** (547,544 trainable; the other 5,296 are BatchNorm moving statistics). The
complete default detector (``build_detector(ModelConfig())``) has **907,719**: this backbone,
RPN heads 3 x 2,762, Local Magnification 149,472 and the FPR head 197,121 (768 -> 256 -> 1).
Run ``python -m tf_agg3d.backbones.dense_unet3d`` to print it; the numbers are asserted in
``tests/backbones/test_dense_unet3d.py`` and ``tests/models/test_detector.py``.
"""

from __future__ import annotations

import keras

from tf_agg3d.layers.dense_block import DenseBlock, Transition, batch_norm, channels_shape
from tf_agg3d.layers.tracking import track_sublayers


@keras.saving.register_keras_serializable(package="tf_agg3d")
class DenseUNet3D(keras.Model):
    """DenseNet-block 3D U-Net backbone (Table I).

    The output strides are ``2 * 2**k`` for k = 1 .. len(transition_channels): (4, 8, 16) for
    the paper's three transitions. Input sides must be divisible by the largest stride.

    Args:
      preblock_filters: channels of the two PreBlock 3x3x3 convs.
      growth_rate: dense-layer growth rate.
      layers_per_block: dense layers per encoder/decoder dense block.
      bottleneck_width: dense-layer bottleneck multiplier.
      transition_channels: output channels of each encoder transition (one per downsampling).
      detector_layers: dense bottleneck layers at the coarsest level.
      decoder_channels: channels of the transposed convs and post-concat 1x1x1 convs.
      pyramid_channels: channels of every pyramid output.
      sync_batch_norm: BatchNormalization synchronized across replicas
        (:class:`~tf_agg3d.layers.sync_batch_norm.SyncBatchNormalization`).

    Call:
      inputs: [B, D, H, W, C_in] normalised intensities (see HUNormalization).
      training: BatchNormalization mode.

    Returns:
      ``{stride: [B, D/stride, H/stride, W/stride, pyramid_channels]}`` for every stride in
      :attr:`strides`.
    """

    def __init__(
        self,
        preblock_filters=24,
        growth_rate=16,
        layers_per_block=2,
        bottleneck_width=4,
        transition_channels=(64, 64, 64),
        detector_layers=2,
        decoder_channels=64,
        pyramid_channels=32,
        sync_batch_norm=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(transition_channels) < 1:
            raise ValueError("transition_channels needs at least one entry")
        self.preblock_filters = int(preblock_filters)
        self.growth_rate = int(growth_rate)
        self.layers_per_block = int(layers_per_block)
        self.bottleneck_width = int(bottleneck_width)
        self.transition_channels = tuple(int(c) for c in transition_channels)
        self.detector_layers = int(detector_layers)
        self.decoder_channels = int(decoder_channels)
        self.pyramid_channels = int(pyramid_channels)
        self.sync_batch_norm = bool(sync_batch_norm)

    @property
    def strides(self) -> tuple[int, ...]:
        """Pyramid strides, finest first: (4, 8, 16) with three transitions."""
        return tuple(2 ** (k + 1) for k in range(1, len(self.transition_channels) + 1))

    def _block(self, num_layers, name):
        return DenseBlock(
            num_layers, self.growth_rate, self.bottleneck_width, self.sync_batch_norm, name=name
        )

    def build(self, input_shape):
        sync = self.sync_batch_norm
        c = int(input_shape[-1])
        # PreBlock: plain Conv-BN-ReLU (pre-activation on raw intensities would be meaningless).
        self.pre_conv1 = keras.layers.Conv3D(
            self.preblock_filters, 3, padding="same", use_bias=False, name="pre_conv1"
        )
        self.pre_bn1 = batch_norm(sync, "pre_bn1")
        self.pre_conv2 = keras.layers.Conv3D(
            self.preblock_filters, 3, padding="same", use_bias=False, name="pre_conv2"
        )
        self.pre_bn2 = batch_norm(sync, "pre_bn2")
        self.pre_pool = keras.layers.MaxPooling3D(2, name="pre_pool")
        self.pre_conv1.build(channels_shape(c))
        c = self.preblock_filters
        self.pre_bn1.build(channels_shape(c))
        self.pre_conv2.build(channels_shape(c))
        self.pre_bn2.build(channels_shape(c))

        self.encode_blocks, self.transitions, skip_channels = [], [], []
        for i, tc in enumerate(self.transition_channels):
            block = self._block(self.layers_per_block, f"encode{i + 1}")
            block.build(channels_shape(c))
            c += self.layers_per_block * self.growth_rate
            skip_channels.append(c)
            trans = Transition(tc, pool=True, sync_batch_norm=sync, name=f"transition{i + 1}")
            trans.build(channels_shape(c))
            c = tc
            self.encode_blocks.append(block)
            self.transitions.append(trans)
        track_sublayers(self, "encode_block", self.encode_blocks)
        track_sublayers(self, "transition", self.transitions)

        self.detector_block = self._block(self.detector_layers, "detector")
        self.detector_block.build(channels_shape(c))
        c += self.detector_layers * self.growth_rate
        # Pyramid projections, coarsest first (the order they are computed in).
        self.lateral_layers = [self._lateral(c, self.strides[-1])]

        self.upsample_bn, self.upsample, self.reduce, self.decode_blocks = [], [], [], []
        for stride in reversed(self.strides[:-1]):
            bn = batch_norm(sync, f"up{stride}_bn")
            bn.build(channels_shape(c))
            up = keras.layers.Conv3DTranspose(
                self.decoder_channels,
                2,
                strides=2,
                kernel_initializer="he_normal",
                name=f"up{stride}",
            )
            up.build(channels_shape(c))
            # Encoder block i ends at stride 2 ** (i + 1): the skip of `stride`.
            skip = skip_channels[stride.bit_length() - 2]
            reduce = Transition(
                self.decoder_channels, pool=False, sync_batch_norm=sync, name=f"reduce{stride}"
            )
            reduce.build(channels_shape(self.decoder_channels + skip))
            block = self._block(self.layers_per_block, f"decode{stride}")
            block.build(channels_shape(self.decoder_channels))
            c = self.decoder_channels + self.layers_per_block * self.growth_rate
            self.lateral_layers.append(self._lateral(c, stride))
            self.upsample_bn.append(bn)
            self.upsample.append(up)
            self.reduce.append(reduce)
            self.decode_blocks.append(block)
        for name in ("lateral_layers", "upsample_bn", "upsample", "reduce", "decode_blocks"):
            track_sublayers(self, name, getattr(self, name))
        self.built = True

    def _lateral(self, channels, stride):
        # Bias on: pyramid maps feed the heads directly, no BatchNorm follows.
        layer = Transition(
            self.pyramid_channels,
            pool=False,
            use_bias=True,
            sync_batch_norm=self.sync_batch_norm,
            name=f"pyramid{stride}",
        )
        layer.build(channels_shape(channels))
        return layer

    def decoder_levels(self):
        """The decoder's levels of the built network, coarsest first.

        Returns:
          an iterator of ``(stride, upsample BatchNorm, upsample (transposed conv), reduce
          (Transition), dense block, pyramid lateral)``.
        """
        return zip(
            reversed(self.strides[:-1]),
            self.upsample_bn,
            self.upsample,
            self.reduce,
            self.decode_blocks,
            self.lateral_layers[1:],
            strict=False,
        )

    def call(self, inputs, training=None):
        x = keras.ops.relu(self.pre_bn1(self.pre_conv1(inputs), training=training))
        x = keras.ops.relu(self.pre_bn2(self.pre_conv2(x), training=training))
        x = self.pre_pool(x)
        skips = []
        for block, trans in zip(self.encode_blocks, self.transitions, strict=False):
            x = block(x, training=training)
            skips.append(x)
            x = trans(x, training=training)
        x = self.detector_block(x, training=training)
        outputs = {self.strides[-1]: self.lateral_layers[0](x, training=training)}
        for stride, bn, up, reduce, block, lateral in self.decoder_levels():
            x = up(keras.ops.relu(bn(x, training=training)))
            x = keras.ops.concatenate([x, skips[stride.bit_length() - 2]], axis=-1)
            x = block(reduce(x, training=training), training=training)
            outputs[stride] = lateral(x, training=training)
        return {s: outputs[s] for s in self.strides}

    def compute_output_shape(self, input_shape):
        def side(n, s):
            return None if n is None else n // s

        return {
            s: (input_shape[0], *(side(n, s) for n in input_shape[1:4]), self.pyramid_channels)
            for s in self.strides
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            preblock_filters=self.preblock_filters,
            growth_rate=self.growth_rate,
            layers_per_block=self.layers_per_block,
            bottleneck_width=self.bottleneck_width,
            transition_channels=list(self.transition_channels),
            detector_layers=self.detector_layers,
            decoder_channels=self.decoder_channels,
            pyramid_channels=self.pyramid_channels,
            sync_batch_norm=self.sync_batch_norm,
        )
        return config

    @classmethod
    def from_backbone_config(cls, config, **kwargs) -> DenseUNet3D:
        """Builds the backbone from a :class:`tf_agg3d.config.BackboneConfig`."""
        return cls(
            preblock_filters=config.preblock_filters,
            growth_rate=config.growth_rate,
            layers_per_block=config.layers_per_block,
            bottleneck_width=config.bottleneck_width,
            transition_channels=config.transition_channels,
            detector_layers=config.detector_layers,
            decoder_channels=config.decoder_channels,
            pyramid_channels=config.pyramid_channels,
            sync_batch_norm=config.sync_batch_norm,
            **kwargs,
        )


if __name__ == "__main__":
    net = DenseUNet3D()
    net.build((None, None, None, None, 1))
    print(f"DenseUNet3D (Table I) parameters: {net.count_params():,}")
