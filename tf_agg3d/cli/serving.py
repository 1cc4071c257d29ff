"""The serving commands: ``agg3d-serve`` (the development server) and ``agg3d-client``.

``python -m tf_agg3d.serving.dev_server`` and ``python -m tf_agg3d.serving.client`` run these
too (those modules hand their ``__main__`` over here). Flags are defined when a command starts,
not at import, because the library modules (:mod:`tf_agg3d.serving.client`,
:mod:`tf_agg3d.serving.dev_server`) are imported in-process by programs with flags of their own.

Client::

  agg3d-client --target HOST:PORT --scan PATH [--scan PATH ...] [--model agg3d] [--version N] \\
      --out findings.csv [--tls --ca-cert F --client-cert F --client-key F] [--deadline S]

Exit status: 0 every scan done; 1 some scan failed (the others are written), the model is not
served or the CSV could not be written; 2 a usage error, a bad TLS setting or a missing
optional package (tensorflow-io for s3://).

Development server::

  agg3d-serve --model_base_path /models/agg3d [--model-name agg3d] --port 8500 \\
      [--host 127.0.0.1] [--versions 3,4] [--poll-s 30] [--tls-cert F --tls-key F] \\
      [--max-concurrent-requests 4] [--max-queued-requests 8] [--max-volume-shape D,H,W]
  agg3d-serve --model-base /models --model-name agg3d ...      (the folder above the model's)

``--model_base_path`` has TF-Serving's meaning: the folder that holds the numeric version
folders; the model name defaults to its basename. ``--model-base`` is the folder above
``<model_name>/``; give one of the two. The port opens once the initial versions are loaded
(as TF-Serving's does); a line on stdout says which versions were found and loaded at start-up
and on every poll, or why the base path holds no loadable version.

Exit status: 0 after Ctrl-C; 1 a TLS file it cannot read, a bad base path or a port in use; 2
a usage error (a bad flag, both base paths or neither) or a missing optional package.

Every flag takes its dashed spelling and its underscore one (``--model-base``,
``--model_base``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.cli.output import note

FLAGS = flags.FLAGS

# --------------------------------------------------------------------------------------------
# agg3d-client
# --------------------------------------------------------------------------------------------


def define_client_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the client's flags."""
    from tf_agg3d.serving import contract

    fv = {"flag_values": flag_values}
    flags.DEFINE_string("target", None, "gRPC endpoint HOST:PORT of TF-Serving.", **fv)
    flags.DEFINE_multi_string("scan", [], "Scan file or DICOM folder (repeatable).", **fv)
    flags.DEFINE_string("model", contract.MODEL_NAME, "Model name.", **fv)
    flags.DEFINE_integer("version", None, "Model version (default: the server's latest).", **fv)
    flags.DEFINE_string("version-label", None, "Model version label (e.g. stable).", **fv)
    flags.DEFINE_string(
        "out", None, "Output CSV (LUNA16 columns + diameter and both scores).", **fv
    )
    flags.DEFINE_boolean("tls", False, "Use TLS.", **fv)
    flags.DEFINE_string(
        "ca-cert", None, "PEM CA bundle to verify the server (implies --tls).", **fv
    )
    flags.DEFINE_string("client-cert", None, "PEM client certificate (mutual TLS).", **fv)
    flags.DEFINE_string("client-key", None, "PEM client private key (mutual TLS).", **fv)
    flags.DEFINE_string("server-name", None, "TLS server name to verify instead of the host.", **fv)
    flags.DEFINE_float("deadline", 600.0, "Per-call deadline, seconds, retries included.", **fv)
    flags.DEFINE_integer(
        "retries",
        None,
        "At most this many retries (server down or restarting, overloaded, no connection), "
        "with exponential backoff (default: until --deadline).",
        **fv,
    )
    flags.DEFINE_integer("max-concurrency", 2, "Scans in flight.", **fv)
    flags.DEFINE_float("wait", 0.0, "Wait up to this many seconds for the model to be ready.", **fv)
    flags.mark_flags_as_required(["target", "out"], flag_values=flag_values)


