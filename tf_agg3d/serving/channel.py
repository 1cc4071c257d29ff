"""The client's gRPC channel: TLS, message limits, connection waits and retries.

:class:`RetryingChannel` is what :class:`~tf_agg3d.serving.client.Agg3DClient` sends every
call through. It owns one channel (thread-safe, shared by all calls), waits for a connection at
most ``connect_timeout_s`` per attempt, retries what is worth retrying (UNAVAILABLE, a
connection not made, an overloaded server's RESOURCE_EXHAUSTED) with jittered exponential
backoff while the call's deadline lasts, and turns the final failure into a
:class:`~tf_agg3d.serving.errors.ServingError` whose message says what to do
(:func:`~tf_agg3d.serving.errors.explain_status`).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from tf_agg3d.serving import contract
from tf_agg3d.serving.errors import ServingError, explain_status
from tf_agg3d.utils.files import read_bytes


def _read_tls_file(path: str | None) -> bytes | None:
    if not path:
        return None
    import tensorflow as tf

    try:
        return read_bytes(path)
    except OSError as err:
        raise ServingError(f"{path}: cannot read TLS file ({err.strerror})") from None
    except tf.errors.OpError as err:  # a URL
        raise ServingError(f"{path}: cannot read TLS file ({err.message})") from None


def _retry_hint(err: grpc.RpcError) -> float:
    """An overloaded server's retry hint in seconds; 0 for any other RESOURCE_EXHAUSTED.

    The development server sends ``retry-after-ms`` and says "retry after"; gRPC's own limit
    on concurrent calls says "Concurrent RPC limit exceeded". A message over the size limit has
    neither, and is not worth retrying.
    """
    try:
        for key, value in err.trailing_metadata() or ():
            if key == contract.RETRY_AFTER_METADATA:
                return max(0.001, float(value) / 1000.0)
    except (TypeError, ValueError):
        pass
    details = err.details() or ""
    if "retry after" in details or "Concurrent RPC limit exceeded" in details:
        return 0.001
    return 0.0


class RetryingChannel:
    """A gRPC channel to `target` whose calls are retried while their deadline lasts.

    Args:
      target: ``HOST:PORT`` of the gRPC endpoint.
      tls: use TLS (``ca_cert`` defaults to the system roots).
      ca_cert, client_cert, client_key: PEM files; the client pair enables mutual TLS.
      server_name: TLS name to verify instead of the target's host (tests, tunnels).
      retries: at most this many extra attempts (None: as many as the deadline allows).
      backoff_s, max_backoff_s: first and largest wait between attempts; also gRPC's
        reconnect backoff.
      connect_timeout_s: longest wait for a connection in one attempt.
      max_message_bytes: gRPC send/receive limit.

    Raises:
      ServingError: a TLS file that cannot be read.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        ca_cert: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        server_name: str | None = None,
        retries: int | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        connect_timeout_s: float = 10.0,
        max_message_bytes: int = contract.MAX_MESSAGE_BYTES,
    ):
        self.target = target
        self.retries = None if retries is None else max(0, int(retries))
        self.backoff_s = max(0.001, float(backoff_s))
        self.max_backoff_s = max(self.backoff_s, float(max_backoff_s))
        self.connect_timeout_s = max(0.1, float(connect_timeout_s))
        options = [
            ("grpc.max_send_message_length", int(max_message_bytes)),
            ("grpc.max_receive_message_length", int(max_message_bytes)),
            # Reconnect after a server restart within max_backoff_s (gRPC's default grows to
            # 120 s), and give up a connection attempt that hangs after connect_timeout_s.
            ("grpc.initial_reconnect_backoff_ms", int(self.backoff_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.max_backoff_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(self.connect_timeout_s * 1000)),
        ]
        if tls or ca_cert or client_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_tls_file(ca_cert),
                private_key=_read_tls_file(client_key),
                certificate_chain=_read_tls_file(client_cert),
            )
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        # True while the server has answered (the channel is up); False after UNAVAILABLE.
        self._connected = False
        self._watched_until = 0.0  # when the last connectivity subscription ended

    def close(self) -> None:
        """Closes the channel."""
        # gRPC's connectivity-polling thread notices an ended subscription within 0.2 s; a
        # channel closed under it makes that thread raise (a stray traceback on stderr).
        time.sleep(max(0.0, self._watched_until + 0.3 - time.monotonic()))
        self.channel.close()

    def _await_connection(self, timeout_s: float) -> tuple[bool, str]:
        """Connects unless connected: (False, the channel's state) when it hangs `timeout_s`.

        True once the channel is READY, or has failed (TRANSIENT_FAILURE: the call then fails
        at once with UNAVAILABLE and gRPC's reason, and is retried).
        """
        if self._connected:
            return True, ""
        settled = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
        changed = threading.Condition()
        state: list[grpc.ChannelConnectivity] = []

        def on_state(value: grpc.ChannelConnectivity) -> None:
            with changed:
                state[:] = [value]
                changed.notify_all()

        # Subscribed only while connecting, so no polling thread outlives the channel.
        self.channel.subscribe(on_state, try_to_connect=True)
        end = time.monotonic() + timeout_s
        try:
            with changed:
                while not (state and state[0] in settled):
                    left = end - time.monotonic()
                    if left <= 0:
                        return False, state[0].name if state else "IDLE"
                    changed.wait(min(left, 0.5))
            return True, ""
        finally:
            self.channel.unsubscribe(on_state)
            self._watched_until = time.monotonic()

    def _backoff(self, retry: int, hint_s: float) -> float:
        wait = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return max(wait * random.uniform(0.5, 1.0), hint_s)

    def call(
        self,
        method: Callable,
        request,
        *,
        deadline_s: float,
        asked: Mapping[str, Any],
    ):
        """Calls `method`, retrying while `deadline_s` lasts; raises ServingError on failure.

        Retried with backoff: UNAVAILABLE (server down or restarting: Predict has no side
        effects, so a call cut off by a restart is safe to repeat), a connection not made
        within `connect_timeout_s` (DEADLINE on connect), and RESOURCE_EXHAUSTED from an
        overloaded server (after its retry hint). Everything else fails at once.

        Args:
          method: a stub method of this channel.
          request: its request protobuf.
          deadline_s: the whole call's deadline, retries included.
          asked: what the request named, for the error message: the keywords ``model``,
            ``version``, ``version_label`` and ``signature`` of
            :func:`~tf_agg3d.serving.errors.explain_status`.
        """
        start = time.monotonic()
        end = start + deadline_s
        attempt = 0
        while True:
            attempt += 1
            hint = 0.0
            wait_s = max(0.0, min(end - time.monotonic(), self.connect_timeout_s))
            connected, state = self._await_connection(wait_s)
            if not connected:
                # DEADLINE on connect: nothing answered (a host down, a port open but not
                # serving yet); as retryable as UNAVAILABLE.
                code = grpc.StatusCode.UNAVAILABLE
                details = f"no connection within {wait_s:.1f} s (channel {state})"
                retryable = True
            else:
                try:
                    response = method(request, timeout=max(0.001, end - time.monotonic()))
                    self._connected = True
                    return response
                except grpc.RpcError as err:
                    code, details = err.code(), err.details() or ""
                    hint = _retry_hint(err) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else 0.0
                    # A TLS handshake that fails will fail again: say so now, not at the deadline.
                    retryable = (
                        code == grpc.StatusCode.UNAVAILABLE and "handshake" not in details.lower()
                    ) or hint > 0
                    self._connected = code != grpc.StatusCode.UNAVAILABLE
            remaining = end - time.monotonic()
            if retryable and (self.retries is None or attempt <= self.retries) and remaining > 0.01:
                time.sleep(min(remaining, self._backoff(attempt, hint)))
                if end - time.monotonic() > 0.01:
                    continue
            message = explain_status(
                code,
                details,
                target=self.target,
                deadline_s=deadline_s,
                attempts=attempt,
                elapsed_s=time.monotonic() - start,
                **asked,
            )
            raise ServingError(message, code=code, details=details) from None
