"""The gRPC client against the development server over a real socket (stand-in model).

Each TF-Serving status the client can meet is produced by the server for real: unknown
model/version/label/signature, wrong dtype/rank/inputs, oversized message, deadline, server
down; plus metadata, status/readiness, version selection, TLS and bounded concurrency.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf

from tf_agg3d.serving import contract
from tf_agg3d.serving.client import Agg3DClient
from tf_agg3d.serving.dev_server import DevServer
from tf_agg3d.serving.errors import ServingError
from tf_agg3d.serving.protos import int16_tensor_proto
from tf_agg3d.serving.scans import voxel_affine

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _volume(shape=(20, 24, 28), seed=0):
    rng = np.random.default_rng(seed)
    volume = rng.integers(-900, -700, shape).astype(np.int16)
    volume[8:12, 12:16, 4:8] = 300
    return volume


def _local(base, version, volume):
    loaded = tf.saved_model.load(os.path.join(base, "agg3d", str(version)))
    out = loaded.signatures["detect"](volume=tf.constant(volume))
    return {k: v.numpy() for k, v in out.items()}


def _phantom_args(i):
    return (24, 64, 64), (1.1, 1.1, 2.0), (10 + i, 28, 20 + 4 * i)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------------


def test_detect_volume_equals_the_saved_model_run_locally(standin_server, standin_base):
    volume = _volume()
    with Agg3DClient(standin_server.target) as client:
        got = client.detect_volume(volume)
    expected = _local(standin_base, 2, volume)
    assert int(got["version"]) == 2  # latest
    for key in contract.DETECT_OUTPUTS:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    # The bright block (z 8..11, y 12..15, x 4..7) is the first finding, in voxels.
    np.testing.assert_allclose(got["boxes"][0], [9.5, 13.5, 5.5, 6.0])


def test_findings_map_through_the_affine(standin_server):
    volume = _volume()
    affine = np.array(
        [[0.0, 0.0, 1.0, -100.0], [0.0, -1.0, 0.0, 50.0], [2.0, 0.0, 0.0, 7.0], [0, 0, 0, 1]]
    )
    with Agg3DClient(standin_server.target) as client:
        world = client.detect(volume, affine=affine)
        plain = client.detect(volume)
    z, y, x = world[0].voxel_zyx
    assert (world[0].x, world[0].y, world[0].z) == pytest.approx((x - 100.0, -y + 50.0, 2 * z + 7))
    assert world[0].probability == pytest.approx(plain[0].probability)
    # Without an affine: voxel indices in (x, y, z) order times the model's 1 mm spacing.
    assert (plain[0].x, plain[0].y, plain[0].z) == pytest.approx((x, y, z))
    np.testing.assert_array_equal(voxel_affine(1.0) @ [1, 2, 3, 1], [3, 2, 1, 1])


def test_versions_labels_metadata_and_status(standin_server):
    volume = _volume()
    with Agg3DClient(standin_server.target, version=1) as v1:
        assert int(v1.detect_volume(volume)["version"]) == 1
        assert v1.model_info()["version"] == 1
        assert v1.get_model_status() == [
            {"version": 1, "state": "AVAILABLE", "error_code": 0, "error_message": ""}
        ]
    with Agg3DClient(standin_server.target, version_label="stable") as stable:
        assert int(stable.detect_volume(volume)["version"]) == 1
    with Agg3DClient(standin_server.target) as client:
        assert [s["version"] for s in client.get_model_status()] == [1, 2]
        assert client.wait_until_ready(timeout_s=5) == 2
        meta = client.get_model_metadata()
        assert meta["version"] == 2
        sig = meta["signatures"]["serving_default"]
        assert sig["inputs"] == {"volume": {"dtype": "int16", "shape": [-1, -1, -1]}}
        assert sig["outputs"]["boxes"] == {"dtype": "float32", "shape": [-1, 4]}
        # As TF-Serving does, the map also holds the SavedModel's "__saved_model_init_op".
        assert set(meta["signatures"]) >= {"serving_default", "detect", "detect_crop", "metadata"}
        info = client.model_info()
        assert info["preprocess"]["spacing_mm"] == 1.0
        assert client.preprocess_config().fill_hu == 0
        crops, _ = client.predict(
            {"crops": int16_tensor_proto(np.zeros((3, 16, 16, 16), np.int16))},
            signature="detect_crop",
            output_filter=["scores"],
        )
        assert list(crops) == ["scores"] and crops["scores"].shape == (3, 2)


def test_detect_many_reads_preprocesses_and_keeps_order_with_per_scan_errors(
    standin_server, helpers, tmp_path
):
    good = [
        helpers.write_scan(tmp_path / f"scan-{i}.mhd", helpers.chest_phantom(*_phantom_args(i)))
        for i in range(3)
    ]
    missing = str(tmp_path / "missing.mhd")
    seen = []
    with Agg3DClient(standin_server.target) as client:
        results = client.detect_many([good[0], missing, *good[1:]], 2, on_result=seen.append)
        single = client.detect(good[0])
        future = client.submit(good[1])
        assert future.result(timeout=60) == results[2].findings
    assert [r.seriesuid for r in results] == ["scan-0", "missing", "scan-1", "scan-2"]
    assert [r.ok for r in results] == [True, False, True, True]
    assert "missing.mhd" in str(results[1].error)
    assert len(seen) == 4
    assert results[0].findings == single and len(single) == 5
    # World positions lie inside the scan's extent (origin -35, 20.5, -120; 1.1/1.1/2 mm).
    for f in single:
        assert -35 <= f.x <= -35 + 63 * 1.1 and 20.5 <= f.y <= 20.5 + 63 * 1.1
        assert -120 <= f.z <= -120 + 23 * 2.0


# --------------------------------------------------------------------------------------------
# TF-Serving status codes, each produced for real
# --------------------------------------------------------------------------------------------


def _status(fn):
    with pytest.raises(ServingError) as info:
        fn()
    return info.value


def test_unknown_model_version_label_and_signature(standin_server):
    volume = _volume((8, 8, 8))
    target = standin_server.target
    err = _status(lambda: Agg3DClient(target, "nodules", retries=0).detect_volume(volume))
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert "model 'nodules' (latest version) is not served" in str(err)
    assert "Servable not found for request: Latest(nodules)" in err.details

    err = _status(lambda: Agg3DClient(target, version=7).detect_volume(volume))
    assert err.code == grpc.StatusCode.NOT_FOUND and "version 7" in str(err)
    assert err.details == "Servable not found for request: Specific(agg3d, 7)"

    err = _status(lambda: Agg3DClient(target, version_label="gold").detect_volume(volume))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Unrecognized servable version label: gold" in err.details

    err = _status(lambda: Agg3DClient(target, signature="classify").detect_volume(volume))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "no signature 'classify'" in str(err)
    assert err.details == 'Serving signature key "classify" not found.'

    err = _status(lambda: Agg3DClient(target, version=9).get_model_status())
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.details == "Could not find version 9 of model agg3d"


@pytest.mark.parametrize(
    "inputs, needle",
    [
        ({"volume": np.zeros((8, 8, 8), np.float32)}, "to be int16 but float is provided"),
        ({"volume": np.zeros((8, 8, 8, 1), np.int16)}, "expected shape [?, ?, ?] (rank 3)"),
        ({}, "input size does not match signature: 0!=1 len({}) != len({volume})"),
        ({"scan": np.zeros((8, 8, 8), np.int16)}, "alias not found in signature: scan"),
        ({"volume": np.zeros((97, 8, 8), np.int16)}, "1 <= D <= 96"),  # the in-graph check
    ],
)
def test_invalid_inputs_are_invalid_argument(standin_server, inputs, needle):
    with Agg3DClient(standin_server.target) as client:
        err = _status(lambda: client.predict(inputs))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details
    assert "rejected the request's inputs" in str(err)


def test_unknown_output_filter_is_invalid_argument(standin_server):
    with Agg3DClient(standin_server.target) as client:
        err = _status(
            lambda: client.predict({"volume": _volume((8, 8, 8))}, output_filter=["masks"])
        )
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "output tensor alias not found in signature: masks" in err.details


def test_oversized_messages_are_resource_exhausted(standin_base, standin_server):
    volume = np.zeros((96, 96, 96), np.int16)  # 1.7 MiB
    server = DevServer(standin_base, port=0, max_message_bytes=1 << 20)
    with server, Agg3DClient(server.target) as client:
        err = _status(lambda: client.detect_volume(volume))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max message size" in str(err)
    # The client's own limit fails the same way, before anything is sent.
    with Agg3DClient(standin_server.target, max_message_bytes=1 << 20) as client:
        err = _status(lambda: client.detect_volume(volume))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_deadline_exceeded(standin_base):
    server = DevServer(standin_base, port=0, delay_s=1.5)
    with server, Agg3DClient(server.target, deadline_s=0.3) as client:
        start = time.monotonic()
        err = _status(lambda: client.detect_volume(_volume((8, 8, 8))))
        assert time.monotonic() - start < 1.4
    assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer within 0.3 s: raise --deadline" in str(err)


def test_server_down_is_retried_with_backoff_then_a_clear_error():
    target = f"127.0.0.1:{_free_port()}"
    with Agg3DClient(target, retries=3, backoff_s=0.1, max_backoff_s=0.2) as client:
        start = time.monotonic()
        err = _status(lambda: client.detect_volume(_volume((8, 8, 8))))
        waited = time.monotonic() - start
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert f"no model server reachable at {target} after 4 attempt(s)" in str(err)
    assert waited >= 0.05 + 0.1 + 0.1  # three backoffs, each at least half its nominal wait


def test_wait_until_ready_sees_loading_then_available(standin_base):
    server = DevServer(standin_base, port=0, background_load=True)
    manager_refresh = server.manager.refresh

    def slow_refresh():
        time.sleep(0.5)
        manager_refresh()

    server.manager.refresh = slow_refresh
    with server, Agg3DClient(server.target) as client:
        with pytest.raises(ServingError, match="not ready after 0.1 s"):
            client.wait_until_ready(timeout_s=0.1, poll_s=0.05)
        assert client.wait_until_ready(timeout_s=30, poll_s=0.05) == 2


def test_rollout_and_rollback(tmp_path, helpers):
    helpers.export_standin(tmp_path, version=1)
    with DevServer(str(tmp_path), port=0) as server, Agg3DClient(server.target) as client:
        assert [s["version"] for s in client.get_model_status()] == [1]
        helpers.export_standin(tmp_path, version=2, scale=3.0)
        server.manager.refresh()  # what --poll-s does periodically
        states = [(s["version"], s["state"]) for s in client.get_model_status()]
        assert states == [(1, "END"), (2, "AVAILABLE")]
        assert int(client.detect_volume(_volume((8, 8, 8)))["version"]) == 2
        err = _status(lambda: Agg3DClient(server.target, version=1).detect_volume(_volume()))
        assert err.code == grpc.StatusCode.NOT_FOUND
        # Rollback: pin version 1 (a 'specific' policy), as a models.config change would.
        server.manager.policy_versions = (1,)
        server.manager.refresh()
        states = [(s["version"], s["state"]) for s in client.get_model_status()]
        assert states == [(1, "AVAILABLE"), (2, "END")]
        assert int(client.detect_volume(_volume((8, 8, 8)))["version"]) == 1


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls(standin_base, tmp_path):
    d = str(tmp_path)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ca",
             "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem")  # fmt: skip
    ext = tmp_path / "san.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.csr")  # fmt: skip
        _openssl("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", f"{d}/ca.pem", "-CAkey",
                 f"{d}/ca.key", "-CAcreateserial", "-days", "1", "-extfile", str(ext),
                 "-out", f"{d}/{name}.pem")  # fmt: skip
    server = DevServer(
        standin_base,
        port=0,
        tls_cert=f"{d}/server.pem",
        tls_key=f"{d}/server.key",
        tls_client_ca=f"{d}/ca.pem",
    )
    with server:
        tls = dict(ca_cert=f"{d}/ca.pem", server_name="localhost")
        with Agg3DClient(
            server.target, client_cert=f"{d}/client.pem", client_key=f"{d}/client.key", **tls
        ) as client:
            assert int(client.detect_volume(_volume((8, 8, 8)))["version"]) == 2
        # Without a client certificate the handshake fails: no retry storm, a clear error.
        with Agg3DClient(server.target, retries=0, deadline_s=5, **tls) as client:
            err = _status(client.get_model_status)
        assert err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        with Agg3DClient(server.target, retries=0, deadline_s=5) as plain:
            assert _status(plain.get_model_status).code == grpc.StatusCode.UNAVAILABLE


def test_client_arguments_are_checked():
    with pytest.raises(ValueError, match="version and version_label: give at most one"):
        Agg3DClient("h:1", version=1, version_label="stable")
    with pytest.raises(ValueError, match="client_cert and client_key: give both"):
        Agg3DClient("h:1", client_cert="c.pem")
    with pytest.raises(ValueError, match="deadline_s: expected > 0"):
        Agg3DClient("h:1", deadline_s=0)


# --------------------------------------------------------------------------------------------
# Both command lines, as separate processes
# --------------------------------------------------------------------------------------------


def test_dev_server_and_client_command_lines(standin_base, helpers, tmp_path):
    scan = helpers.write_scan(tmp_path / "cli-scan.mhd", helpers.chest_phantom())
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tf_agg3d.serving.dev_server",
            f"--model-base={standin_base}",
            "--model-name=agg3d",
            f"--port={port}",
            "--versions=1",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = [sys.executable, "-m", "tf_agg3d.serving.client", f"--target=127.0.0.1:{port}"]
        out = tmp_path / "findings.csv"
        ok = subprocess.run(
            [*client, f"--scan={scan}", f"--out={out}", "--wait=120", "--deadline=60"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert ok.returncode == 0, ok.stderr[-3000:]
        assert "cli-scan: 5 findings" in ok.stdout
        assert "model agg3d version 1" in ok.stdout
        lines = out.read_text().splitlines()
        assert lines[0] == (
            "seriesuid,coordX,coordY,coordZ,probability,diameter_mm,rpn_score,fpr_score"
        )
        assert len(lines) == 6 and lines[1].startswith("cli-scan,")

        bad = subprocess.run(
            [*client, f"--scan={scan}", f"--out={tmp_path / 'x.csv'}", "--version=5"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert bad.returncode == 1
        assert "model 'agg3d' version 5 is not served at" in bad.stderr
        assert "Traceback" not in bad.stderr
        assert not (tmp_path / "x.csv").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)
