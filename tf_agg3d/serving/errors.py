"""Serving failures: the client's, the exporter's and the development server's exceptions.

A client call fails with one exception type, :class:`ServingError`, whose message a user can
act on: :func:`explain_status` turns every gRPC status TF-Serving answers with into a sentence
that says what was asked (target, model, version, signature), what the server said, and what
to do about it, so the client's command line can print it without a traceback. An export fails
with :class:`ExportError`; inside the development server a request fails with
:class:`RpcError`, the status it answers with.
"""

from __future__ import annotations

import grpc


class ServingError(RuntimeError):
    """A request to a model server failed.

    Attributes:
      code: the gRPC status code (``grpc.StatusCode``), or None for a local failure.
      details: the server's own message, verbatim.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details


class ExportError(RuntimeError):
    """A SavedModel export or a serving config could not be written as asked."""


class RpcError(Exception):
    """A request to the development server fails with this gRPC status and message.

    Raised by its servables and services; the servicers turn it into ``context.abort``, so a
    client sees it as TF-Serving's answer (a :class:`ServingError` there).
    """

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        # Sent as trailing metadata (contract.RETRY_AFTER_METADATA) for an overloaded server.
        self.retry_after_s = retry_after_s


def _what(model: str, version: int | None, label: str | None) -> str:
    if version is not None:
        return f"model '{model}' version {version}"
    if label:
        return f"model '{model}' version label '{label}'"
    return f"model '{model}' (latest version)"


def explain_status(
    code: grpc.StatusCode,
    details: str,
    *,
    target: str,
    model: str,
    version: int | None = None,
    version_label: str | None = None,
    signature: str | None = None,
    deadline_s: float | None = None,
    attempts: int = 1,
    elapsed_s: float | None = None,
) -> str:
    """One actionable sentence for a failed call.

    Args:
      code: the call's status code.
      details: the server's message.
      target: HOST:PORT that was called.
      model, version, version_label, signature: what the request named.
      deadline_s: the deadline the call had, if any.
      attempts: how many times the call was tried.
      elapsed_s: how long the call and its retries took.

    Returns:
      The message, ending with the server's own words in brackets.
    """
    what = _what(model, version, version_label)
    said = f" [server: {details}]" if details else ""
    tried = f"after {attempts} attempt(s)"
    if elapsed_s is not None:
        tried += f" in {elapsed_s:.1f} s"
    if code == grpc.StatusCode.NOT_FOUND:
        return (
            f"{what} is not served at {target}: check --model/--version against the server's "
            f"models.config and version_policy (GetModelStatus lists what is loaded){said}"
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return (
            f"{what} at {target} has no signature '{signature}' (or is not ready): expected "
            f"one of the exported signatures (serving_default, detect, detect_crop, metadata)"
            f"{said}"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return (
            f"{what} at {target} rejected the request's inputs (signature '{signature}'): "
            f"expected input 'volume' int16 [D, H, W], preprocessed HU at 1 mm, within the "
            f"model's maximum size{said}"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (
        "retry after" in details or "Concurrent RPC limit" in details
    ):
        return (
            f"the server at {target} stayed overloaded for {what} {tried}: send fewer scans "
            f"at once (--max-concurrency), raise --deadline, or give the server more capacity "
            f"(dev server: --max-concurrent-requests, --max-queued-requests){said}"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return (
            f"the request or reply for {what} at {target} exceeds a gRPC message size limit or "
            f"the server is out of memory: raise the server's and client's max message size "
            f"(tensorflow_model_server --grpc_channel_arguments=grpc.max_receive_message_length"
            f"=...) or send a smaller volume{said}"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        limit = f"{deadline_s:g} s" if deadline_s is not None else "its deadline"
        return (
            f"{what} at {target} did not answer within {limit}: raise --deadline (a whole scan "
            f"on CPU takes tens of seconds) or check the server's load{said}"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"no model server reachable at {target} {tried}: check that it runs, the "
            f"host/port (gRPC is 8500, REST 8501), and TLS settings; calls are retried until "
            f"--deadline{said}"
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return (
            f"{target} refused the credentials for {what} ({code.name}): check --tls, "
            f"--ca-cert, --client-cert and --client-key{said}"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"{target} does not implement this call ({code.name}): is it a TF-Serving gRPC "
            f"port (8500) and not the REST one (8501)?{said}"
        )
    return f"{what} at {target} failed with {code.name}{said}"
