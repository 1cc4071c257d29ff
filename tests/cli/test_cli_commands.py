"""The commands as a user runs them: both flag spellings, exit statuses 0/1/2, quiet logs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
from cli_testlib import REPO, run_command, write_eval_inputs, write_luna16_folder

TF_INFO_MARKERS = ("I0000", "oneDNN custom operations", "cpu_feature_guard")


def _eval_args(files, out, *extra):
    return (
        f"--annotations={files['annotations']}",
        f"--predictions={files['predictions']}",
        f"--seriesuids={files['seriesuids']}",
        f"--out={out}",
        *extra,
    )


def test_evaluate_takes_dashed_and_underscored_flags_alike(tmp_path):
    files = write_eval_inputs(tmp_path)
    summaries = []
    for spelling, flags_ in (
        ("dashed", ["--max-marks=1", "--tnp-sensitivity=0.5", "--gallery-fp=0", "--bootstrap=0"]),
        (
            "under",
            ["--max_marks", "1", "--tnp_sensitivity", "0.5", "--gallery_fp=0", "--bootstrap=0"],
        ),
    ):
        proc = run_command("tf_agg3d.evaluate", *_eval_args(files, tmp_path / spelling, *flags_))
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        summaries.append({k: summary[k] for k in ("froc_score", "max_marks_per_scan")})
    assert summaries[0] == summaries[1]
    assert summaries[0]["max_marks_per_scan"] == 1


def test_preprocess_takes_both_spellings_and_exits_1_when_some_scans_failed(tmp_path):
    root = tmp_path / "luna16"
    write_luna16_folder(root)
    for n, flag in enumerate(("--luna-root", "--luna_root")):
        proc = run_command("tf_agg3d.preprocess", flag, root, "--out", tmp_path / f"cache{n}")
        # 1: one scan failed (named on stderr or stdout), the other is cached.
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "1.2.3" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
        assert (tmp_path / f"cache{n}" / "1.2.4.npy").exists()


@pytest.mark.parametrize(
    "module, args, kind, words",
    [
        ("tf_agg3d.evaluate", ["--no_such_flag=1"], "usage error", "no_such_flag"),
        ("tf_agg3d.evaluate", ["--max-marks=many"], "usage error", "--max-marks"),
        ("tf_agg3d.evaluate", ["--annotations=a.csv"], "usage error", "--predictions"),
        ("tf_agg3d.preprocess", ["--out=/tmp/unused"], "usage error", "luna-root"),
        ("tf_agg3d.demo", ["extra", "arguments"], "usage error", "unexpected arguments"),
        # The realistic profile's held-out subsets are 6-9: 5 scans (subsets 0-4) hold none.
        ("tf_agg3d.demo", ["--n-scans=5", "--out=/tmp/unused"], "usage error", "0 held-out"),
        ("tf_agg3d.demo", ["--profile=easy"], "usage error", "--profile"),
        (
            "tf_agg3d.preprocess",
            ["--luna-root=/nonexistent", "--out=/tmp/unused", "--set", "preprocess.nope=1"],
            "ConfigError",
            "preprocess.nope",
        ),
        (
            "tf_agg3d.preprocess",
            ["--luna-root=/x", "--out=/tmp/unused", "--set=preprocess.hu_window=[-1000,400]"],
            "ConfigError",
            "model.backbone.hu_window",
        ),
    ],
)
def test_usage_config_and_input_errors_exit_2_with_one_line(module, args, kind, words):
    proc = run_command(module, *args)
    assert proc.returncode == 2, proc.stderr
    assert f"{kind}: " in proc.stderr and words in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_evaluate_with_bad_input_exits_2_naming_the_file(tmp_path):
    files = write_eval_inputs(tmp_path)
    with open(files["predictions"], "w") as f:
        f.write("seriesuid,coordX\n")
    proc = run_command("tf_agg3d.evaluate", *_eval_args(files, tmp_path / "e", "--bootstrap=0"))
    assert proc.returncode == 2
    assert "DataError: " in proc.stderr and "predictions.csv" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("module", ["tf_agg3d.evaluate", "tf_agg3d.serving.client"])
def test_help_exits_0_and_lists_the_dashed_flags(module):
    proc = run_command(module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout


def test_tensorflow_info_lines_only_with_verbosity(tmp_path):
    # predict imports TensorFlow before it finds that the model directory has no config.yaml.
    args = ["--model-dir", tmp_path / "no_model", "--cache", tmp_path, "--out", tmp_path / "p.csv"]
    quiet = run_command("tf_agg3d.predict", *args, drop_env=["TF_CPP_MIN_LOG_LEVEL"])
    assert quiet.returncode == 2, quiet.stderr
    assert "no config.yaml" in quiet.stderr
    assert not [m for m in TF_INFO_MARKERS if m in quiet.stderr], quiet.stderr
    assert "Traceback" not in quiet.stderr
    for flag in (["-v", "0"], ["--verbosity=0"]):
        loud = run_command("tf_agg3d.predict", *args, *flag, drop_env=["TF_CPP_MIN_LOG_LEVEL"])
        assert loud.returncode == 2, loud.stderr
        if platform.machine().lower() in ("x86_64", "amd64"):
            # TensorFlow's x86 wheels announce oneDNN (tf_agg3d turns it on) when imported.
            assert "oneDNN custom operations" in loud.stderr, loud.stderr


_ABSL_PROGRAM = """
import logging, sys
from absl import logging as absl_logging
from tf_agg3d.cli import exit as cli_exit

def main(argv):
    absl_logging.info("absl-info-line")
    absl_logging.warning("absl-warning-line")
    logging.getLogger("tf_agg3d.something").info("project-info-line")
    return 0

cli_exit.run(main, argv=["program", *sys.argv[1:]])
"""


@pytest.mark.parametrize(
    "args, shown, hidden",
    [
        ([], ["absl-warning-line", "project-info-line"], ["absl-info-line"]),
        (["-v", "0"], ["absl-info-line", "absl-warning-line", "project-info-line"], []),
        (["--verbosity=-2"], [], ["absl-info-line", "absl-warning-line", "project-info-line"]),
    ],
)
def test_absl_info_logging_only_with_verbosity(args, shown, hidden):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", _ABSL_PROGRAM, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for line in shown:
        assert line in proc.stderr, proc.stderr
    for line in hidden:
        assert line not in proc.stderr, proc.stderr


def test_demo_refuses_a_folder_of_a_run_with_other_settings(tmp_path):
    # Both profiles give the same seriesuids per seed and every step resumes, so a re-run
    # with another profile would train on the old cache; it must stop before any step.
    settings = {
        "profile": "default",
        "n_scans": 30,
        "seed": 0,
        "test_subsets": [0, 1],
        "config": "configs/demo_cpu.yaml",
    }
    (tmp_path / "demo_settings.json").write_text(json.dumps(settings))
    proc = run_command("tf_agg3d.demo", "--out", tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "profile: 'default' -> 'realistic'" in proc.stderr, proc.stderr
    assert "n_scans: 30 -> 50" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_settings.json"]
    # A folder of the older demo (no settings record) is refused too.
    (tmp_path / "demo_settings.json").unlink()
    (tmp_path / "cache").mkdir()
    proc = run_command("tf_agg3d.demo", "--out", tmp_path)
    assert proc.returncode == 2 and "no demo_settings.json" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
