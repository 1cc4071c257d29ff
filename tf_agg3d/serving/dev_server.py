"""A development stand-in for ``tensorflow_model_server``: same gRPC API, same status codes.

TensorFlow Serving is not installable from PyPI, so tests (and anyone without Docker) run the
client against this server. It loads the SavedModels of a TF-Serving model base path
(``BASE/<model>/<version>/``), serves the latest version by default or the versions asked for,
and answers ``PredictionService`` (Predict, GetModelMetadata) and ``ModelService``
(GetModelStatus) with the codes TF-Serving uses:

- unknown model or version: NOT_FOUND (``Servable not found for request: Latest(m)``);
- unknown version label: INVALID_ARGUMENT;
- unknown signature: FAILED_PRECONDITION (``Serving signature key "x" not found.``, as
  TF-Serving's predict_util does);
- missing/extra inputs, wrong dtype or rank, unknown output filter: INVALID_ARGUMENT;
- a message over the size limit: RESOURCE_EXHAUSTED (gRPC's own check);
- errors raised in the graph keep their TensorFlow code (e.g. the volume-size check's
  INVALID_ARGUMENT).

This module is the gRPC side: the two servicers, which validate requests as TF-Serving does,
and :class:`DevServer`, which listens (optionally with TLS) and polls. Which versions exist,
load and answer is :mod:`tf_agg3d.serving.servables` (version policy, loading, warmup replay
before AVAILABLE, TF-Serving's NOT_FOUND messages); the protobufs are built and read through
:mod:`tf_agg3d.serving.protos`, as the client's are.

The base path and the TLS files may be ``s3://`` / ``gs://`` URLs; on object stores a version
is loaded only once its ``saved_model.pb`` is there (``docs/serving.md``).

Command line::

  python -m tf_agg3d.serving.dev_server --model-base BASE --model-name agg3d --port 8500 \\
      [--host 127.0.0.1] [--versions 3,4] [--poll-s 30] [--tls-cert F --tls-key F]

Exit status: 0 after Ctrl-C, 1 for a TLS file it cannot read, a bad base path or a port in use,
2 for a bad flag or a missing optional package (tensorflow-io for s3://). The command line (its
flags and exit statuses) is :mod:`tf_agg3d.cli.serving` (``agg3d-serve``).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Mapping, Sequence

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
from tf_agg3d.serving.errors import RpcError
from tf_agg3d.serving.servables import ModelManager, ServedVersion
from tf_agg3d.utils import io as io_utils


def _require_model_spec(request) -> None:
    if not request.HasField("model_spec"):
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata over a :class:`ModelManager` (Classify etc. UNIMPLEMENTED).

    Args:
      manager: the model's versions.
      delay_s: sleep this long before each Predict (to exercise client deadlines).
    """

    def __init__(self, manager: ModelManager, delay_s: float = 0.0):
        self.manager = manager
        self.delay_s = float(delay_s)
        manager.predict_fn = self.predict_on

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
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}.",
            )
        unknown = sorted(sent - expected)
        if unknown:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input tensor alias not found in signature: {unknown[0]}. Inputs expected to "
                f"be in the set {{{','.join(sorted(expected))}}}.",
            )
        feeds = {}
        for index, key in enumerate(sorted(expected)):
            proto, spec = request.inputs[key], signature.inputs[key]
            if proto.dtype != spec.dtype:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expects arg[{index}] ('{key}') to be {protos.cpp_dtype_name(spec.dtype)} "
                    f"but {protos.cpp_dtype_name(proto.dtype)} is provided",
                )
            try:
                array = protos.to_numpy(proto)
            except Exception as err:  # noqa: BLE001 - any malformed TensorProto
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {key} ({err})"
                ) from None
            want = protos.shape_dims(spec.tensor_shape)
            if want is not None:
                got = list(array.shape)
                if len(want) != len(got) or any(
                    w >= 0 and w != g for w, g in zip(want, got, strict=True)
                ):
                    raise RpcError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"input '{key}': expected shape {protos.shape_text(want)} "
                        f"(rank {len(want)}), got {protos.shape_text(got)}",
                    )
            feeds[key] = tf.constant(array)
        outputs = list(request.output_filter) or sorted(signature.outputs)
        for alias in outputs:
            if alias not in signature.outputs:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} Outputs expected to "
                    f"be in the set {{{','.join(sorted(signature.outputs))}}}.",
                )
        if len(set(outputs)) != len(outputs):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "duplicate output tensor alias")
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
            entry = self.manager.resolve(request.model_spec)
            if self.delay_s > 0:
                time.sleep(self.delay_s)
                if not context.is_active():
                    return predict_pb2.PredictResponse()
            return self.predict_on(entry, request)
        except RpcError as err:
            context.abort(err.code, err.message)

    def GetModelMetadata(self, request, context):  # noqa: N802 - gRPC method name
        try:
            _require_model_spec(request)
            if not request.metadata_field:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field",
                )
            entry = self.manager.resolve(request.model_spec)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = self.manager.model_name
            response.model_spec.version.value = entry.version
            for field in request.metadata_field:
                if field != "signature_def":
                    raise RpcError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"Metadata field {field} is not supported",
                    )
                protos.pack_signature_defs(response, entry.signature_defs)
            return response
        except RpcError as err:
            context.abort(err.code, err.message)


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
            context.abort(err.code, err.message)


