"""The tf.data training input: crops from the cache, augmentation, anchor targets."""
