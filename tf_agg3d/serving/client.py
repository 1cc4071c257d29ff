"""gRPC client for the exported detector on TF-Serving (or the development server).

The client does what the graph does not: it reads a scan (MHD, NIfTI, NRRD, DICOM folder),
preprocesses it exactly as training did (the exported model's own ``preprocess`` config, read
from its ``metadata`` signature), sends one Predict request per scan, and maps the boxes back
to world mm through the preprocessing affine (cache voxel ``(z, y, x, 1)`` -> world
``(x, y, z, 1)``, README "Conventions").

Library use::

  with Agg3DClient("localhost:8500") as client:
      client.wait_until_ready(timeout_s=120)
      findings = client.detect("scan.mhd")             # list[Finding], world mm
      results = client.detect_many(paths, max_concurrency=4)

Command line::

  python -m tf_agg3d.serving.client --target HOST:PORT --scan PATH [--scan PATH ...] \\
      [--model agg3d] [--version N] --out findings.csv \\
      [--tls --ca-cert F --client-cert F --client-key F] [--deadline S]

This module holds :class:`Agg3DClient`'s calls (Predict, metadata, status) and its detection
of scans. Every call goes through :mod:`tf_agg3d.serving.channel` (TLS, connection waits,
retries); volumes, per-scan results and the output CSV are :mod:`tf_agg3d.serving.scans`;
requests and replies are built and read through :mod:`tf_agg3d.serving.protos`, shared with the
development server. The command line (its flags and exit statuses) is
:mod:`tf_agg3d.cli.serving` (``agg3d-client``).

Every failure is a :class:`~tf_agg3d.serving.errors.ServingError` (or a
:class:`~tf_agg3d.data.errors.DataError` for an unreadable scan) whose message says what to do;
the command line prints it without a traceback. Scans, the output CSV and the TLS files may be
``s3://`` / ``gs://`` URLs (``s3://`` needs tensorflow-io; exit status 2 without it).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from tf_agg3d.config import ConfigError, PreprocessConfig, from_dict
from tf_agg3d.inference.predictor import Finding, findings_from_detections, scan_uid
from tf_agg3d.serving import contract, protos
from tf_agg3d.serving.channel import RetryingChannel
from tf_agg3d.serving.errors import ServingError
from tf_agg3d.serving.scans import ScanResult, as_int16_volume, voxel_affine


class Agg3DClient:
    """Calls an exported agg3d model on TF-Serving over gRPC.

    Thread-safe: one channel is shared by every call, so :meth:`detect_many` and
    :meth:`submit` run several scans at once over it.

    Args:
      target: ``HOST:PORT`` of the gRPC endpoint (TF-Serving's default port is 8500).
      model_name: ``model_spec.name``.
      version: a specific version; None for what the server considers latest.
      version_label: a version label (e.g. ``stable``) instead of a number.
      signature: the whole-scan signature.
      tls: use TLS (``ca_cert`` defaults to the system roots).
      ca_cert, client_cert, client_key: PEM files; the client pair enables mutual TLS.
      server_name: TLS name to verify instead of the target's host (tests, tunnels).
      deadline_s: per-call deadline for Predict (a whole scan takes tens of seconds on CPU),
        retries included: a call is retried only while its deadline lasts.
      retries: at most this many extra attempts (None: as many as the deadline allows) for
        UNAVAILABLE (server down, starting or restarting), a connection not made within
        `connect_timeout_s`, and RESOURCE_EXHAUSTED from an overloaded server (one that says
        "retry after"; a message over the size limit is not retried).
      backoff_s, max_backoff_s: first and largest wait between attempts (doubled each time,
        with jitter so that many clients do not retry in lockstep); an overloaded server's
        retry hint is waited at least. Also gRPC's reconnect backoff.
      connect_timeout_s: longest wait for a connection in one attempt (a host that does not
        answer, a port open but not serving); then the call is retried.
      max_message_bytes: gRPC send/receive limit; a whole scan exceeds gRPC's 4 MiB default.
      preprocess_config: preprocessing to use instead of the model's own (from its metadata).
      max_concurrency: worker threads of :meth:`submit` / :meth:`detect_many`.
    """

    def __init__(
        self,
        target: str,
        model_name: str = contract.MODEL_NAME,
        version: int | None = None,
        *,
        version_label: str | None = None,
        signature: str = contract.DETECT_SIGNATURE,
        tls: bool = False,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        server_name: str | None = None,
        deadline_s: float = 600.0,
        retries: int | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        connect_timeout_s: float = 10.0,
        max_message_bytes: int = contract.MAX_MESSAGE_BYTES,
        preprocess_config: PreprocessConfig | None = None,
        max_concurrency: int = 4,
    ):
        if version is not None and version_label:
            raise ValueError("version and version_label: give at most one")
        if bool(client_cert) != bool(client_key):
            raise ValueError("client_cert and client_key: give both (mutual TLS) or neither")
        if deadline_s <= 0:
            raise ValueError(f"deadline_s: expected > 0 seconds, got {deadline_s}")
        self.target = target
        self.model_name = model_name
        self.version = None if version is None else int(version)
        self.version_label = version_label or None
        self.signature = signature
        self.deadline_s = float(deadline_s)
        self.max_concurrency = max(1, int(max_concurrency))
        self._preprocess = preprocess_config
        self._info: dict | None = None
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._channel = RetryingChannel(
            target,
            tls=tls,
            ca_cert=ca_cert,
            client_cert=client_cert,
            client_key=client_key,
            server_name=server_name,
            retries=retries,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            connect_timeout_s=connect_timeout_s,
            max_message_bytes=max_message_bytes,
        )
        self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(
            self._channel.channel
        )
        self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel.channel)

    # -- plumbing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel and the worker threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._channel.close()

    def __enter__(self) -> Agg3DClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spec(self) -> dict[str, Any]:
        """The model, version and label every request names (keywords of ``protos``)."""
        return {
            "model_name": self.model_name,
            "version": self.version,
            "version_label": self.version_label,
        }

    def _call(self, method: Callable, request, *, deadline_s: float, signature: str | None):
        """Calls `method` through the retrying channel; raises ServingError on failure."""
        asked = {
            "model": self.model_name,
            "version": self.version,
            "version_label": self.version_label,
            "signature": signature,
        }
        return self._channel.call(method, request, deadline_s=deadline_s, asked=asked)

    # -- raw calls -----------------------------------------------------------------------------

    def predict(
        self,
        inputs: Mapping[str, Any],
        signature: str | None = None,
        output_filter: Sequence[str] = (),
        deadline_s: float | None = None,
    ) -> tuple[dict[str, np.ndarray], int]:
        """One Predict call.

        Args:
          inputs: input key -> numpy array or TensorProto.
          signature: signature name (default: the client's).
          output_filter: output keys to return (default: all).
          deadline_s: this call's deadline (default: the client's).

        Returns:
          (outputs as numpy arrays, the version that answered).
        """
        signature = signature or self.signature
        request = protos.predict_request(
            inputs, signature=signature, output_filter=output_filter, **self._spec()
        )
        response = self._call(
            self._predict_stub.Predict,
            request,
            deadline_s=deadline_s or self.deadline_s,
            signature=signature,
        )
        outputs = {k: protos.to_numpy(v) for k, v in response.outputs.items()}
        return outputs, int(response.model_spec.version.value)

    def get_model_metadata(self, deadline_s: float = 30.0) -> dict[str, Any]:
        """The served version's signatures (GetModelMetadata ``signature_def``).

        Returns:
          ``{"version": int, "signatures": {name: {"inputs": {key: {"dtype", "shape"}},
          "outputs": {...}}}}``; unknown dimensions are -1.
        """
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        protos.fill_model_spec(request.model_spec, **self._spec())
        request.metadata_field.append("signature_def")
        response = self._call(
            self._predict_stub.GetModelMetadata, request, deadline_s=deadline_s, signature=None
        )
        signature_defs = protos.unpack_signature_defs(response)
        return {
            "version": int(response.model_spec.version.value),
            "signatures": {
                name: {
                    "inputs": protos.describe_tensors(sig.inputs),
                    "outputs": protos.describe_tensors(sig.outputs),
                }
                for name, sig in sorted(signature_defs.items())
            },
        }

    def get_model_status(self, deadline_s: float = 10.0) -> list[dict[str, Any]]:
        """GetModelStatus of the model (or the client's version).

        Returns:
          One dict per version: ``version``, ``state`` (``START``, ``LOADING``, ``AVAILABLE``,
          ``UNLOADING``, ``END``), ``error_code``, ``error_message``.
        """
        request = get_model_status_pb2.GetModelStatusRequest()
        protos.fill_model_spec(request.model_spec, **self._spec())
        response = self._call(
            self._model_stub.GetModelStatus, request, deadline_s=deadline_s, signature=None
        )
        return [
            {
                "version": int(s.version),
                "state": protos.state_name(s.state),
                "error_code": int(s.status.error_code),
                "error_message": s.status.error_message,
            }
            for s in response.model_version_status
        ]

    def wait_until_ready(self, timeout_s: float = 120.0, poll_s: float = 1.0) -> int:
        """Waits until a version the client would use is AVAILABLE; returns that version.

        Raises:
          ServingError: not ready within `timeout_s` (the message gives the last status), or a
            version that failed to load.
        """
        end = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            try:
                statuses = self.get_model_status()
                available = [s["version"] for s in statuses if s["state"] == "AVAILABLE"]
                if available:
                    return max(available)
                failed = [s for s in statuses if s["state"] == "END" and s["error_message"]]
                if failed and self.version is not None:
                    raise ServingError(
                        f"model '{self.model_name}' version {self.version} at {self.target} "
                        f"failed to load: {failed[0]['error_message']}"
                    )
                last = ", ".join(f"version {s['version']}: {s['state']}" for s in statuses)
            except ServingError as err:
                if err.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
                last = str(err)
            if time.monotonic() >= end:
                raise ServingError(
                    f"model '{self.model_name}' at {self.target} not ready after "
                    f"{timeout_s:g} s (last status: {last})",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            time.sleep(poll_s)

    def model_info(self) -> dict[str, Any]:
        """The model's metadata (``metadata`` signature): contract, config, anchors, version."""
        with self._lock:
            if self._info is None:
                outputs, _ = self.predict(
                    {}, signature=contract.METADATA_SIGNATURE, deadline_s=min(self.deadline_s, 60)
                )
                raw = outputs[contract.METADATA_OUTPUT]
                text = raw.item() if hasattr(raw, "item") else raw
                try:
                    self._info = json.loads(
                        text.decode("utf-8") if isinstance(text, bytes) else text
                    )
                except (ValueError, UnicodeDecodeError) as err:
                    raise ServingError(
                        f"model '{self.model_name}' at {self.target}: its metadata signature "
                        f"returned something that is not JSON ({err})"
                    ) from None
            return self._info

    def preprocess_config(self) -> PreprocessConfig:
        """The preprocessing the model was trained with (from its metadata), or the override."""
        if self._preprocess is None:
            info = self.model_info()
            try:
                self._preprocess = from_dict(
                    PreprocessConfig, dict(info.get("preprocess", {})), prefix="preprocess"
                )
            except ConfigError as err:
                raise ServingError(
                    f"model '{self.model_name}' at {self.target}: metadata field "
                    f"'preprocess' is not a valid PreprocessConfig ({err})"
                ) from None
        return self._preprocess

    # -- detection -----------------------------------------------------------------------------

    def detect_volume(self, volume: Any) -> dict[str, np.ndarray]:
        """Runs the whole-scan signature on a preprocessed HU volume.

        Args:
          volume: [D, H, W] HU at the model's spacing (int16; floats are rounded).

        Returns:
          numpy dict: ``boxes`` [N, 4] (z, y, x, d voxels), ``scores``, ``rpn_scores``,
          ``fpr_scores`` [N], ``num_detections``, and ``version`` (the version that answered).
        """
        try:
            array = as_int16_volume(volume)
        except ValueError as err:
            raise ServingError(str(err)) from None
        outputs, version = self.predict({contract.VOLUME_INPUT: protos.int16_tensor_proto(array)})
        missing = [k for k in contract.DETECT_OUTPUTS if k not in outputs]
        if missing:
            raise ServingError(
                f"model '{self.model_name}' at {self.target}, signature '{self.signature}': "
                f"reply lacks outputs {missing}; expected {list(contract.DETECT_OUTPUTS)}"
            )
        outputs["version"] = np.asarray(version)
        return outputs

    def detect(
        self,
        volume_or_path: Any,
        affine: Any = None,
    ) -> list[Finding]:
        """Findings of one scan, in world mm.

        Args:
          volume_or_path: a scan path (MHD/NIfTI/NRRD/DICOM folder), read and preprocessed
            here with the model's preprocessing; or an already preprocessed [D, H, W] volume.
          affine: for a volume, its 4x4 voxel (z, y, x, 1) -> world (x, y, z, 1) affine (the
            cache sidecar's); None reports positions as voxel indices (x, y, z) times the
            model's spacing.

        Returns:
          Findings, best first.

        Raises:
          ServingError: the call failed (message says why and what to do).
          DataError: an unreadable scan.
        """
        if isinstance(volume_or_path, (str, bytes)) or hasattr(volume_or_path, "__fspath__"):
            _, findings = self._detect_path(str(volume_or_path))
            return findings
        if affine is None:
            affine = voxel_affine(self._spacing_mm())
        return findings_from_detections(self.detect_volume(volume_or_path), affine)

    def _spacing_mm(self) -> float:
        if self._preprocess is not None:
            return float(self._preprocess.spacing_mm)
        try:
            return float(self.preprocess_config().spacing_mm)
        except ServingError:
            return 1.0

    def _detect_path(self, path: str) -> tuple[str, list[Finding]]:
        from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
        from tf_agg3d.data.readers.sitk import read_scan

        config = self.preprocess_config()
        scan = read_scan(path)
        volume, meta = preprocess_scan(scan, None, config, seriesuid=scan_uid(path))
        self._check_size(volume.shape, path)
        return scan_uid(path), findings_from_detections(self.detect_volume(volume), meta["affine"])

    def _check_size(self, shape: Sequence[int], path: str) -> None:
        """Refuses a volume over the model's maximum before sending hundreds of MiB."""
        try:
            info = self.model_info()
        except ServingError:
            return  # a model without metadata still checks the size in its graph
        limit = (
            info.get("signatures", {})
            .get(contract.DETECT_SIGNATURE, {})
            .get("inputs", {})
            .get(contract.VOLUME_INPUT, {})
            .get("max_shape")
        )
        if limit and any(int(n) > int(m) for n, m in zip(shape, limit, strict=False)):
            raise ServingError(
                f"{path}: preprocessed volume {list(shape)} exceeds the model's maximum "
                f"{list(limit)} (D, H, W voxels at 1 mm)",
                code=grpc.StatusCode.INVALID_ARGUMENT,
            )

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.max_concurrency, thread_name_prefix="agg3d-client"
                )
            return self._executor

    def submit(self, volume_or_path: Any, affine: Any = None) -> concurrent.futures.Future:
        """:meth:`detect` in a worker thread (at most `max_concurrency` at once)."""
        return self._pool().submit(self.detect, volume_or_path, affine)

    def detect_many(
        self,
        paths: Iterable[str],
        max_concurrency: int | None = None,
        on_result: Callable[[ScanResult], None] | None = None,
    ) -> list[ScanResult]:
        """Findings of many scans, at most `max_concurrency` in flight (reading included).

        A scan that fails does not stop the others: its :class:`ScanResult` holds the error,
        whose message names the scan. Each call is retried as
        :meth:`~tf_agg3d.serving.channel.RetryingChannel.call` says, so a server restart
        shorter than the deadline costs no scan.

        Args:
          paths: scan files or DICOM folders.
          max_concurrency: scans in flight (default: the client's); bounds memory too, since
            each in-flight scan holds its volume.
          on_result: called (from a worker thread) as each scan finishes, e.g. for progress.

        Returns:
          One :class:`ScanResult` per path, in the order given.
        """
        paths = [str(p) for p in paths]
        workers = max(1, int(max_concurrency or self.max_concurrency))

        def one(path: str) -> ScanResult:
            start = time.perf_counter()
            try:
                uid, findings = self._detect_path(path)
                result = ScanResult(path, uid, findings, time.perf_counter() - start)
            except Exception as err:  # noqa: BLE001 - reported per scan, not raised
                if isinstance(err, ServingError) and path not in str(err):
                    # The call's error says what failed; name the scan it failed for.
                    err = ServingError(f"scan {path}: {err}", code=err.code, details=err.details)
                result = ScanResult(path, scan_uid(path), [], time.perf_counter() - start, err)
            if on_result is not None:
                on_result(result)
            return result

        with concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="agg3d-scan"
        ) as pool:
            return list(pool.map(one, paths))


if __name__ == "__main__":
    # `python -m tf_agg3d.serving.client` is the `agg3d-client` command of the CLI layer.
    from tf_agg3d.cli.serving import run_client

    run_client()
