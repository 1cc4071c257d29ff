"""The development server's gRPC services, answering as TensorFlow Serving does.

:class:`PredictionServicer` (Predict, GetModelMetadata) and :class:`ModelServicer`
(GetModelStatus) over a :class:`~tf_agg3d.serving.servables.ModelManager`. A Predict request is
validated on its header (signature, input names, dtype, rank, shape, the server's
``max_volume_shape`` and tensor-size limits) before any tensor is decoded, so a request cannot
make the server allocate more than it sent, and every refusal carries TF-Serving's status code
and, where TF-Serving has one, its message. A call runs in an
:class:`~tf_agg3d.serving.admission.Admission` slot; errors raised in the graph keep their
TensorFlow code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tf_agg3d.serving import contract, protos
from tf_agg3d.serving.admission import Admission
from tf_agg3d.serving.errors import RpcError
from tf_agg3d.serving.servables import ModelManager, ServedVersion

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _require_model_spec(request) -> None:
    if not request.HasField("model_spec"):
        raise RpcError(INVALID, "Missing ModelSpec")


def _abort(context, err: RpcError) -> None:
    if err.retry_after_s is not None:
        ms = str(max(1, round(err.retry_after_s * 1000)))
        context.set_trailing_metadata(((contract.RETRY_AFTER_METADATA, ms),))
    context.abort(err.code, err.message)


def _dtype_size(enum: int) -> int:
    try:
        return max(1, int(tf.dtypes.as_dtype(enum).size))
    except TypeError:
        return 1


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata over a :class:`ModelManager` (Classify etc. UNIMPLEMENTED).

    Args:
      manager: the model's versions.
      delay_s: sleep this long (in a running slot, holding the version) before each Predict,
        to exercise client deadlines, overload and version changes.
      admission: the running/queued limit (default: 4 running, 8 queued).
      max_volume_shape: largest (D, H, W) of the ``volume`` input; None leaves the limit to
        the model's graph.
      max_tensor_bytes: largest decoded input tensor (a tensor sent as a short value list
        must not expand beyond what a message could carry).
    """

    def __init__(
        self,
        manager: ModelManager,
        delay_s: float = 0.0,
        *,
        admission: Admission | None = None,
        max_volume_shape: Sequence[int] | None = None,
        max_tensor_bytes: int = contract.MAX_MESSAGE_BYTES,
    ):
        self.manager = manager
        self.delay_s = float(delay_s)
        self.admission = admission or Admission(4, 8)
        self.max_volume_shape = tuple(int(n) for n in max_volume_shape or ()) or None
        self.max_tensor_bytes = int(max_tensor_bytes)
        manager.predict_fn = self.predict_on

    def _check_tensor(self, index: int, key: str, proto, spec) -> None:
        """Validates one input's header (dtype, shape, size) before it is decoded."""
        if proto.dtype != spec.dtype:
            raise RpcError(
                INVALID,
                f"Expects arg[{index}] ('{key}') to be {protos.cpp_dtype_name(spec.dtype)} "
                f"but {protos.cpp_dtype_name(proto.dtype)} is provided",
            )
        got = protos.shape_dims(proto.tensor_shape)
        if got is None or any(n < 0 for n in got):
            raise RpcError(
                INVALID,
                f"input '{key}': expected a fully known shape, got "
                f"{'unknown rank' if got is None else protos.shape_text(got)}",
            )
        want = protos.shape_dims(spec.tensor_shape)
        if want is not None and (
            len(want) != len(got) or any(w >= 0 and w != g for w, g in zip(want, got, strict=True))
        ):
            raise RpcError(
                INVALID,
                f"input '{key}': expected shape {protos.shape_text(want)} "
                f"(rank {len(want)}), got {protos.shape_text(got)}",
            )
        if key == contract.VOLUME_INPUT and len(got) == 3:
            if min(got) < 1:
                raise RpcError(
                    INVALID,
                    f"input '{key}': empty volume {protos.shape_text(got)}; expected int16 "
                    f"[D, H, W] with every side >= 1",
                )
            limit = self.max_volume_shape
            if limit and any(g > m for g, m in zip(got, limit, strict=True)):
                raise RpcError(
                    INVALID,
                    f"input '{key}': volume {protos.shape_text(got)} exceeds the server's "
                    f"max_volume_shape {protos.shape_text(limit)} (D, H, W voxels at 1 mm)",
                )
        elements = 1
        for n in got:
            elements *= n
        size = elements * _dtype_size(proto.dtype)
        if proto.tensor_content and len(proto.tensor_content) != size:
            raise RpcError(
                INVALID,
                f"input '{key}': tensor_content holds {len(proto.tensor_content)} bytes, but "
                f"shape {protos.shape_text(got)} of {protos.cpp_dtype_name(proto.dtype)} "
                f"needs {size}",
            )
        if size > self.max_tensor_bytes:
            raise RpcError(
                INVALID,
                f"input '{key}': shape {protos.shape_text(got)} would decode to {size} bytes, "
                f"over the server's limit of {self.max_tensor_bytes}",
            )

    def predict_on(self, entry: ServedVersion, request) -> predict_pb2.PredictResponse:
        """Runs a PredictRequest on one loaded version, validating as TF-Serving does."""
        name = request.model_spec.signature_name or contract.DEFAULT_SIGNATURE
        if name not in entry.signature_defs:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.'
            )
        signature = entry.signature_defs[name]
        sent, expected = set(request.inputs), set(signature.inputs)
        if len(sent) != len(expected):
            raise RpcError(
                INVALID,
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}.",
            )
        unknown = sorted(sent - expected)
        if unknown:
            raise RpcError(
                INVALID,
                f"input tensor alias not found in signature: {unknown[0]}. Inputs expected to "
                f"be in the set {{{','.join(sorted(expected))}}}.",
            )
        outputs = list(request.output_filter) or sorted(signature.outputs)
        for alias in outputs:
            if alias not in signature.outputs:
                raise RpcError(
                    INVALID,
                    f"output tensor alias not found in signature: {alias} Outputs expected to "
                    f"be in the set {{{','.join(sorted(signature.outputs))}}}.",
                )
        if len(set(outputs)) != len(outputs):
            raise RpcError(INVALID, "duplicate output tensor alias")
        for index, key in enumerate(sorted(expected)):
            self._check_tensor(index, key, request.inputs[key], signature.inputs[key])
        feeds = {}
        for key in sorted(expected):
            try:
                array = protos.to_numpy(request.inputs[key])
            except Exception as err:  # noqa: BLE001 - any malformed TensorProto
                raise RpcError(INVALID, f"tensor parsing error: {key} ({err})") from None
            feeds[key] = tf.constant(array)
        try:
            result = entry.loaded.signatures[name](**feeds)
        except tf.errors.OpError as err:
            raise RpcError(protos.grpc_code(err.error_code), err.message) from None
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.manager.model_name
        response.model_spec.version.value = entry.version
        response.model_spec.signature_name = name
        for alias in outputs:
            response.outputs[alias].CopyFrom(protos.tensor_proto(result[alias].numpy()))
        return response

    def Predict(self, request, context):  # noqa: N802 - gRPC method name
        try:
            _require_model_spec(request)
            with (
                self.admission.admit(context.is_active),
                self.manager.lease(request.model_spec) as entry,
            ):
                if self.delay_s > 0:
                    time.sleep(self.delay_s)
                    if not context.is_active():
                        return predict_pb2.PredictResponse()
                return self.predict_on(entry, request)
        except RpcError as err:
            _abort(context, err)

    def GetModelMetadata(self, request, context):  # noqa: N802 - gRPC method name
        try:
            _require_model_spec(request)
            if not request.metadata_field:
                raise RpcError(
                    INVALID,
                    "GetModelMetadataRequest must specify at least one metadata_field",
                )
            entry = self.manager.resolve(request.model_spec)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = self.manager.model_name
            response.model_spec.version.value = entry.version
            for field in request.metadata_field:
                if field != "signature_def":
                    raise RpcError(INVALID, f"Metadata field {field} is not supported")
                protos.pack_signature_defs(response, entry.signature_defs)
            return response
        except RpcError as err:
            _abort(context, err)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus over a :class:`ModelManager` (HandleReloadConfigRequest UNIMPLEMENTED)."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):  # noqa: N802 - gRPC method name
        try:
            _require_model_spec(request)
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else None
            if spec.WhichOneof("version_choice") == "version_label":
                version = self.manager.labelled_version(spec.version_label)
            response = get_model_status_pb2.GetModelStatusResponse()
            for entry in self.manager.statuses(spec.name, version):
                status = response.model_version_status.add()
                status.version = entry.version
                status.state = entry.state
                if entry.error:
                    status.status.error_code = grpc.StatusCode.UNKNOWN.value[0]
                    status.status.error_message = entry.error
            return response
        except RpcError as err:
            _abort(context, err)
