"""tf_agg3d: 3D Aggregated Faster R-CNN for small, sparse lesions in CT (TensorFlow / Keras 3)."""

import os

# TensorFlow's x86 wheels enable oneDNN only on CPUs with AVX-512 VNNI/AMX; elsewhere the stock
# Conv3D kernels run a training step ~5x slower (bench/input_pipeline.py reports steps/s).
# The flag is read when TensorFlow is imported, so it has to be set before; an explicit
# TF_ENABLE_ONEDNN_OPTS=0 from the user wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
