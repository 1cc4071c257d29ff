"""tf_agg3d: 3D Aggregated Faster R-CNN for small, sparse lesions in CT (TensorFlow / Keras 3)."""

import os
import sys

# TensorFlow's x86 wheels enable oneDNN only on CPUs with AVX-512 VNNI/AMX; elsewhere the stock
# Conv3D kernels run a training step ~5x slower (bench/input_pipeline.py reports steps/s).
# The flag is read when TensorFlow is imported, so it has to be set before; an explicit
# TF_ENABLE_ONEDNN_OPTS=0 from the user wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def _quiet_commands() -> None:
    # Commands are quiet by default: TensorFlow's C++ INFO lines only with -v/--verbosity. The
    # level is read when TensorFlow is imported, and this package is imported before any
    # command module (and so before TensorFlow); tf_agg3d/utils/verbosity.py has the rules.
    from tf_agg3d.utils import verbosity

    if verbosity.running_as_command(sys.argv):
        verbosity.quiet_native_logs(sys.argv)


_quiet_commands()

__version__ = "0.1.0"
