"""TF-Serving's gRPC messages, built and read in one place for the client, server and exporter.

The client (:mod:`tf_agg3d.serving.client`), the development server
(:mod:`tf_agg3d.serving.dev_server`, :mod:`tf_agg3d.serving.servables`) and the warmup file of
an export (:mod:`tf_agg3d.serving.publishing`) speak the same protobufs; what they share lives
here:

- tensors: :func:`tensor_proto` / :func:`int16_tensor_proto` (numpy -> ``TensorProto``) and
  :func:`to_numpy` (back);
- dtype and shape text: :func:`dtype_name` (numpy spelling, for clients),
  :func:`cpp_dtype_name` (TensorFlow's C++ spelling, as TF-Serving's messages use it),
  :func:`shape_dims`, :func:`shape_text`, :func:`describe_tensors`;
- requests: :func:`fill_model_spec` (model, version or label, signature) and
  :func:`predict_request`;
- ``signature_def`` metadata: :func:`pack_signature_defs` / :func:`unpack_signature_defs`;
- status: :data:`VersionState`, :func:`state_name` (model version states) and
  :func:`grpc_code` (a TensorFlow error code as the gRPC status a server answers with);
- warmup: :func:`warmup_record` / :func:`warmup_requests`, the ``PredictionLog`` records of
  ``assets.extra/tf_serving_warmup_requests``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    prediction_log_pb2,
)

# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def int16_tensor_proto(volume: np.ndarray) -> tensor_pb2.TensorProto:
    """An int16 TensorProto carrying `volume` as raw little-endian ``tensor_content``.

    ``tensor_content`` is one bytes field: 2 bytes a voxel on the wire, where the repeated
    ``int_val`` field would spend up to 3 bytes of varint per voxel and far more CPU.
    """
    array = np.ascontiguousarray(volume, dtype="<i2")
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(n)) for n in array.shape]
    )
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_INT16, tensor_shape=shape, tensor_content=array.tobytes()
    )


def tensor_proto(value: Any) -> tensor_pb2.TensorProto:
    """`value` as a TensorProto: a TensorProto as given, anything else through numpy."""
    if isinstance(value, tensor_pb2.TensorProto):
        return value
    return tf.make_tensor_proto(np.asarray(value))


def to_numpy(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """The numpy array a TensorProto carries (any error of a malformed proto propagates)."""
    return tf.make_ndarray(proto)


# --------------------------------------------------------------------------------------------
# Dtypes and shapes
# --------------------------------------------------------------------------------------------

# TensorFlow's C++ DataTypeString spells these differently from Python's dtype names, and
# TF-Serving's messages use the C++ spelling.
_CPP_DTYPE_NAMES = {"float32": "float", "float64": "double", "float16": "half"}


def dtype_name(enum: int) -> str:
    """numpy-style name of a DataType enum (``float32``, ``int16``)."""
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return types_pb2.DataType.Name(enum)


def cpp_dtype_name(enum: int) -> str:
    """TensorFlow's C++ name of a DataType enum (``float``, ``int16``), as TF-Serving says it."""
    try:
        name = tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"DataType({enum})"
    return _CPP_DTYPE_NAMES.get(name, name)


def shape_dims(shape: tensor_shape_pb2.TensorShapeProto) -> list[int] | None:
    """The sizes of a TensorShapeProto (-1 for an unknown one); None for an unknown rank."""
    if shape.unknown_rank:
        return None
    return [d.size for d in shape.dim]


def shape_text(dims: Sequence[int]) -> str:
    """``[?, 4]`` for dims ``[-1, 4]``."""
    return "[" + ", ".join("?" if d < 0 else str(d) for d in dims) + "]"


def describe_tensors(infos: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A signature's TensorInfos as ``{key: {"dtype": "int16", "shape": [-1, ...] | None}}``."""
    return {
        key: {"dtype": dtype_name(info.dtype), "shape": shape_dims(info.tensor_shape)}
        for key, info in sorted(infos.items())
    }


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


def fill_model_spec(
    spec,
    model_name: str,
    *,
    version: int | None = None,
    version_label: str | None = None,
    signature: str | None = None,
) -> None:
    """Fills a request's ``model_spec``: the model, a version or else a label, the signature."""
    spec.name = model_name
    if version is not None:
        spec.version.value = version
    elif version_label:
        spec.version_label = version_label
    if signature is not None:
        spec.signature_name = signature


def predict_request(
    inputs: Mapping[str, Any],
    model_name: str,
    *,
    version: int | None = None,
    version_label: str | None = None,
    signature: str | None = None,
    output_filter: Sequence[str] = (),
) -> predict_pb2.PredictRequest:
    """A PredictRequest; `inputs` maps input keys to numpy arrays or TensorProtos."""
    request = predict_pb2.PredictRequest()
    fill_model_spec(
        request.model_spec,
        model_name,
        version=version,
        version_label=version_label,
        signature=signature,
    )
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


# --------------------------------------------------------------------------------------------
# signature_def metadata (GetModelMetadata)
# --------------------------------------------------------------------------------------------


def pack_signature_defs(response, signature_defs: Mapping[str, Any]) -> None:
    """Puts `signature_defs` into a GetModelMetadataResponse's ``signature_def`` field."""
    signatures = get_model_metadata_pb2.SignatureDefMap()
    for key, value in signature_defs.items():
        signatures.signature_def[key].CopyFrom(value)
    response.metadata["signature_def"].Pack(signatures)


def unpack_signature_defs(response) -> dict[str, Any]:
    """The SignatureDefs of a GetModelMetadataResponse, by signature name."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    return dict(signature_map.signature_def)


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------

VersionState = get_model_status_pb2.ModelVersionStatus.State
_STATE_NAMES = dict((v, k) for k, v in VersionState.items())
# TensorFlow's error codes are gRPC's (both come from absl::StatusCode).
_GRPC_CODE = {code.value[0]: code for code in grpc.StatusCode}


def state_name(state: int) -> str:
    """``AVAILABLE`` etc. for a model version state (the number as text if unknown)."""
    return _STATE_NAMES.get(state, str(state))


def grpc_code(tf_error_code: int) -> grpc.StatusCode:
    """The gRPC status for a TensorFlow error code (``OpError.error_code``); UNKNOWN if none."""
    return _GRPC_CODE.get(tf_error_code, grpc.StatusCode.UNKNOWN)


# --------------------------------------------------------------------------------------------
# Warmup requests (assets.extra/tf_serving_warmup_requests)
# --------------------------------------------------------------------------------------------


def warmup_record(request: predict_pb2.PredictRequest) -> bytes:
    """One TFRecord of a warmup file: `request` as a serialised ``PredictionLog``."""
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    return log.SerializeToString()


def warmup_requests(path: str) -> Iterator[predict_pb2.PredictRequest]:
    """The PredictRequests of a warmup file, in order (logs of other calls are skipped)."""
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        if log.HasField("predict_log"):
            yield log.predict_log.request
