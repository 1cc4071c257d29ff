"""DenseNet building blocks in 3D: pre-activation dense layers, dense blocks and transitions.

Every convolution follows DenseNet's BN-ReLU-Conv order (Table I's notation). A dense layer is
a bottleneck ``1x1x1 conv (bottleneck_width * growth_rate) -> 3x3x3 conv (growth_rate)``; a dense
block concatenates its input with the new features of each of its layers, so a block of ``L``
layers on ``C`` channels outputs ``C + L * growth_rate``. A transition is a 1x1x1 conv followed
by (optionally) a 2x2x2 average pool.

Sublayers are created and built in ``build()`` from the channel count alone, so every layer here
accepts any spatial size and is rebuilt exactly on ``.keras`` loading.
"""

from __future__ import annotations

import keras

from tf_agg3d.layers.sync_batch_norm import SyncBatchNormalization
from tf_agg3d.layers.tracking import track_sublayers


def batch_norm(sync: bool, name: str) -> keras.layers.BatchNormalization:
    """BatchNormalization, synchronized across replicas when `sync` (tf.distribute training).

    The synchronized one is :class:`SyncBatchNormalization`, not Keras' ``synchronized=True``,
    whose float32 moments (a one-pass variance, single-run sums) do not reproduce the
    single-device gradients.
    """
    if sync:
        return SyncBatchNormalization(epsilon=1e-5, name=name)
    return keras.layers.BatchNormalization(epsilon=1e-5, name=name)


def channels_shape(channels: int) -> tuple:
    """A 5D shape with unknown batch and spatial sizes: what conv/BN builds need."""
    return (None, None, None, None, int(channels))


@keras.saving.register_keras_serializable(package="tf_agg3d")
class DenseLayer(keras.layers.Layer):
    """One bottleneck dense layer: BN-ReLU-Conv 1x1x1 then BN-ReLU-Conv 3x3x3.

    Args:
      growth_rate: output channels (the new features the layer adds).
      bottleneck_width: the 1x1x1 conv outputs `bottleneck_width * growth_rate` channels.
      sync_batch_norm: synchronized BatchNormalization across replicas.

    Call:
      inputs: [B, D, H, W, C].
      training: BatchNormalization mode.

    Returns:
      [B, D, H, W, growth_rate], the new features only (the block concatenates).
    """

    def __init__(self, growth_rate=16, bottleneck_width=4, sync_batch_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.growth_rate = int(growth_rate)
        self.bottleneck_width = int(bottleneck_width)
        self.sync_batch_norm = bool(sync_batch_norm)

    def build(self, input_shape):
        mid = self.bottleneck_width * self.growth_rate
        self.bn1 = batch_norm(self.sync_batch_norm, "bn1")
        self.conv1 = keras.layers.Conv3D(
            mid, 1, use_bias=False, kernel_initializer="he_normal", name="conv1"
        )
        self.bn2 = batch_norm(self.sync_batch_norm, "bn2")
        # No bias: the output is concatenated and the next consumer starts with BatchNorm.
        self.conv2 = keras.layers.Conv3D(
            self.growth_rate,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            name="conv2",
        )
        shape = channels_shape(input_shape[-1])
        self.bn1.build(shape)
        self.conv1.build(shape)
        self.bn2.build(channels_shape(mid))
        self.conv2.build(channels_shape(mid))
        self.built = True

    def call(self, inputs, training=None):
        x = self.conv1(keras.ops.relu(self.bn1(inputs, training=training)))
        return self.conv2(keras.ops.relu(self.bn2(x, training=training)))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.growth_rate)

    def get_config(self):
        config = super().get_config()
        config.update(
            growth_rate=self.growth_rate,
            bottleneck_width=self.bottleneck_width,
            sync_batch_norm=self.sync_batch_norm,
        )
        return config


@keras.saving.register_keras_serializable(package="tf_agg3d")
class DenseBlock(keras.layers.Layer):
    """`num_layers` dense layers, each seeing the concatenation of all previous features.

    Args:
      num_layers: dense layers in the block (2 in Table I).
      growth_rate: channels added per layer (16 in the paper).
      bottleneck_width: bottleneck multiplier of each layer.
      sync_batch_norm: synchronized BatchNormalization across replicas.

    Call:
      inputs: [B, D, H, W, C].

    Returns:
      [B, D, H, W, C + num_layers * growth_rate].
    """

    def __init__(
        self, num_layers=2, growth_rate=16, bottleneck_width=4, sync_batch_norm=False, **kwargs
    ):
        super().__init__(**kwargs)
        self.num_layers = int(num_layers)
        self.growth_rate = int(growth_rate)
        self.bottleneck_width = int(bottleneck_width)
        self.sync_batch_norm = bool(sync_batch_norm)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        self.dense_layers = []
        for i in range(self.num_layers):
            layer = DenseLayer(
                self.growth_rate, self.bottleneck_width, self.sync_batch_norm, name=f"layer{i + 1}"
            )
            layer.build(channels_shape(channels))
            self.dense_layers.append(layer)
            channels += self.growth_rate
        track_sublayers(self, "dense_layer", self.dense_layers)
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        for layer in self.dense_layers:
            x = keras.ops.concatenate([x, layer(x, training=training)], axis=-1)
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], input_shape[-1] + self.num_layers * self.growth_rate)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_layers=self.num_layers,
            growth_rate=self.growth_rate,
            bottleneck_width=self.bottleneck_width,
            sync_batch_norm=self.sync_batch_norm,
        )
        return config


@keras.saving.register_keras_serializable(package="tf_agg3d")
class Transition(keras.layers.Layer):
    """BN-ReLU-Conv 1x1x1 to `filters` channels, then a 2x2x2 average pool when `pool`.

    Args:
      filters: output channels.
      pool: halve every spatial side with a 2x2x2 average pool (encoder transitions); without
        it the layer is the decoder's channel-reducing 1x1x1 conv.
      use_bias: bias on the conv; wanted where no BatchNorm follows (pyramid outputs).
      sync_batch_norm: synchronized BatchNormalization across replicas.

    Call:
      inputs: [B, D, H, W, C].

    Returns:
      [B, D/2, H/2, W/2, filters] with `pool`, else [B, D, H, W, filters].
    """

    def __init__(self, filters, pool=True, use_bias=False, sync_batch_norm=False, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.pool = bool(pool)
        self.use_bias = bool(use_bias)
        self.sync_batch_norm = bool(sync_batch_norm)

    def build(self, input_shape):
        self.bn = batch_norm(self.sync_batch_norm, "bn")
        self.conv = keras.layers.Conv3D(
            self.filters, 1, use_bias=self.use_bias, kernel_initializer="he_normal", name="conv"
        )
        shape = channels_shape(input_shape[-1])
        self.bn.build(shape)
        self.conv.build(shape)
        self.avg_pool = keras.layers.AveragePooling3D(2, name="pool") if self.pool else None
        self.built = True

    def call(self, inputs, training=None):
        x = self.conv(keras.ops.relu(self.bn(inputs, training=training)))
        return self.avg_pool(x) if self.pool else x

    def compute_output_shape(self, input_shape):
        spatial = input_shape[1:-1]
        if self.pool:
            spatial = tuple(None if n is None else n // 2 for n in spatial)
        return (input_shape[0], *spatial, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            pool=self.pool,
            use_bias=self.use_bias,
            sync_batch_norm=self.sync_batch_norm,
        )
        return config
