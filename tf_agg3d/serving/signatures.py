"""What goes into an exported SavedModel: the serving signatures, the metadata, stock ops only.

:class:`Agg3DExportModule` wraps a :class:`~tf_agg3d.models.whole_scan.WholeScanDetector`
and owns the signatures ``serving_default``/``detect`` (a whole scan in, detections out),
``detect_crop`` (inference windows in, per-crop proposals out) and ``metadata`` (the JSON of
:func:`build_metadata`). :func:`saved_model_op_types` and :func:`non_stock_op_types` prove that
no custom op went into a graph stock TF-Serving must run.

Writing a version is :mod:`tf_agg3d.serving.publishing`; the export contract and why it uses
stock ops only are in ``docs/serving.md``.
"""

from __future__ import annotations

import datetime
import json
import types
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow as tf
import yaml

import tf_agg3d
from tf_agg3d.config import ExperimentConfig, to_dict
from tf_agg3d.serving import contract
from tf_agg3d.serving.errors import ExportError
from tf_agg3d.utils import files as io_utils

# Op types of this project's compiled RoI Align; stock TF-Serving cannot load a graph using them.
CUSTOM_OP_TYPES = frozenset({"RoiAlign3D", "RoiAlign3DGrad"})


# --------------------------------------------------------------------------------------------
# The signatures
# --------------------------------------------------------------------------------------------


def _input_dtype(fn: Any) -> tf.DType | None:
    """The dtype a tf.function with an input_signature expects, None when it takes any."""
    signature = getattr(fn, "input_signature", None)
    if signature:
        return signature[0].dtype
    return None


