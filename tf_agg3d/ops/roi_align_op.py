"""The C++/CUDA 3D RoI Align op (``custom_ops/roi_align_3d``) with a pure-TF fallback.

``roi_align_3d_fast`` has the signature and semantics of
``tf_agg3d.ops.roi_align.roi_align_3d`` (the reference, see its docstring) and equals it
within 1e-5 forward and 1e-4 in gradient. The library is loaded lazily on first use; when it is
missing, was built for another TensorFlow minor version, or fails to load, the call falls back
to the pure-TF path and says so in one log line per process. Graphs meant for TF-Serving must
use the pure-TF op: stock TF-Serving cannot load custom ops.

Environment:
    TF_AGG3D_ROI_ALIGN_SO: path of the library to load instead of the in-tree build.
    TF_AGG3D_DISABLE_CUSTOM_OP: set to 1 to always use the pure-TF path.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from types import ModuleType

import tensorflow as tf
from absl import logging

from tf_agg3d.ops.roi_align import roi_align_3d, roi_align_entry

__all__ = [
    "OpLibraryError",
    "custom_op_available",
    "default_library_path",
    "load_op_library",
    "roi_align_3d_fast",
]

ENV_SO = "TF_AGG3D_ROI_ALIGN_SO"
ENV_DISABLE = "TF_AGG3D_DISABLE_CUSTOM_OP"
_BUILD_HINT = "build it with `make op` (python custom_ops/roi_align_3d/build.py)"


class OpLibraryError(RuntimeError):
    """The custom-op library is missing, built for another TensorFlow, or failed to load."""


def default_library_path() -> Path:
    """The library to load: ``$TF_AGG3D_ROI_ALIGN_SO`` or the in-tree build."""
    if os.environ.get(ENV_SO):
        return Path(os.environ[ENV_SO])
    repo = Path(__file__).resolve().parents[2]
    return repo / "custom_ops" / "roi_align_3d" / "_roi_align_3d.so"


def _tf_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def load_op_library(path: str | os.PathLike | None = None) -> ModuleType:
    """Loads the op library after checking that it was built for this TensorFlow.

    A custom op's ABI is tied to the TensorFlow minor version it was compiled against, so the
    JSON written next to the ``.so`` by build.py (same stem, ``.json``) must name this minor.

    Args:
        path: the ``.so``; default ``default_library_path()``.

    Returns:
        The module returned by ``tf.load_op_library`` (``roi_align3d``, ``roi_align3d_grad``).

    Raises:
        OpLibraryError: with the reason and how to fix it.
    """
    so = Path(path) if path is not None else default_library_path()
    if not so.is_file():
        raise OpLibraryError(f"3D RoI Align op library {so} not found; {_BUILD_HINT}")
    record = so.with_suffix(".json")
    try:
        meta = json.loads(record.read_text())
        built_for = str(meta["tensorflow_version"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OpLibraryError(
            f"{so} has no readable build record {record.name} ({err}); {_BUILD_HINT}"
        ) from err
    if _tf_minor(built_for) != _tf_minor(tf.__version__):
        raise OpLibraryError(
            f"{so} was built for TensorFlow {built_for} but this is TensorFlow {tf.__version__}: a "
            f"custom op only works with the TensorFlow minor version it was built for; rebuild: "
            f"{_BUILD_HINT}"
        )
    try:
        return tf.load_op_library(str(so))
    except (tf.errors.OpError, OSError) as err:
        raise OpLibraryError(f"loading {so} failed: {err}; {_BUILD_HINT}") from err


_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": module or None once tried; "why": reason if None.


def _library() -> ModuleType | None:
    """The default library, loaded once per process; None (logged once) if unusable."""
    with _lock:
        if "lib" not in _state:
            if os.environ.get(ENV_DISABLE, "") not in ("", "0"):
                _state["lib"], _state["why"] = None, f"disabled by {ENV_DISABLE}"
            else:
                try:
                    _state["lib"], _state["why"] = load_op_library(), None
                except OpLibraryError as err:
                    _state["lib"], _state["why"] = None, str(err)
            if _state["lib"] is None:
                logging.warning("3D RoI Align: using the pure-TF path (%s)", _state["why"])
        return _state["lib"]  # type: ignore[return-value]


def custom_op_available() -> bool:
    """Whether ``roi_align_3d_fast`` runs the custom op (loads the library if needed)."""
    return _library() is not None


@tf.RegisterGradient("RoiAlign3D")
def _roi_align_3d_grad(op: tf.Operation, grad: tf.Tensor) -> list[tf.Tensor | None]:
    """Gradient w.r.t. the features through RoiAlign3DGrad; boxes and indices get none."""
    lib = _library()
    if lib is None:  # Unreachable in practice: the forward op exists only if the library loaded.
        raise OpLibraryError("RoiAlign3D gradient requested but the op library is not loaded")
    grad_features = lib.roi_align3d_grad(
        grads=grad,
        boxes=op.inputs[1],
        box_indices=op.inputs[2],
        features_shape=tf.shape(op.inputs[0], out_type=tf.int32),
        output_size=op.get_attr("output_size"),
        sampling_ratio=op.get_attr("sampling_ratio"),
        spatial_scale=op.get_attr("spatial_scale"),
        aligned=op.get_attr("aligned"),
    )
    return [grad_features, None, None]


@roi_align_entry
def roi_align_3d_fast(
    f: tf.Tensor, b: tf.Tensor, idx: tf.Tensor, o: int, s: int, spatial_scale: float, aligned: bool
) -> tf.Tensor:
    """3D RoI Align through the custom op, else the pure-TF reference.

    Same contract as ``tf_agg3d.ops.roi_align.roi_align_3d`` (see there for the coordinate
    convention). The op computes in float32 or float64; float16 / bfloat16 features are cast to
    float32 and the result back, as the reference does.

    Args:
        features: [B, D, H, W, C] float.
        boxes: [R, 6] as (z1, y1, x1, z2, y2, x2), voxel i spanning [i, i + 1) before scaling.
        box_indices: [R] int, batch item of each box, in [0, B) (InvalidArgumentError if not).
        output_size: bins per axis, o.
        sampling_ratio: samples per bin and axis, > 0.
        spatial_scale: factor from box to feature coordinates (a float32 attribute).
        aligned: Detectron2's ``aligned`` flag.

    Returns:
        [R, o, o, o, C] tensor of ``features.dtype``.

    Raises:
        ValueError: wrong static ranks or arguments, naming the argument.
    """
    lib = _library()
    if lib is None:
        return roi_align_3d(f, b, idx, o, s, spatial_scale, aligned)
    return lib.roi_align3d(
        features=f,
        boxes=b,
        box_indices=idx,
        output_size=o,
        sampling_ratio=s,
        spatial_scale=float(spatial_scale),
        aligned=bool(aligned),
    )
