"""A development stand-in for ``tensorflow_model_server``: same gRPC API, same status codes.

TensorFlow Serving is not installable from PyPI, so tests (and anyone without Docker) run the
client against this server. It loads the SavedModels of one model's base path (TF-Serving's
``--model_base_path``, ``/models/agg3d/<version>/``; or the folder above it plus the model
name), serves the latest version by default or the versions asked for, and answers
``PredictionService`` (Predict, GetModelMetadata) and ``ModelService`` (GetModelStatus) with the
codes TF-Serving uses:

- unknown model or version: NOT_FOUND (``Servable not found for request: Latest(m)``);
- unknown version label: INVALID_ARGUMENT;
- unknown signature: FAILED_PRECONDITION (``Serving signature key "x" not found.``, as
  TF-Serving's predict_util does);
- missing/extra inputs, wrong dtype or rank, an empty volume, a volume over
  ``max_volume_shape``, a malformed tensor, unknown output filter: INVALID_ARGUMENT, naming the
  input and what was expected; all checked on the request's header before its tensor is
  decoded, so a request cannot make the server allocate more than it sent;
- a message over the size limit: RESOURCE_EXHAUSTED (gRPC's own check);
- more Predict calls than ``max_concurrent_requests`` running plus ``max_queued_requests``
  waiting: RESOURCE_EXHAUSTED, ``... retry after 0.4 s`` (and the trailing metadata
  ``retry-after-ms``), so memory stays bounded and clients back off;
- errors raised in the graph keep their TensorFlow code (e.g. the volume-size check's
  INVALID_ARGUMENT).

As TensorFlow Serving does, :meth:`DevServer.start` opens the port only once the initial
versions are loaded: a client that reaches a (re)started server never gets NOT_FOUND for a
version it is about to load; before that it gets UNAVAILABLE, which it retries. A request holds
its version until it finishes, so a version published meanwhile serves the new requests while
the old one finishes those in flight (:mod:`tf_agg3d.serving.servables`).

This module is the gRPC side: the two servicers, which validate requests as TF-Serving does,
the admission limit, and :class:`DevServer`, which listens (optionally with TLS) and polls.
Which versions exist, load and answer is :mod:`tf_agg3d.serving.servables` (version policy,
loading, warmup replay before AVAILABLE, TF-Serving's NOT_FOUND messages, the one-line report
of each poll); the protobufs are built and read through :mod:`tf_agg3d.serving.protos`, as the
client's are.

The base path and the TLS files may be ``s3://`` / ``gs://`` URLs; on object stores a version
is loaded only once its ``saved_model.pb`` is there (``docs/serving.md``).

Command line::

  python -m tf_agg3d.serving.dev_server --model_base_path /models/agg3d --port 8500 \\
      [--model-name agg3d] [--host 127.0.0.1] [--versions 3,4] [--poll-s 30] \\
      [--max-concurrent-requests 4 --max-queued-requests 8] [--max-volume-shape 512,512,512] \\
      [--tls-cert F --tls-key F]
  python -m tf_agg3d.serving.dev_server --model-base /models --model-name agg3d ...

Exit status: 0 after Ctrl-C, 1 for a TLS file it cannot read, a bad base path or a port in use,
2 for a bad flag or a missing optional package (tensorflow-io for s3://). The command line (its
flags and exit statuses) is :mod:`tf_agg3d.cli.serving` (``agg3d-serve``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

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

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _require_model_spec(request) -> None:
    if not request.HasField("model_spec"):
        raise RpcError(INVALID, "Missing ModelSpec")


def _abort(context, err: RpcError) -> None:
    if err.retry_after_s is not None:
        ms = str(max(1, round(err.retry_after_s * 1000)))
        context.set_trailing_metadata(((contract.RETRY_AFTER_METADATA, ms),))
    context.abort(err.code, err.message)


# --------------------------------------------------------------------------------------------
# Admission: a bounded number of Predict calls running and waiting
# --------------------------------------------------------------------------------------------


class Admission:
    """At most `max_running` Predict calls run and `max_queued` wait; the rest are refused.

    A refused call gets RESOURCE_EXHAUSTED with a retry hint: the recent mean call time times
    the calls ahead of it per running slot (0.05..30 s). Counters are kept for tests and
    benchmarks (:meth:`stats`).
    """

    def __init__(self, max_running: int, max_queued: int):
        if max_running < 1 or max_queued < 0:
            raise ValueError(
                f"max_concurrent_requests >= 1 and max_queued_requests >= 0 expected, got "
                f"{max_running} and {max_queued}"
            )
        self.max_running = int(max_running)
        self.max_queued = int(max_queued)
        self._cond = threading.Condition()
        self.running = self.queued = 0
        self.peak_running = self.peak_queued = 0
        self.admitted = self.rejected = 0
        self._mean_s = 0.5  # call time, exponentially averaged

    def retry_after_s(self) -> float:
        ahead = self.running + self.queued + 1
        return min(30.0, max(0.05, self._mean_s * ahead / self.max_running))

    @contextlib.contextmanager
    def admit(self, is_active: Callable[[], bool] = lambda: True) -> Iterator[None]:
        """Runs the block in a slot; RpcError RESOURCE_EXHAUSTED when the queue is full."""
        with self._cond:
            if self.running >= self.max_running and self.queued >= self.max_queued:
                self.rejected += 1
                wait = self.retry_after_s()
                raise RpcError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server overloaded: {self.running} Predict calls running and "
                    f"{self.queued} queued (max_concurrent_requests={self.max_running}, "
                    f"max_queued_requests={self.max_queued}); retry after {wait:.2f} s",
                    retry_after_s=wait,
                )
            self.queued += 1
            self.peak_queued = max(self.peak_queued, self.queued)
            try:
                while self.running >= self.max_running:
                    self._cond.wait(timeout=0.25)
                    if not is_active():  # the client gave up (deadline, cancel) while queued
                        raise RpcError(grpc.StatusCode.CANCELLED, "the call ended while queued")
            finally:
                self.queued -= 1
            self.running += 1
            self.admitted += 1
            self.peak_running = max(self.peak_running, self.running)
        start = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self.running -= 1
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - start)
                self._cond.notify()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "running": self.running,
                "queued": self.queued,
                "peak_running": self.peak_running,
                "peak_queued": self.peak_queued,
                "admitted": self.admitted,
                "rejected": self.rejected,
            }


# --------------------------------------------------------------------------------------------
# The services
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


def _check_port_free(host: str, port: int) -> None:
    """OSError naming the address when `port` is taken (checked before a long model load)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise OSError(
                f"cannot listen on {host}:{port}: port in use or host not local ({err.strerror})"
            ) from None


