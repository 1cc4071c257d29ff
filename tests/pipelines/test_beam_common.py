"""The Beam jobs' parts that need no pipeline run: runner defaults, dead letters, job lists,
shards, one DoFn call, and the command lines' usage errors (fast)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from support import PYTHON, REPO, subprocess_env, write_cache

from tf_agg3d.pipelines import (
    common,
    predict_inference,
    predict_jobs,
    predict_model,
    predict_output,
)
from tf_agg3d.pipelines import preprocess as preprocess_job
from tf_agg3d.pipelines.common import Failure

needs_beam = pytest.mark.skipif(common.beam is None, reason="needs apache-beam (the beam extra)")


# ---------------------------------------------------------------------------------------------
# Runner options
# ---------------------------------------------------------------------------------------------


@needs_beam
def test_no_runner_means_the_direct_runner_on_every_local_core():
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    options, info = common.pipeline_options([], cores=3)
    direct = options.view_as(DirectOptions)
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    assert direct.direct_running_mode == "multi_processing" and direct.direct_num_workers == 3
    assert (info.local, info.workers, info.threads_per_worker) == (True, 3, 1)
    assert info.describe() == "DirectRunner (multi_processing, 3 worker(s))"


@needs_beam
@pytest.mark.parametrize(
    "args, workers, threads, mode",
    [
        (["--direct_num_workers=2"], 2, 2, "multi_processing"),
        (["--runner", "DirectRunner", "--direct_num_workers", "4"], 4, 1, "multi_processing"),
        (["--direct_running_mode=in_memory"], 1, None, "in_memory"),
        (
            ["--direct_running_mode=multi_threading", "--direct_num_workers=2"],
            2,
            None,
            "multi_threading",
        ),
    ],
)
def test_direct_runner_settings_given_are_kept(args, workers, threads, mode):
    _, info = common.pipeline_options(args, cores=4)
    assert (info.workers, info.threads_per_worker, info.mode) == (workers, threads, mode)
    assert info.local


@needs_beam
def test_cluster_runners_are_not_local_unless_loopback():
    dataflow = ["--runner", "DataflowRunner", "--project=p", "--region=europe-west4"]
    _, info = common.pipeline_options([*dataflow, "--temp_location=gs://b/tmp"])
    assert (info.name, info.local, info.workers) == ("DataflowRunner", False, None)
    with pytest.raises(ValueError, match="--out /data/cache"):
        common.check_reachable(info, [("--luna-root", "gs://b/luna"), ("--out", "/data/cache")])
    common.check_reachable(info, [("--luna-root", "gs://b/luna"), ("--out", "s3://b/c")])
    _, flink = common.pipeline_options(["--runner=FlinkRunner", "--environment_type=LOOPBACK"])
    assert flink.local
    common.check_reachable(flink, [("--out", "/data/cache")])


@needs_beam
def test_arguments_beam_does_not_know_are_refused():
    assert common.unknown_beam_args(["--runner=DirectRunner", "--job_name=x"]) == []
    assert common.unknown_beam_args(["--direct_num_worker=2", "stray"]) == [
        "--direct_num_worker=2",
        "stray",
    ]
    with pytest.raises(ValueError, match="--bogus"):
        common.pipeline_options(["--bogus=1"])


def test_without_beam_the_jobs_name_the_extra(monkeypatch):
    monkeypatch.setattr(common, "beam", None)
    with pytest.raises(ImportError, match=r"tf_agg3d\[beam\]"):
        common.require_beam()


# ---------------------------------------------------------------------------------------------
# Dead letters, job lists, shards
# ---------------------------------------------------------------------------------------------


def test_failures_csv_round_trips_commas_quotes_and_newlines(tmp_path):
    failures = [
        Failure("b.2", "read", common.error_message(OSError('no "such", file\nat all'))),
        Failure("a.1", "list", "no subset*/a.1.mhd under /x"),
    ]
    path = tmp_path / "_failures.csv"
    common.write_failures(str(path), failures)
    text = path.read_text()
    assert text.splitlines()[0] == "uid,stage,error"
    back = common.read_failures(str(path))
    assert [f.uid for f in back] == ["a.1", "b.2"]
    assert back[1].error == 'OSError: no "such", file at all'
    common.write_failures(str(path), [])
    assert path.read_text() == "uid,stage,error\n" and common.read_failures(str(path)) == []
    assert common.read_failures(str(tmp_path / "absent.csv")) == []


def test_default_dead_letter_file_sits_beside_the_csv():
    assert predict_output.default_failures_path("/o/p.csv") == "/o/p_failures.csv"
    assert predict_output.default_failures_path("gs://b/p") == "gs://b/p_failures.csv"


def test_jobs_follow_predicts_order(tmp_path, luna):
    cache_dir = write_cache(tmp_path / "cache", n_scans=3)
    jobs, missing = predict_jobs.plan_jobs(cache=cache_dir)
    assert [(j.order, j.uid, j.source) for j in jobs] == [
        (0, "scan0", "cache"),
        (1, "scan1", "cache"),
        (2, "scan2", "cache"),
    ]
    assert missing == {}
    jobs, _ = predict_jobs.plan_jobs(cache=cache_dir, seriesuids=["scan2", "nope"])
    assert [j.uid for j in jobs] == ["scan2", "nope"]  # "nope" fails when it is read

    wanted = [luna.good[1], "1.2.3.missing", luna.good[0]]
    jobs, missing = predict_jobs.plan_jobs(luna_root=str(luna.root), seriesuids=wanted)
    assert [(j.order, j.uid) for j in jobs] == [(0, luna.good[1]), (2, luna.good[0])]
    assert all(j.source == "scan" and j.mask_path.endswith(".mhd") for j in jobs)
    assert (
        list(missing) == ["1.2.3.missing"]
        and "no subset*/1.2.3.missing.mhd" in (missing["1.2.3.missing"])
    )

    listing = tmp_path / "scans.txt"
    listing.write_text("# scans\n/data/a/scan-7.mhd\n\n/data/b/case.nii.gz\n")
    paths = predict_jobs.read_scan_list(str(listing))
    jobs, _ = predict_jobs.plan_jobs(scans=paths)
    assert [(j.uid, j.path) for j in jobs] == [
        ("scan-7", "/data/a/scan-7.mhd"),
        ("case", "/data/b/case.nii.gz"),
    ]


@needs_beam
def test_shards_merge_into_one_csv_in_input_order_with_every_digit(tmp_path):
    shards = str(tmp_path / ".tmp-p.csv-shards-x")
    row = {
        "seriesuid": "u2",
        "coordX": 0.1 + 0.2,
        "coordY": -1.0,
        "coordZ": 3.0,
        "probability": 0.123456789012345,
        "diameter_mm": 5.0,
        "rpn_score": 0.1,
        "fpr_score": 0.2,
    }
    writer = predict_output.WriteShardFn(shards)
    (first,) = writer.process((1, [predict_output.ScanRows(2, "u2", (row,))]))
    other = {**row, "seriesuid": "u0"}
    items = [predict_output.ScanRows(3, "u3", ()), predict_output.ScanRows(0, "u0", (other, other))]
    (second,) = writer.process((0, items))
    out = tmp_path / "p.csv"
    assert predict_output.merge_shards([first, second], str(out), shards) == 3
    lines = out.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["seriesuid", "u0", "u0", "u2"]
    assert lines[3].split(",")[1] == repr(0.1 + 0.2)
    assert not os.path.exists(shards)


@needs_beam
def test_a_corrupt_scan_becomes_a_dead_letter_of_its_stage(tmp_path, luna):
    from tf_agg3d.config import PreprocessConfig
    from tf_agg3d.data.preprocessing.runner import make_jobs

    jobs, _ = make_jobs(str(luna.root), seriesuids=[luna.broken], report=lambda line: None)
    fn = preprocess_job.PreprocessScanFn(str(tmp_path / "cache"), PreprocessConfig())
    (out,) = list(fn.process(jobs[0]))
    assert out.tag == preprocess_job.FAILED
    assert (out.value.uid, out.value.stage) == (luna.broken, "read")
    assert "truncated" in out.value.error

    load = predict_inference.LoadVolumeFn(PreprocessConfig())
    job = predict_jobs.PredictJob(0, "absent", "cache", str(tmp_path / "cache"))
    (out,) = list(load.process(job))
    assert (out.tag, out.value.stage) == (predict_inference.FAILED, "read")


@needs_beam
def test_inference_dead_letters_name_each_scan_of_the_batch():
    batch = [("u1", object()), ("u2", object())]
    error = (ValueError, "ValueError('shape\\n too big')", ["tb"])
    failures = list(predict_inference.inference_failures((batch, error)))
    assert [(f.uid, f.stage) for f in failures] == [("u1", "inference"), ("u2", "inference")]
    assert failures[0].error == "ValueError: ValueError('shape\\n too big')"


def test_a_version_folder_or_its_model_base_names_the_export(tmp_path):
    for version in (1, 3):
        folder = tmp_path / "agg3d" / str(version)
        folder.mkdir(parents=True)
        (folder / "saved_model.pb").write_bytes(b"")
    (tmp_path / "agg3d" / "4").mkdir()  # a version still being written: no saved_model.pb
    assert predict_model.resolve_export(str(tmp_path / "agg3d" / "1")).endswith("agg3d/1")
    assert predict_model.resolve_export(str(tmp_path / "agg3d")).endswith("agg3d/3")
    with pytest.raises(FileNotFoundError, match="EXPORT_BASE/agg3d/VERSION"):
        predict_model.resolve_export(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------


def _command(code: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-c", code],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _main(module: str, args: list[str], hide_beam: bool = False) -> subprocess.CompletedProcess:
    hide = "sys.modules['apache_beam'] = None\n" if hide_beam else ""
    code = (
        f"import runpy, sys\n{hide}sys.argv = ['-m'] + {json.dumps(args)}\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    return _command(code)


def test_without_beam_the_commands_exit_2_naming_the_extra(tmp_path):
    proc = _main(
        "tf_agg3d.pipelines.preprocess",
        ["--luna-root", str(tmp_path), "--out", str(tmp_path / "c")],
        hide_beam=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "tf_agg3d[beam]" in proc.stderr and "Traceback" not in proc.stderr


@needs_beam
def test_usage_errors_exit_2_before_any_work(tmp_path):
    out = str(tmp_path / "p.csv")
    graph = _main(
        "tf_agg3d.pipelines.predict",
        ["--export", str(tmp_path), "--cache", str(tmp_path), "--out", out, "--threshold=0.5"],
    )
    assert graph.returncode == 2 and "--threshold: need --model-dir" in graph.stderr
    both = _main("tf_agg3d.pipelines.predict", ["--export", "e", "--model-dir", "m", "--out", out])
    assert both.returncode == 2 and "exactly one of --export or --model-dir" in both.stderr
    stray = _main(
        "tf_agg3d.pipelines.preprocess",
        ["--luna_root", str(tmp_path), "--out", str(tmp_path / "c"), "--direct_num_worker=2"],
    )
    assert stray.returncode == 2 and "usage error" in stray.stderr
    assert "--direct_num_worker=2" in stray.stderr
    assert not os.path.exists(tmp_path / "c") and not os.path.exists(out)
