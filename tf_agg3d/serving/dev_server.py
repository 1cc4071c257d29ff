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

This module is :class:`DevServer`, which listens (optionally with TLS), loads and polls. The
gRPC services, which validate requests as TF-Serving does, are
:mod:`tf_agg3d.serving.servicers`; the running/queued limit is
:mod:`tf_agg3d.serving.admission`. Which versions exist, load and answer is
:mod:`tf_agg3d.serving.servables` (version policy, loading, warmup replay before AVAILABLE,
TF-Serving's NOT_FOUND messages, the one-line report of each poll); the protobufs are built and
read through :mod:`tf_agg3d.serving.protos`, as the client's are.

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
import socket
import threading
from collections.abc import Callable, Mapping, Sequence

import grpc
import tensorflow as tf
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from tf_agg3d.serving import contract
from tf_agg3d.serving.admission import Admission
from tf_agg3d.serving.servables import ModelManager
from tf_agg3d.serving.servicers import ModelServicer, PredictionServicer
from tf_agg3d.utils.files import read_bytes


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


def _read_tls_file(path: str) -> bytes:
    """A PEM file's bytes, local or URL; OSError naming the file when it cannot be read."""
    try:
        return read_bytes(path)
    except tf.errors.OpError as err:
        # main reports OSError as a one-line error; a storage error is the same situation.
        raise OSError(f"{path}: cannot read TLS file ({err.message})") from None


if __name__ == "__main__":
    # `python -m tf_agg3d.serving.dev_server` is the `agg3d-serve` command of the CLI layer.
    from tf_agg3d.cli.serving import run_serve

    run_serve()