class DevServer:
    """The gRPC server: load, listen, serve; usable as a context manager.

    Args:
      model_base: the folder holding `<model_name>/<version>/` (or use `model_base_path`).
      model_name: the model name clients ask for (default: `model_base_path`'s basename, or
        ``agg3d`` with `model_base`).
      model_base_path: TF-Serving's ``--model_base_path``, the folder holding `<version>/`.
      host: interface to listen on; 127.0.0.1 keeps it private to this machine.
      port: TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
      versions: serve exactly these versions; None for the latest.
      version_labels: label -> version.
      max_message_bytes: gRPC send/receive limit (TF-Serving's default is INT32_MAX); also
        bounds any decoded input tensor.
      delay_s: sleep before each Predict (for deadline, overload and version tests).
      max_concurrent_requests: Predict calls running at once.
      max_queued_requests: Predict calls waiting for a slot; more get RESOURCE_EXHAUSTED with a
        retry hint. Memory is bounded by (running + queued + 4) requests.
      max_volume_shape: largest (D, H, W) of the ``volume`` input; None leaves the check to the
        model's graph (its export's ``max_volume_shape``).
      tls_cert, tls_key: PEM server certificate and key; both or neither.
      tls_client_ca: PEM CA that client certificates must chain to (mutual TLS).
      background_load: open the port first and load in a thread (clients see LOADING, then
        AVAILABLE) instead of loading before listening (the default, as TF-Serving).
      poll_s: re-scan the base path for versions this often (0: never).
      log: called with the one-line report of the start-up load and of each poll (default:
        absl logging).

    Raises:
      ValueError: a bad argument (both or neither base path, TLS half given, limits).
      OSError: a TLS file that cannot be read, or a port in use.
    """

    def __init__(
        self,
        model_base: str | None = None,
        model_name: str | None = None,
        *,
        model_base_path: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8500,
        versions: Sequence[int] | None = None,
        version_labels: Mapping[str, int] | None = None,
        max_message_bytes: int = contract.MAX_MESSAGE_BYTES,
        delay_s: float = 0.0,
        max_concurrent_requests: int = 4,
        max_queued_requests: int = 8,
        max_volume_shape: Sequence[int] | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_client_ca: str | None = None,
        background_load: bool = False,
        poll_s: float = 0.0,
        log: Callable[[str], None] | None = None,
    ):
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key: give both (PEM files) or neither")
        if max_volume_shape is not None and (
            len(max_volume_shape) != 3 or any(int(n) < 1 for n in max_volume_shape)
        ):
            raise ValueError(
                f"max_volume_shape: expected three positive sizes (D, H, W), got "
                f"{list(max_volume_shape)}"
            )
        self.admission = Admission(max_concurrent_requests, max_queued_requests)
        self.manager = ModelManager(
            model_base,
            model_name,
            versions,
            version_labels,
            model_base_path=model_base_path,
            log=log,
        )
        self.host = host
        self.port = int(port)
        self.background_load = background_load
        self.poll_s = float(poll_s)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._credentials = None
        if tls_cert:
            key = _read_tls_file(tls_key)
            cert = _read_tls_file(tls_cert)
            client_ca = _read_tls_file(tls_client_ca) if tls_client_ca else None
            self._credentials = grpc.ssl_server_credentials(
                [(key, cert)],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
        if self.port:
            _check_port_free(host, self.port)
        # Running + queued Predict calls, plus threads for status calls and quick refusals;
        # gRPC refuses calls beyond twice that itself (RESOURCE_EXHAUSTED), so nothing piles up.
        workers = self.admission.max_running + self.admission.max_queued + 4
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=workers),
            options=[
                ("grpc.max_receive_message_length", int(max_message_bytes)),
                ("grpc.max_send_message_length", int(max_message_bytes)),
                # A port in use is an error, not a second server sharing it.
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=2 * workers,
        )
        self.servicer = PredictionServicer(
            self.manager,
            delay_s,
            admission=self.admission,
            max_volume_shape=max_volume_shape,
            max_tensor_bytes=max_message_bytes,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            self.servicer, self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.manager), self._server
        )

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def _listen(self) -> None:
        address = f"{self.host}:{self.port}"
        if self._credentials is not None:
            bound = self._server.add_secure_port(address, self._credentials)
        else:
            bound = self._server.add_insecure_port(address)
        if not bound:
            raise OSError(f"cannot listen on {address}: port in use or host not local")
        self.port = bound

    def start(self) -> DevServer:
        """Loads the model, then opens the port and serves; returns self.

        With `background_load`, the port opens first and the versions load in a thread.

        Raises:
          OSError: the port cannot be opened.
        """
        if not self.background_load:
            self.manager.refresh()
        self._listen()
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

    def stats(self) -> dict[str, int]:
        """Predict admission counters: running, queued, their peaks, admitted, rejected."""
        return self.admission.stats()

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
