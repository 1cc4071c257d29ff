"""Which float type whole-scan inference computes the backbone in (``inference.precision``).

``float32`` and ``bfloat16`` are taken as they are. ``auto`` is decided once per process from
facts that do not fluctuate (no timing calibration, whose result would depend on the load of
the machine and make findings differ from run to run):

- bfloat16 when TensorFlow's oneDNN kernels are on (``TF_ENABLE_ONEDNN_OPTS``, which
  ``import tf_agg3d`` sets) **and** the CPU computes bfloat16 natively: its flags (Linux
  ``/proc/cpuinfo``) include ``avx512_bf16`` or ``amx_bf16`` (Cooper Lake, Sapphire Rapids and
  later Xeons; Zen 4 and later EPYCs). There oneDNN's bf16 convolutions run on AVX512-BF16
  dot-product or AMX tile instructions: on this project's AMX-capable 2-core CI machine a
  24-channel 3x3x3 convolution ran ~5x faster than in float32, the whole stem ~2x (its
  memory-bound parts do not speed up as much);
- float32 everywhere else: without native instructions oneDNN emulates bf16 (slower than
  float32), Eigen's bf16 kernels are slower still, and a visible GPU (float32 is what was
  tested there) also keeps float32.

bfloat16 has an 8-bit mantissa: the pyramid features differ from float32 by ~1 % of their
range, the scores of a trained model's findings by ~1e-3 (measured <= 1.6e-3, bounded at 0.05
in ``tests/models/test_tiled_whole_scan.py``).
Exported SavedModels resolve ``auto`` to float32 (the serving host's CPU is unknown there);
see ``docs/serving.md``.
"""

from __future__ import annotations

import functools
import os

PRECISIONS = ("auto", "float32", "bfloat16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_cpu() -> bool:
    """Whether the CPU has bfloat16 dot-product (AVX512-BF16) or AMX-BF16 instructions."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels in this process."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "0") == "1"


def gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


@functools.lru_cache(maxsize=1)
def auto_precision() -> str:
    """What ``auto`` means in this process: ``"bfloat16"`` or ``"float32"`` (see module doc)."""
    if onednn_enabled() and native_bf16_cpu() and not gpu_visible():
        return "bfloat16"
    return "float32"


def resolve_precision(setting: str) -> str:
    """``"float32"`` or ``"bfloat16"`` for an ``inference.precision`` setting.

    Raises:
      ValueError: a setting not in :data:`PRECISIONS`.
    """
    if setting not in PRECISIONS:
        raise ValueError(f"precision {setting!r} not in {list(PRECISIONS)}")
    return auto_precision() if setting == "auto" else setting
