"""BatchNormalization synchronized across tf.distribute replicas that reproduces the
single-device training step.

Keras 3's ``BatchNormalization(synchronized=True)`` (TensorFlow backend,
``keras.src.backend.tensorflow.nn._compute_moments_sync``) all-reduces ``sum(x)``,
``sum(x**2)`` and the count. Its all-reduces and their gradients are right (in float64, two
replicas give the one-device gradients to 1e-13); its float32 arithmetic is not, on the
near-uniform feature maps of CT crops (two replicas vs one device: ~2% of the update after
one step of the tiny test model):

1. It takes ``variance = E[x**2] - E[x]**2``, which cancels catastrophically when
   ``|mean| >> std``, and its gradient worse: ``dL/dx_i`` is assembled from ``x_i * g`` and
   ``mean * g`` with ``g = dL/dvar ~ (var + eps)**-1.5``.
2. Every batch sum, forward (the moments) and backward (the gradients that reach the mean,
   the scale and the offset), is one ``tf.reduce_sum`` over all the reduced axes, which on
   CPU accumulates each channel's ``B * D * H * W`` values in a long run (relative error
   ~3e-4 for two 32^3 crops against float64) whose rounding depends on how the batch is split
   over replicas. The errors do not stay small: a rounding error in the mean leaves the
   variance's gradient with a nonzero batch sum, which a convolution fed a near-constant
   input (the first one on CT) multiplies by that input level. Two-pass moments still
   leave 1e-3 between two replicas and one device, and stock BatchNormalization on one
   device differs from this layer by ~2% of the first convolution's update.

This layer takes the two-pass moments (the mean, then the mean of ``(x - mean)**2``, as
``tf.nn.moments``) and computes every batch sum one axis at a time, innermost first: in the
forward pass, and in the backward pass through a custom gradient of the normalisation. The
last stage of every sum adds per-sample partial sums, over the batch axis on one device and in
the all-reduces (the moments' here, the gradients' in the trainer) across replicas, so one
device and any number of replicas compute the same numbers, up to the order in which more than
two partial sums are added. Two replicas vs one device, two steps of the test model: 2e-6 of
the update, except for biases that feed a BatchNormalization, whose true gradient is zero and
whose computed one is rounding noise.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tf_agg3d")
class SyncBatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` normalising, in training, with the moments of the
    global batch of all tf.distribute replicas, with the numerics of the module docstring.

    Weights (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``), their names, the
    moving-statistics update and the inference path are BatchNormalization's, so checkpoints
    and exported graphs are those of the stock layer (inference runs no collective op). In
    training, results differ from the stock layer's by the stock layer's float32 rounding.
    Masked training calls take the stock per-replica masked moments, as Keras' synchronized
    layer does. Batch renormalization is not supported.

    Args:
      synchronized: must stay True (the key is BatchNormalization's and comes back through
        ``get_config``); use ``keras.layers.BatchNormalization`` for per-replica statistics.
      **kwargs: ``keras.layers.BatchNormalization`` arguments (``epsilon``, ``momentum``, ...).

    Call:
      inputs: [B, ..., C] (any rank; the moments reduce every axis but ``axis``).
      training: normalise with the global batch moments and update the moving statistics.
      mask: optional [B, ...], the inputs' shape without the channel axis.

    Returns:
      The normalised inputs, same shape as ``inputs``, in the layer's compute dtype.
    """

    def __init__(self, synchronized=True, **kwargs):
        if not synchronized:
            raise ValueError(
                "SyncBatchNormalization is always synchronized; use "
                "keras.layers.BatchNormalization for per-replica statistics"
            )
        if kwargs.get("renorm"):
            raise ValueError("SyncBatchNormalization does not support renorm")
        super().__init__(synchronized=True, **kwargs)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None:
            return super().call(inputs, training=training, mask=mask)
        # Float32 at least, as BatchNormalization: float16 statistics overflow.
        x = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = self._global_moments(x)
        momentum = self.momentum
        self.moving_mean.assign(
            tf.cast(self.moving_mean, x.dtype) * momentum + mean * (1.0 - momentum)
        )
        self.moving_variance.assign(
            tf.cast(self.moving_variance, x.dtype) * momentum + variance * (1.0 - momentum)
        )
        inv = tf.math.rsqrt(variance + self.epsilon)
        if self.scale:
            inv = inv * tf.cast(self.gamma, x.dtype)
        offset = tf.cast(self.beta, x.dtype) if self.center else tf.zeros_like(mean)
        return tf.cast(self._normalize(x, mean, inv, offset), self.compute_dtype)

    def _global_moments(self, x):
        """[B, ..., C] -> mean, biased variance ([C] each) of all replicas' batches."""
        ctx = tf.distribute.get_replica_context()

        def global_sum(values):
            # None in a cross-replica context: this call sees the whole batch.
            return values if ctx is None else ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)

        count = tf.cast(tf.size(x) // tf.shape(x)[self.axis], x.dtype)
        # The count is all-reduced too: the last global batch may be split unevenly.
        total, count = global_sum([self._sum(x), count])
        mean = tf.math.divide_no_nan(total, count)
        # As in tf.nn.moments, no gradient through this mean: d/dmean sum((x - mean)**2) is
        # -2 * sum(x - mean) = 0 at the global mean.
        squares = self._sum(tf.math.squared_difference(x, tf.stop_gradient(mean)))
        return mean, tf.math.divide_no_nan(global_sum(squares), count)

    def _normalize(self, x, mean, inv, offset):
        """``(x - mean) * inv + offset`` ([C] operands broadcast along ``axis``), with the
        gradients' batch sums taken by :meth:`_sum` (autodiff's would be one reduce_sum)."""
        shape = [1] * x.shape.rank
        shape[self.axis] = -1

        @tf.custom_gradient
        def normalize(x, mean, inv, offset):
            centred = x - tf.reshape(mean, shape)

            def grad(dy):
                dy_sum = self._sum(dy)
                return (
                    dy * tf.reshape(inv, shape),
                    -dy_sum * inv,
                    self._sum(dy * centred),
                    dy_sum,
                )

            return centred * tf.reshape(inv, shape) + tf.reshape(offset, shape), grad

        return normalize(x, mean, inv, offset)

    def _sum(self, x):
        """[B, ..., C] -> [C]: sums over the reduction axes one at a time, innermost first."""
        for axis in sorted(self._reduction_axes, reverse=True):
            x = tf.reduce_sum(x, axis)
        return x