class Agg3DExportModule(tf.Module):
    """Owns the serving signatures of one exported detector version.

    Args:
      whole_scan: a ``WholeScanDetector`` (``detect(volume)``, ``detect_crops(crops)``) whose
        detector already uses the pure-TF RoI Align.
      config: the experiment config the detector was trained with; its YAML goes into the
        metadata so that clients preprocess exactly as training did.
      version: the model version this export becomes.
      model_name: the TF-Serving model name.
      max_volume_shape: largest (D, H, W) the ``detect`` signature accepts; larger volumes fail
        in the graph with INVALID_ARGUMENT.
      extra_metadata: more JSON-serialisable entries for the metadata (e.g. the checkpoint).
    """

    def __init__(
        self,
        whole_scan: Any,
        config: ExperimentConfig,
        *,
        version: int,
        model_name: str = contract.MODEL_NAME,
        max_volume_shape: Sequence[int] = contract.MAX_VOLUME_SHAPE,
        extra_metadata: Mapping[str, Any] | None = None,
    ):
        super().__init__(name="agg3d_export")
        if len(max_volume_shape) != 3 or any(int(n) < 1 for n in max_volume_shape):
            raise ExportError(
                f"max_volume_shape: expected three positive sizes (D, H, W), got "
                f"{tuple(max_volume_shape)}"
            )
        # The detector is deliberately kept out of the SavedModel's object graph: a Keras
        # model there brings its own traced call (pyramid dicts keyed by int stride, which the
        # SavedModel format cannot encode) and nothing a server needs. The signatures below
        # capture its weights, which are tracked through `model_variables` instead.
        # The exported detect graph runs the whole-scan module's own path (inference.mode:
        # tiles by default, one Predict call per scan either way) in the precision its
        # for_export() picks: inference.precision auto becomes float32, because the serving
        # host's CPU is unknown here (docs/serving.md, "Export contract").
        for_export = getattr(whole_scan, "for_export", None)
        if callable(for_export):
            whole_scan = for_export()
        self._untracked = types.SimpleNamespace(whole_scan=whole_scan)
        detector = getattr(whole_scan, "detector", None)
        self.model_variables = list(getattr(detector, "variables", None) or [])
        self._max_shape = tuple(int(n) for n in max_volume_shape)
        self._window = tuple(int(n) for n in config.inference.window_size)
        # Kept as text: a dict attribute of a tf.Module would be wrapped for tracking.
        self._metadata_json = json.dumps(
            build_metadata(
                config,
                version=version,
                model_name=model_name,
                max_volume_shape=self._max_shape,
                extra=extra_metadata,
            ),
            sort_keys=True,
        )
        # No autograph: the wrappers have no tensor-dependent Python control flow, and their
        # contract errors (ExportError) must surface as themselves, not as StagingError.
        self.detect = tf.function(
            self._detect,
            autograph=False,
            input_signature=[
                tf.TensorSpec([None, None, None], tf.int16, name=contract.VOLUME_INPUT)
            ],
        )
        self.detect_crop = tf.function(
            self._detect_crop,
            autograph=False,
            input_signature=[
                tf.TensorSpec([None, *self._window], tf.int16, name=contract.CROPS_INPUT)
            ],
        )
        self.metadata = tf.function(self._metadata, autograph=False, input_signature=[])

    @property
    def whole_scan_detector(self) -> Any:
        """The wrapped ``WholeScanDetector`` (not part of the saved object graph)."""
        return self._untracked.whole_scan

    @property
    def metadata_dict(self) -> dict[str, Any]:
        """The export's metadata (a fresh copy)."""
        return json.loads(self._metadata_json)

    def _check_volume(self, volume: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(volume)
        limit = tf.constant(self._max_shape, tf.int32)
        ok = tf.logical_and(tf.reduce_all(shape >= 1), tf.reduce_all(shape <= limit))
        d, h, w = self._max_shape
        check = tf.debugging.Assert(
            ok,
            [
                f"volume: expected int16 [D, H, W] (z, y, x), preprocessed HU at 1 mm, with "
                f"1 <= D <= {d}, 1 <= H <= {h}, 1 <= W <= {w}; got shape",
                shape,
            ],
            summarize=3,
            name="check_volume_shape",
        )
        with tf.control_dependencies([check]):
            return tf.identity(volume)

    def _detect(self, volume: tf.Tensor) -> dict[str, tf.Tensor]:
        volume = self._check_volume(volume)
        wanted = _input_dtype(self.whole_scan_detector.detect)
        if wanted is not None and wanted != volume.dtype:
            volume = tf.cast(volume, wanted)
        out = self.whole_scan_detector.detect(volume)
        missing = [k for k in contract.DETECT_OUTPUTS if k not in out]
        if missing:
            raise ExportError(
                f"whole_scan.detect: expected outputs {list(contract.DETECT_OUTPUTS)}, "
                f"missing {missing}"
            )
        result = {
            "boxes": tf.cast(out["boxes"], tf.float32),
            "scores": tf.cast(out["scores"], tf.float32),
            "rpn_scores": tf.cast(out["rpn_scores"], tf.float32),
            "fpr_scores": tf.cast(out["fpr_scores"], tf.float32),
            "num_detections": tf.cast(out["num_detections"], tf.int32),
        }
        if "num_windows" in out:
            # Cost of the call, for clients' logs and capacity planning.
            result["num_windows"] = tf.cast(out["num_windows"], tf.int32)
        return result

    def _detect_crop(self, crops: tf.Tensor) -> dict[str, tf.Tensor]:
        wanted = _input_dtype(self.whole_scan_detector.detect_crops)
        if wanted is not None and wanted != crops.dtype:
            crops = tf.cast(crops, wanted)
        out = self.whole_scan_detector.detect_crops(crops)
        if not isinstance(out, Mapping):
            raise ExportError(
                f"whole_scan.detect_crops: expected a dict of tensors, got {type(out).__name__}"
            )
        # Signature outputs are named by their keys; float64 would only double the reply.
        return {
            str(k): tf.cast(v, tf.float32) if v.dtype == tf.float64 else tf.identity(v)
            for k, v in out.items()
        }

    def _metadata(self) -> dict[str, tf.Tensor]:
        return {contract.METADATA_OUTPUT: tf.constant(self._metadata_json)}

    def signatures(self) -> dict[str, Any]:
        """The concrete functions to save, keyed by signature name."""
        detect = self.detect.get_concrete_function()
        return {
            contract.DEFAULT_SIGNATURE: detect,
            contract.DETECT_SIGNATURE: detect,
            contract.CROP_SIGNATURE: self.detect_crop.get_concrete_function(),
            contract.METADATA_SIGNATURE: self.metadata.get_concrete_function(),
        }


def build_metadata(
    config: ExperimentConfig,
    *,
    version: int,
    model_name: str = contract.MODEL_NAME,
    max_volume_shape: Sequence[int] = contract.MAX_VOLUME_SHAPE,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata of an export: what a client needs to call it correctly.

    Returns:
      A JSON-serialisable dict with the model name and version, the input contract, the
      outputs, the anchors, the inference settings and the full config as YAML.
    """
    pre = config.preprocess
    anchors = config.model.anchors
    window = [int(n) for n in config.inference.window_size]
    metadata = {
        "model_name": model_name,
        "version": int(version),
        "tf_agg3d_version": tf_agg3d.__version__,
        "tensorflow_version": tf.__version__,
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "signatures": {
            contract.DETECT_SIGNATURE: {
                "aliases": [contract.DEFAULT_SIGNATURE],
                "inputs": {
                    contract.VOLUME_INPUT: {
                        "dtype": "int16",
                        "shape": ["D", "H", "W"],
                        "axes": "z, y, x",
                        "units": "HU",
                        "spacing_mm": pre.spacing_mm,
                        "min_shape": [1, 1, 1],
                        "max_shape": [int(n) for n in max_volume_shape],
                        "preprocessing": (
                            "tf_agg3d.data.preprocessing.cache_entry.preprocess_scan(scan, None, "
                            "config.preprocess): resampled to spacing_mm, lungs cropped, "
                            "fill_hu outside the dilated lung mask"
                        ),
                    }
                },
                "outputs": {
                    "boxes": "float32 [N, 4]: z, y, x centre and diameter d, voxels of the input",
                    "scores": "float32 [N]: final score, mean of RPN and FPRN probabilities",
                    "rpn_scores": "float32 [N]: RPN probability",
                    "fpr_scores": "float32 [N]: FPRN probability",
                    "num_detections": "int32 []: N",
                    "num_windows": "int32 []: sliding windows run (when the detector reports it)",
                },
            },
            contract.CROP_SIGNATURE: {
                "inputs": {
                    contract.CROPS_INPUT: {"dtype": "int16", "shape": ["B", *window]},
                },
                "outputs": "padded per-crop proposals and scores (see saved_model_cli)",
            },
            contract.METADATA_SIGNATURE: {"outputs": {contract.METADATA_OUTPUT: "this JSON"}},
        },
        "affine": (
            "the preprocessing meta's 4x4 affine maps input voxel (z, y, x, 1) to world "
            "(x, y, z, 1) mm; diameter_mm = d * spacing_mm"
        ),
        "preprocess": to_dict(pre),
        "inference": to_dict(config.inference),
        "anchors": {
            "strides": list(anchors.strides),
            "sizes_mm": [list(s) for s in anchors.sizes],
            "cell_centre": "cell j of stride s is centred on input voxel j * s + (s - 1) / 2",
        },
        "config_yaml": yaml.safe_dump(to_dict(config), sort_keys=False),
    }
    if extra:
        metadata.update(dict(extra))
    return metadata


# --------------------------------------------------------------------------------------------
# Stock ops only
# --------------------------------------------------------------------------------------------


def saved_model_op_types(export_dir: str) -> set[str]:
    """Every op type used by a SavedModel: its graph defs and their function libraries.

    Calls of library functions (node ops named after a function) are left out; their bodies
    are listed instead.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    path = io_utils.join(export_dir, contract.SAVED_MODEL_PB)
    try:
        proto.ParseFromString(io_utils.read_bytes(path))
    except (OSError, tf.errors.OpError) as err:
        raise ExportError(f"{path}: cannot read the SavedModel ({err})") from None
    ops: set[str] = set()
    functions: set[str] = set()
    for meta_graph in proto.meta_graphs:
        graph = meta_graph.graph_def
        ops.update(node.op for node in graph.node)
        for fn in graph.library.function:
            functions.add(fn.signature.name)
            ops.update(node.op for node in fn.node_def)
    return ops - functions


def non_stock_op_types(op_types: set[str]) -> list[str]:
    """The op types a stock TensorFlow (Serving) build cannot run, sorted.

    Those are the ones not registered in this process, plus this project's custom ops, which
    are registered here only because their library happened to be loaded.
    """
    from tensorflow.python.framework import op_def_registry

    return sorted(op for op in op_types if op in CUSTOM_OP_TYPES or op_def_registry.get(op) is None)
