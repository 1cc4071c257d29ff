"""Faults and bad inputs against the development server, each produced for real on loopback.

- TF-Serving's ``--model_base_path`` and the one-line report of what a base path holds;
- the port opens only after the initial load; a server killed and restarted in the middle of a
  ``detect_many`` batch costs no scan, and one that stays down fails each scan by name;
- a connection that hangs (port open, nothing serving) is retried until the deadline;
- overload: a bounded queue, RESOURCE_EXHAUSTED with a retry hint, clients that back off;
- hostile requests interleaved with good ones: each refused with the status that fits, the good
  ones still answered;
- a version published while requests are in flight: those finish on the old version, new ones
  get the new one.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from support import REPO, subprocess_env
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tf_agg3d.serving import contract, protos
from tf_agg3d.serving.client import Agg3DClient
from tf_agg3d.serving.dev_server import DevServer
from tf_agg3d.serving.errors import ServingError
from tf_agg3d.serving.servables import ModelManager


def _volume(shape=(20, 24, 28), seed=0):
    rng = np.random.default_rng(seed)
    volume = rng.integers(-900, -700, shape).astype(np.int16)
    volume[8:12, 12:16, 4:8] = 300
    return volume


_SAVED = {}


def _local(base, version, volume):
    path = os.path.join(str(base), "agg3d", str(version))
    if path not in _SAVED:
        _SAVED[path] = tf.saved_model.load(path)
    out = _SAVED[path].signatures["detect"](volume=tf.constant(volume))
    return {k: v.numpy() for k, v in out.items()}


def _status(fn):
    with pytest.raises(ServingError) as info:
        fn()
    return info.value


def _same_findings(got, want):
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert (g.x, g.y, g.z, g.diameter_mm) == pytest.approx((w.x, w.y, w.z, w.diameter_mm))
        assert (g.probability, g.rpn_score, g.fpr_score) == pytest.approx(
            (w.probability, w.rpn_score, w.fpr_score), rel=1e-6
        )


def _scans(helpers, folder, n):
    return [
        helpers.write_scan(
            folder / f"scan-{i}.mhd",
            helpers.chest_phantom((24, 64, 64), (1.1, 1.1, 2.0), (10 + i % 4, 28, 20 + 4 * i)),
        )
        for i in range(n)
    ]


# --------------------------------------------------------------------------------------------
# Base paths: TF-Serving's --model_base_path, and what each poll reports
# --------------------------------------------------------------------------------------------


def test_model_base_path_names_the_model_after_its_folder(standin_base):
    lines = []
    base_path = os.path.join(standin_base, "agg3d")
    with (
        DevServer(model_base_path=base_path, port=0, versions=[1], log=lines.append) as server,
        Agg3DClient(server.target, retries=0) as client,
    ):
        assert server.manager.model_name == "agg3d"
        assert int(client.detect_volume(_volume((8, 8, 8)))["version"]) == 1
    (line,) = lines
    assert re.fullmatch(
        rf"model 'agg3d' at {re.escape(base_path)}: found versions \[1, 2\]; "
        rf"loaded version 1 \(\d+\.\d s\); serving \[1\]",
        line,
    ), line
    # Another name for the same folder, as TF-Serving's --model_name would give it.
    with (
        DevServer(None, "nodules", model_base_path=base_path + "/", port=0) as server,
        Agg3DClient(server.target, "nodules", retries=0) as client,
    ):
        assert int(client.detect_volume(_volume((8, 8, 8)))["version"]) == 2
    with pytest.raises(ValueError, match="not both"):
        ModelManager(standin_base, model_base_path=base_path)
    with pytest.raises(ValueError, match="give model_base_path"):
        ModelManager()


def test_each_refresh_says_why_a_base_path_holds_no_loadable_version(tmp_path, standin_base):
    def report(folder):
        lines = []
        manager = ModelManager(model_base_path=str(folder), log=lines.append)
        line = manager.refresh()
        assert lines == [line]
        return manager, line

    _, line = report(tmp_path / "absent")
    assert "the base path does not exist or is not a folder" in line
    assert line.endswith("no loadable version: requests get NOT_FOUND")

    folder = tmp_path / "agg3d"
    folder.mkdir()
    assert "no numeric version folder (empty)" in report(folder)[1]
    (folder / "latest").mkdir()
    (folder / "v1").mkdir()
    assert "no numeric version folder (found: latest, v1)" in report(folder)[1]

    (folder / "3" / "variables").mkdir(parents=True)
    line = report(folder)[1]
    assert "found versions []" in line
    assert "skipped version folders without saved_model.pb [3] (not loadable yet)" in line

    (folder / "4").mkdir()
    (folder / "4" / "saved_model.pb").write_bytes(b"not a SavedModel")
    manager, line = report(folder)
    assert "found versions [4]" in line and "version 4 failed to load: " in line
    assert line.endswith("no loadable version: requests get NOT_FOUND")
    (status,) = manager.statuses("agg3d", 4)
    assert status.state == protos.VersionState.END and "failed to load" in status.error

    # A good version published next to the broken one: loaded and served, the report says so.
    shutil.copytree(os.path.join(standin_base, "agg3d", "1"), folder / "5")
    line = manager.refresh()
    assert "found versions [4, 5]" in line and "loaded version 5 (" in line
    assert line.endswith("serving [5]")
    assert manager.refresh().endswith("(not loadable yet); serving [5]")


def test_a_port_in_use_is_refused_before_loading(standin_base, helpers):
    port = helpers.free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen(1)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: port in use"):
            DevServer(standin_base, port=port)


def test_serve_command_refuses_both_base_paths(standin_base):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_agg3d.serving.dev_server",
            f"--model-base={standin_base}",
            f"--model_base_path={standin_base}/agg3d",
            "--port=0",
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "usage error: give --model_base_path" in done.stderr and "not both" in done.stderr


# --------------------------------------------------------------------------------------------
# Start after load, restarts, connections that hang
# --------------------------------------------------------------------------------------------


def test_port_opens_only_after_the_initial_load(standin_base, helpers):
    port = helpers.free_port()
    server = DevServer(standin_base, port=port)
    refresh = server.manager.refresh

    def slow_refresh():
        time.sleep(1.5)
        return refresh()

    server.manager.refresh = slow_refresh
    starter = threading.Thread(target=server.start)
    starter.start()
    try:
        time.sleep(0.3)
        # While it loads, the port is closed: UNAVAILABLE (retried), never NOT_FOUND.
        with Agg3DClient(server.target, retries=0, connect_timeout_s=0.5) as early:
            assert _status(lambda: early.detect_volume(_volume())).code == (
                grpc.StatusCode.UNAVAILABLE
            )
        with Agg3DClient(server.target, deadline_s=60, backoff_s=0.1, max_backoff_s=0.3) as client:
            assert int(client.detect_volume(_volume())["version"]) == 2
    finally:
        starter.join(timeout=60)
        server.stop(grace=0)


def test_restart_mid_batch_costs_no_scan_and_a_long_outage_names_each_scan(
    standin_base, helpers, tmp_path
):
    paths = _scans(helpers, tmp_path, 6)
    port = helpers.free_port()
    target = f"127.0.0.1:{port}"
    flags = [f"--model_base_path={standin_base}/agg3d", f"--port={port}"]
    logs = [str(tmp_path / "server-1.log"), str(tmp_path / "server-2.log")]
    # Each Predict of the first server takes 0.3 s, so the kill lands on calls in flight.
    procs = [helpers.start_server_process(logs[0], *flags, "--delay-s=0.3")]
    lock = threading.Lock()
    seen, times = [], {}

    def on_result(result):
        with lock:
            seen.append(result)
            if len(seen) == 2:  # mid-batch: kill -9, start a new server on the same port
                times["kill"] = time.monotonic()
                helpers.stop_server_process(procs[0], kill=True)
                procs.append(helpers.start_server_process(logs[1], *flags))

    try:
        text = helpers.wait_for_line(logs[0], f"on {target}", proc=procs[0])
        # The report of the initial load comes before the port opens.
        report = f"model 'agg3d' at {standin_base}/agg3d: found versions [1, 2]; loaded version 2"
        assert text.index(report) < text.index(f"serving model 'agg3d' from {standin_base}")
        with Agg3DClient(
            target, deadline_s=180, backoff_s=0.1, max_backoff_s=0.5, connect_timeout_s=2
        ) as client:
            preprocess = client.preprocess_config()
            start = time.monotonic()
            results = client.detect_many(paths, max_concurrency=2, on_result=on_result)
            batch_s = time.monotonic() - start
            restarted = helpers.wait_for_line(logs[1], f"on {target}", proc=procs[1])
            assert "found versions [1, 2]; loaded version 2" in restarted
            # Every scan ends with its findings, in order, none lost or repeated.
            assert [r.source for r in results] == paths
            assert sorted(r.source for r in seen) == sorted(paths)
            assert [r.error for r in results] == [None] * 6
            for result in results:
                _same_findings(
                    result.findings,
                    helpers.local_findings(standin_base, 2, result.source, preprocess),
                )
            outage_s = batch_s - (times["kill"] - start)
            print(
                f"\nrestart mid-batch: 6 scans sent, {sum(r.ok for r in results)} succeeded, "
                f"0 failed, lost 0; kill after 2 results, batch {batch_s:.1f} s, "
                f"{outage_s:.1f} s from the kill to the last scan"
            )

            # Down past the deadline: each affected scan fails, its error naming it and why.
            helpers.stop_server_process(procs[1], kill=True)
            client.deadline_s = 2.0
            start = time.monotonic()
            down = client.detect_many(paths[:3], max_concurrency=3)
            assert time.monotonic() - start < 30
        for path, result in zip(paths[:3], down, strict=True):
            assert not result.ok and result.findings == []
            err = result.error
            assert isinstance(err, ServingError) and err.code == grpc.StatusCode.UNAVAILABLE
            assert str(err).startswith(f"scan {path}: no model server reachable at {target} ")
            assert "attempt(s) in " in str(err) and "retried until --deadline" in str(err)
            print(f"down past the deadline: {err}")
    finally:
        for proc in procs:
            helpers.stop_server_process(proc, kill=True)


def test_a_connection_that_hangs_is_retried_until_the_deadline(standin_base, helpers):
    port = helpers.free_port()
    # A port that accepts TCP connections but never speaks: gRPC's handshake hangs.
    hung = socket.socket()
    hung.bind(("127.0.0.1", port))
    hung.listen(16)
    target = f"127.0.0.1:{port}"
    try:
        with Agg3DClient(target, deadline_s=2.0, backoff_s=0.1, connect_timeout_s=0.5) as client:
            start = time.monotonic()
            err = _status(lambda: client.get_model_status(deadline_s=2.0))
            assert 1.5 < time.monotonic() - start < 8
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert f"no model server reachable at {target} after " in str(err)
        assert int(str(err).split(" after ")[1].split(" attempt")[0]) >= 2

        # The same hang, then a real server on the port: the call gets through.
        servers = []

        def replace():
            time.sleep(1.0)
            hung.close()
            servers.append(DevServer(standin_base, port=port).start())

        swap = threading.Thread(target=replace)
        with Agg3DClient(
            target, deadline_s=60, backoff_s=0.1, max_backoff_s=0.3, connect_timeout_s=0.5
        ) as client:
            swap.start()
            assert int(client.detect_volume(_volume())["version"]) == 2
        swap.join(timeout=60)
        servers[0].stop(grace=0)
    finally:
        hung.close()


# --------------------------------------------------------------------------------------------
# Overload
# --------------------------------------------------------------------------------------------


def test_overload_is_resource_exhausted_with_a_retry_hint_and_clients_back_off(standin_base):
    volume = _volume((8, 8, 8))
    request = protos.predict_request(
        {"volume": protos.int16_tensor_proto(volume)}, contract.MODEL_NAME
    )
    server = DevServer(
        standin_base, port=0, delay_s=0.4, max_concurrent_requests=1, max_queued_requests=1
    )
    with server:
        channel = grpc.insecure_channel(server.target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def raw(_):
            try:
                return stub.Predict(request, timeout=30).model_spec.version.value
            except grpc.RpcError as err:
                return err

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(raw, range(6)))
        channel.close()
        refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        assert sum(o == 2 for o in outcomes) >= 2 and len(refused) >= 1
        for err in refused:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server overloaded: 1 Predict calls running and 1 queued" in err.details()
            assert "(max_concurrent_requests=1, max_queued_requests=1); retry after " in (
                err.details()
            )
            hint = dict(err.trailing_metadata())[contract.RETRY_AFTER_METADATA]
            assert 50 <= int(hint) <= 30000
        stats = server.stats()
        assert stats["peak_running"] == 1 and stats["peak_queued"] == 1
        assert stats["rejected"] == len(refused)

        # A client without retries says what happened; one with retries gets every answer.
        with Agg3DClient(server.target, retries=0) as impatient:
            blockers = [threading.Thread(target=raw, args=(i,)) for i in range(2)]
            channel = grpc.insecure_channel(server.target)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for thread in blockers:
                thread.start()
            time.sleep(0.15)
            err = _status(lambda: impatient.detect_volume(volume))
            for thread in blockers:
                thread.join()
            channel.close()
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"the server at {server.target} stayed overloaded" in str(err)
        assert "retry after" in err.details
        with Agg3DClient(server.target, deadline_s=60, backoff_s=0.05) as client:
            rejected = server.stats()["rejected"]
            with concurrent.futures.ThreadPoolExecutor(5) as pool:
                versions = list(
                    pool.map(lambda _: client.detect_volume(volume)["version"], range(5))
                )
            assert [int(v) for v in versions] == [2] * 5
            assert server.stats()["rejected"] > rejected  # refused at first, retried, served
        assert server.stats()["peak_running"] == 1 and server.stats()["peak_queued"] == 1


# --------------------------------------------------------------------------------------------
# Hostile requests, interleaved with good ones
# --------------------------------------------------------------------------------------------


def _proto(dtype, dims, content=b""):
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(n)) for n in dims]
    )
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, tensor_content=content)


def _bad_requests():
    """(name, inputs, signature, expected code, words the server's message must contain)."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    nan = np.full((8, 8, 8), np.nan, np.float32)
    inf = np.full((8, 8, 8), np.inf, np.float64)
    return [
        ("dtype", {"volume": np.zeros((8, 8, 8), np.float32)}, None, invalid,
         "Expects arg[0] ('volume') to be int16 but float is provided"),
        # int16 cannot hold NaN or Inf; a float volume carrying them is refused for its dtype.
        ("nan", {"volume": nan}, None, invalid, "('volume') to be int16 but float is provided"),
        ("inf", {"volume": inf}, None, invalid, "('volume') to be int16 but double is provided"),
        ("rank", {"volume": np.zeros((8, 8, 8, 1), np.int16)}, None, invalid,
         "input 'volume': expected shape [?, ?, ?] (rank 3), got [8, 8, 8, 1]"),
        ("empty", {"volume": np.zeros((0, 8, 8), np.int16)}, None, invalid,
         "input 'volume': empty volume [0, 8, 8]; expected int16 [D, H, W] with every side >= 1"),
        ("too large", {"volume": np.zeros((65, 8, 8), np.int16)}, None, invalid,
         "input 'volume': volume [65, 8, 8] exceeds the server's max_volume_shape [64, 64, 64]"),
        ("missing key", {}, None, invalid, "Missing but required: {volume}"),
        ("unknown key", {"scan": np.zeros((8, 8, 8), np.int16)}, None, invalid,
         "input tensor alias not found in signature: scan. Inputs expected to be in the set "
         "{volume}"),
        ("unknown signature", {"volume": np.zeros((8, 8, 8), np.int16)}, "classify",
         grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "classify" not found.'),
        ("short content", {"volume": _proto(types_pb2.DT_INT16, (8, 8, 8), b"\0" * 10)}, None,
         invalid, "input 'volume': tensor_content holds 10 bytes, but shape [8, 8, 8] of int16 "
         "needs 1024"),
        # A shape that would decode to terabytes from a few bytes: refused before decoding.
        ("shape bomb", {"crops": _proto(types_pb2.DT_INT16, (10**9, 16, 16, 16))}, "detect_crop",
         invalid, "input 'crops': shape [1000000000, 16, 16, 16] would decode to 8192000000000 "
         "bytes, over the server's limit of 1048576"),
        ("over message limit", {"volume": np.zeros((64, 64, 160), np.int16)}, None,
         grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max"),
    ]  # fmt: skip


def test_hostile_requests_interleaved_with_good_ones(standin_base):
    good = _volume()
    want = _local(standin_base, 2, good)
    server = DevServer(
        standin_base, port=0, max_volume_shape=(64, 64, 64), max_message_bytes=1 << 20
    )
    with server, Agg3DClient(server.target, deadline_s=30) as client:
        answered = 0
        for name, inputs, signature, code, words in _bad_requests():
            got, version = client.predict({"volume": good})
            assert version == 2
            for key in contract.DETECT_OUTPUTS:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"before {name}")
            answered += 1
            err = _status(
                lambda inputs=inputs, signature=signature: client.predict(inputs, signature)
            )
            assert err.code == code, (name, err)
            assert words in err.details, (name, err.details)
        got, _ = client.predict({"volume": good})
        np.testing.assert_array_equal(got["scores"], want["scores"])
        assert answered == len(_bad_requests())
        # The client refuses what it can before sending: NaN/Inf HU, a volume of rank 2.
        for volume, words in (
            (np.full((8, 8, 8), np.nan), "expected finite HU values, found NaN or inf"),
            (np.zeros((8, 8)), "expected a [D, H, W] array, got shape [8, 8]"),
        ):
            assert words in str(_status(lambda volume=volume: client.detect_volume(volume)))
        # The model's own limit (96 per side) still holds without the server's.
    with DevServer(standin_base, port=0) as server, Agg3DClient(server.target) as client:
        err = _status(lambda: client.predict({"volume": np.zeros((97, 8, 8), np.int16)}))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "1 <= D <= 96" in err.details


# --------------------------------------------------------------------------------------------
# A version published while requests are in flight
# --------------------------------------------------------------------------------------------


def test_version_published_mid_flight_old_calls_finish_on_the_old_one(tmp_path, helpers):
    base, staging = tmp_path / "base", tmp_path / "staging"
    helpers.export_standin(base, version=1, scale=1.0)
    helpers.export_standin(staging, version=2, scale=2.0)
    volume = _volume()
    want = {v: _local(b, v, volume)["scores"] for v, b in ((1, base), (2, staging))}
    assert not np.allclose(want[1], want[2])
    server = DevServer(str(base), port=0, poll_s=0.1, delay_s=3.0, log=lambda line: None)
    with server, Agg3DClient(server.target, deadline_s=60) as client:
        pool = concurrent.futures.ThreadPoolExecutor(3)
        in_flight = [pool.submit(client.predict, {"volume": volume}) for _ in range(2)]
        time.sleep(0.5)
        # Publish version 2 atomically (a directory rename, as export_saved_model does).
        os.rename(staging / "agg3d" / "2", base / "agg3d" / "2")
        end = time.monotonic() + 60
        while True:
            states = {s["version"]: s["state"] for s in client.get_model_status()}
            if states.get(2) == "AVAILABLE" or time.monotonic() > end:
                break
            time.sleep(0.05)
        assert states[2] == "AVAILABLE"
        still_running = not any(f.done() for f in in_flight)
        if still_running:
            assert states[1] == "UNLOADING"  # held by the calls in flight
        fresh = pool.submit(client.predict, {"volume": volume})
        for future in in_flight:
            outputs, version = future.result(timeout=60)
            assert version == 1
            np.testing.assert_array_equal(outputs["scores"], want[1])
        outputs, version = fresh.result(timeout=60)
        assert version == 2
        np.testing.assert_array_equal(outputs["scores"], want[2])
        pool.shutdown()
        states = {s["version"]: s["state"] for s in client.get_model_status()}
        assert states == {1: "END", 2: "AVAILABLE"}
    assert still_running, "the calls in flight ended before version 2 loaded (machine too slow?)"