def client_main(argv: Sequence[str]) -> int:
    """The client command's body (flags parsed); returns the exit status."""
    import tensorflow as tf

    from tf_agg3d.data.errors import DataError
    from tf_agg3d.serving.client import Agg3DClient
    from tf_agg3d.serving.errors import ServingError
    from tf_agg3d.serving.scans import ScanResult, write_findings_csv
    from tf_agg3d.utils.filesystems import ensure_filesystems

    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {list(argv[1:])}")
    f = cli_flags.values()
    if not f.scan:
        raise cli_exit.UsageError("give at least one --scan")
    # A missing tensorflow-io (ImportError) is status 2 (tf_agg3d.cli.exit.call).
    ensure_filesystems(f.out, f.ca_cert, f.client_cert, f.client_key, *f.scan)
    try:
        # Flags named like the client's parameters go through as they are.
        passed = cli_flags.keywords(
            f,
            "version_label",
            "tls",
            "ca_cert",
            "client_cert",
            "client_key",
            "server_name",
            "retries",
            "max_concurrency",
        )
        client = Agg3DClient(f.target, f.model, f.version, deadline_s=f.deadline, **passed)
    except (ValueError, ServingError) as err:
        cli_exit.report(err, "error")
        return cli_exit.USAGE
    start = time.perf_counter()
    with client:
        try:
            if f.wait > 0:
                client.wait_until_ready(timeout_s=f.wait)
            info = client.model_info()
        except ServingError as err:
            cli_exit.report(err, "error")
            return cli_exit.ITEMS_FAILED

        def report(result: ScanResult) -> None:
            if result.ok:
                best = f", best {result.findings[0].probability:.3f}" if result.findings else ""
                print(
                    f"{result.seriesuid}: {len(result.findings)} findings{best} "
                    f"({result.seconds:.1f} s)",
                    flush=True,
                )
            elif result.source in str(result.error):
                note(f"FAILED: {result.error}")
            else:
                note(f"{result.source}: FAILED: {result.error}")

        results = client.detect_many(f.scan, on_result=report)
    ok = [r for r in results if r.ok]
    if ok:
        try:
            rows = write_findings_csv(f.out, ok)
        except (DataError, OSError, tf.errors.OpError) as err:
            cli_exit.report(err, "error")
            return cli_exit.ITEMS_FAILED
        print(
            f"model {f.model} version {info.get('version')} at {f.target}: {len(ok)}/"
            f"{len(results)} scans, {rows} findings -> {f.out} "
            f"({time.perf_counter() - start:.1f} s)"
        )
    else:
        note(f"no scan succeeded; {f.out} not written")
    return cli_exit.items_status(len(ok) != len(results))


def run_client() -> None:
    """``agg3d-client`` / ``python -m tf_agg3d.serving.client``."""
    define_client_flags()
    cli_exit.run(client_main, doc=__doc__)


# --------------------------------------------------------------------------------------------
# agg3d-serve
# --------------------------------------------------------------------------------------------


def define_server_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines the development server's flags."""
    from tf_agg3d.serving import contract

    fv = {"flag_values": flag_values}
    flags.DEFINE_string(
        "model-base-path",
        None,
        "TF-Serving's --model_base_path: the folder holding the numeric version folders "
        "(e.g. /models/agg3d).",
        **fv,
    )
    flags.DEFINE_string(
        "model-base", None, "The folder above the model's: holds MODEL_NAME/VERSION/.", **fv
    )
    flags.DEFINE_string(
        "model-name",
        None,
        f"Model name (default: --model_base_path's basename, or {contract.MODEL_NAME} with "
        "--model-base).",
        **fv,
    )
    flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on (0.0.0.0 exposes it).", **fv)
    flags.DEFINE_integer("port", 8500, "gRPC port (TF-Serving's is 8500).", **fv)
    flags.DEFINE_list("versions", [], "Serve exactly these versions (default: the latest).", **fv)
    flags.DEFINE_list("version-labels", [], "label=version pairs, e.g. stable=3,canary=4.", **fv)
    flags.DEFINE_integer("max-message-bytes", contract.MAX_MESSAGE_BYTES, "gRPC size limit.", **fv)
    flags.DEFINE_float("delay-s", 0.0, "Sleep before each Predict (deadline testing).", **fv)
    flags.DEFINE_integer("max-concurrent-requests", 4, "Predict calls running at once.", **fv)
    flags.DEFINE_integer(
        "max-queued-requests",
        8,
        "Predict calls waiting for a slot; more get RESOURCE_EXHAUSTED with a retry hint.",
        **fv,
    )
    flags.DEFINE_list(
        "max-volume-shape",
        [],
        "Largest volume D,H,W the server accepts (default: the model's own limit).",
        **fv,
    )
    flags.DEFINE_float("poll-s", 0.0, "Re-scan the base path for versions (0: never).", **fv)
    flags.DEFINE_string("tls-cert", None, "PEM server certificate (enables TLS).", **fv)
    flags.DEFINE_string("tls-key", None, "PEM server private key.", **fv)
    flags.DEFINE_string("tls-client-ca", None, "PEM CA for client certificates (mutual TLS).", **fv)