class DevServer:
    """The gRPC server: load, listen, serve; usable as a context manager.

    Args:
      model_base: TF-Serving base path holding `<model_name>/<version>/`.
      model_name: the model name clients ask for.
      host: interface to listen on; 127.0.0.1 keeps it private to this machine.
      port: TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
      versions: serve exactly these versions; None for the latest.
      version_labels: label -> version.
      max_message_bytes: gRPC send/receive limit (TF-Serving's default is INT32_MAX).
      delay_s: sleep before each Predict (for deadline tests).
      max_workers: concurrent requests.
      tls_cert, tls_key: PEM server certificate and key; both or neither.
      tls_client_ca: PEM CA that client certificates must chain to (mutual TLS).
      background_load: open the port first and load versions in a thread (as TF-Serving
        does; clients see LOADING, then AVAILABLE) instead of loading before listening.
      poll_s: re-scan the base path for versions this often (0: never).
    """

    def __init__(
        self,
        model_base: str,
        model_name: str = contract.MODEL_NAME,
        *,
        host: str = "127.0.0.1",
        port: int = 8500,
        versions: Sequence[int] | None = None,
        version_labels: Mapping[str, int] | None = None,
        max_message_bytes: int = contract.MAX_MESSAGE_BYTES,
        delay_s: float = 0.0,
        max_workers: int = 4,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_client_ca: str | None = None,
        background_load: bool = False,
        poll_s: float = 0.0,
    ):
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key: give both (PEM files) or neither")
        self.manager = ModelManager(model_base, model_name, versions, version_labels)
        self.host = host
        self.port = int(port)
        self.background_load = background_load
        self.poll_s = float(poll_s)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=max_workers),
            options=[
                ("grpc.max_receive_message_length", int(max_message_bytes)),
                ("grpc.max_send_message_length", int(max_message_bytes)),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.manager, delay_s), self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.manager), self._server
        )
        address = f"{host}:{self.port}"
        if tls_cert:
            key = _read_tls_file(tls_key)
            cert = _read_tls_file(tls_cert)
            client_ca = _read_tls_file(tls_client_ca) if tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(key, cert)],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            bound = self._server.add_secure_port(address, credentials)
        else:
            bound = self._server.add_insecure_port(address)
        if not bound:
            raise OSError(f"cannot listen on {address}: port in use or host not local")
        self.port = bound

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> DevServer:
        """Loads (or starts loading) the model and starts serving; returns self."""
        if not self.background_load:
            self.manager.refresh()
        self._server.start()
        if self.background_load:
            self._spawn(self.manager.refresh)
        if self.poll_s > 0:
            self._spawn(self._poll)
        return self

    def _spawn(self, fn) -> None:
        thread = threading.Thread(target=fn, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.manager.refresh()

    def stop(self, grace: float | None = 1.0) -> None:
        """Stops serving (in-flight calls get `grace` seconds)."""
        self._stop.set()
        self._server.stop(grace).wait()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# TLS material
# --------------------------------------------------------------------------------------------


def _read_tls_file(path: str) -> bytes:
    """A PEM file's bytes, local or URL; OSError naming the file when it cannot be read."""
    try:
        return io_utils.read_bytes(path)
    except tf.errors.OpError as err:
        # main reports OSError as a one-line error; a storage error is the same situation.
        raise OSError(f"{path}: cannot read TLS file ({err.message})") from None


if __name__ == "__main__":
    # `python -m tf_agg3d.serving.dev_server` is the `agg3d-serve` command of the CLI layer.
    from tf_agg3d.cli.serving import run_serve

    run_serve()