def parse_version_labels(pairs: Sequence[str]) -> dict[str, int]:
    """``["stable=3", ...]`` -> ``{"stable": 3, ...}``; a usage error for a malformed pair."""
    labels = {}
    for pair in pairs:
        label, sep, version = pair.partition("=")
        if not sep or not label or not version.isdigit():
            raise cli_exit.UsageError(f"--version-labels: expected label=version, got {pair!r}")
        labels[label] = int(version)
    return labels


def serve_main(argv: Sequence[str]) -> int:
    """The development server's body (flags parsed): serves until Ctrl-C; the exit status."""
    from tf_agg3d.serving.dev_server import DevServer
    from tf_agg3d.utils.filesystems import ensure_filesystems

    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {list(argv[1:])}")
    f = cli_flags.values()
    if bool(f.model_base) == bool(f.model_base_path):
        raise cli_exit.UsageError(
            "give --model_base_path (the folder holding the version folders, e.g. "
            "/models/agg3d) or --model-base (the folder above MODEL_NAME/), not both"
            if f.model_base
            else "missing --model_base_path (the folder holding the version folders, e.g. "
            "/models/agg3d) or --model-base (the folder above MODEL_NAME/)"
        )
    versions = cli_flags.integers("versions", f.versions)
    labels = parse_version_labels(f.version_labels)
    max_shape = cli_flags.integers("max-volume-shape", f.max_volume_shape) or None
    if max_shape is not None and (len(max_shape) != 3 or min(max_shape) < 1):
        raise cli_exit.UsageError(
            f"--max-volume-shape: expected three positive sizes D,H,W, got {f.max_volume_shape}"
        )
    if f.max_concurrent_requests < 1 or f.max_queued_requests < 0:
        raise cli_exit.UsageError(
            "--max-concurrent-requests must be >= 1 and --max-queued-requests >= 0"
        )
    # A missing tensorflow-io (ImportError) is status 2 (tf_agg3d.cli.exit.call).
    ensure_filesystems(f.model_base, f.model_base_path, f.tls_cert, f.tls_key, f.tls_client_ca)

    def log(line: str) -> None:
        print(line, flush=True)

    try:
        # Flags named like DevServer's parameters go through as they are.
        passed = cli_flags.keywords(
            f,
            "host",
            "port",
            "max_message_bytes",
            "delay_s",
            "max_concurrent_requests",
            "max_queued_requests",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "poll_s",
        )
        server = DevServer(
            os.path.expanduser(f.model_base) if f.model_base else None,
            f.model_name,
            model_base_path=os.path.expanduser(f.model_base_path) if f.model_base_path else None,
            versions=versions or None,
            version_labels=labels,
            max_volume_shape=max_shape,
            log=log,
            **passed,
        )
        # Loads the initial versions, then opens the port (as TF-Serving does).
        server.start()
    except (ValueError, OSError) as err:  # a TLS file, the base path, a port in use
        cli_exit.report(err, "error")
        return cli_exit.ITEMS_FAILED
    print(
        f"serving model '{server.manager.model_name}' from {server.manager.model_dir} on "
        f"{server.target}",
        flush=True,
    )
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    return cli_exit.OK


def run_serve() -> None:
    """``agg3d-serve`` / ``python -m tf_agg3d.serving.dev_server``."""
    define_server_flags()
    cli_exit.run(serve_main, doc=__doc__)
