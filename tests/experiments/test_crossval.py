"""Cross-validation (tf_agg3d.experiments.crossval, python -m tf_agg3d.crossval).

Synthetic LUNA16 in the real layout (3 scans: subsets 0, 1 and 2, so 3 folds), preprocessed
into a cache; the tiny detector of tests/support.py trains 4 steps per phase. The slow cases run
the real command: once over every fold in one process, and once fold by fold (two in parallel,
one killed mid-training and resumed) followed by ``--combine``. The fast cases check the fold
and stage grammar, the pool's checks on hand-made fold folders and the usage errors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
from support import (
    EXPERIMENT_SECTIONS,
    PYTHON,
    REPO,
    read_until,
    run_command,
    subprocess_env,
    tiny_config_file,
    write_cache,
)

from tf_agg3d.cli.demo_steps import evaluate_args
from tf_agg3d.data.cache import cache_voxel_to_world
from tf_agg3d.data.luna16 import csv_io
from tf_agg3d.experiments import crossval as cv_lib

STAGES = "rpn,joint"


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Synthetic LUNA16 (3 scans, subsets 0..2), its cache and the tiny config."""
    from tf_agg3d.config import PreprocessConfig
    from tf_agg3d.data.preprocessing.runner import run_preprocess
    from tf_agg3d.data.synthetic.luna16 import generate_dataset

    root = tmp_path_factory.mktemp("crossval")
    luna = str(root / "luna16")
    summary = generate_dataset(luna, 3, seed=3, shape=(24, 96, 96))
    cache = str(root / "cache")
    result = run_preprocess(luna, cache, PreprocessConfig(), report=lambda line: None)
    assert not result.failed
    return {
        "root": root,
        "luna": luna,
        "cache": cache,
        "config": tiny_config_file(root, EXPERIMENT_SECTIONS),
        "subset": summary["subset"],
    }


def _command(dataset, out, *extra):
    return [
        PYTHON,
        "-m",
        "tf_agg3d.crossval",
        "--config",
        dataset["config"],
        "--cache",
        dataset["cache"],
        "--out",
        str(out),
        "--stages",
        STAGES,
        *[str(a) for a in extra],
    ]


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_run(dataset):
    """Every fold in one process, then the pool and its evaluation."""
    out = dataset["root"] / "one_run"
    code, log = run_command(_command(dataset, out))
    assert code == 0, log[-4000:]
    return {"out": str(out), "log": log}


def _rows(path):
    return {
        uid: [(p.x, p.y, p.z, p.probability, p.extra.get("rpn_score")) for p in preds]
        for uid, preds in csv_io.read_predictions(str(path)).items()
    }


def _assert_same_predictions(a, b):
    rows_a, rows_b = _rows(a), _rows(b)
    assert rows_a.keys() == rows_b.keys()
    for uid in rows_a:
        assert len(rows_a[uid]) == len(rows_b[uid]), uid
        np.testing.assert_allclose(
            np.asarray(rows_a[uid], np.float64), np.asarray(rows_b[uid], np.float64), atol=1e-4
        )


# --------------------------------------------------------------------------------------------
# Slow: real training
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_held_out_scan_is_pooled_once_from_the_fold_that_held_it_out(dataset, one_run):
    out = one_run["out"]
    subset = dataset["subset"]
    pooled = _rows(os.path.join(out, "predictions.csv"))
    with open(os.path.join(out, "seriesuids.csv")) as f:
        listed = f.read().split()
    assert sorted(listed) == sorted(subset)  # every scan exactly once
    assert set(pooled) <= set(subset)
    assert pooled, "the tiny model marks nothing: the test checks nothing"
    for k in range(3):
        fold = os.path.join(out, f"fold{k}")
        done = _json(os.path.join(fold, "DONE.json"))
        held = [u for u, s in subset.items() if s == k]
        assert done["seriesuids"] == held
        assert done["steps"] == ["rpn", "joint"]
        assert done["checkpoint"].endswith(os.path.join("joint", "ckpt-4"))
        assert set(done["timings"]) == {"rpn", "joint", "predict"}
        # The model of fold k trained on the other two subsets and never on subset k.
        train = _json(os.path.join(fold, "train_summary_joint.json"))
        assert (train["train_scans"], train["val_scans"]) == (2, 1)
        with open(os.path.join(fold, "config.yaml")) as f:
            assert "fold: %d" % k in f.read()
        own = _rows(os.path.join(fold, "predictions.csv"))
        assert set(own) <= set(held)
        for uid in held:
            assert pooled.get(uid, []) == own.get(uid, [])
    with open(os.path.join(out, "folds.csv")) as f:
        table = f.read().splitlines()
    assert table[0] == ",".join(cv_lib.FOLD_COLUMNS) and len(table) == 4
    assert "pooled" in one_run["log"] and "train s" in one_run["log"]


@pytest.mark.slow
def test_pooled_froc_equals_evaluate_on_the_pooled_csv(dataset, one_run, tmp_path):
    out = one_run["out"]
    summary = _json(os.path.join(out, "summary.json"))
    luna = dataset["luna"]
    assert summary["annotations"]["annotations"] == os.path.join(luna, "annotations.csv")
    predictions, uids = os.path.join(out, "predictions.csv"), os.path.join(out, "seriesuids.csv")
    evaluate = evaluate_args(luna, predictions, uids, str(tmp_path / "eval"), "--bootstrap", "20")
    code, log = run_command([PYTHON, "-m", *evaluate])
    assert code == 0, log[-3000:]
    reference = _json(tmp_path / "eval" / "summary.json")
    for key in ("froc_score", "sensitivities", "froc_ci", "ci_lower", "ci_upper", "scans"):
        assert summary[key] == reference[key], key
    assert summary["nodules"] == reference["nodules"] > 0
    assert (
        _json(os.path.join(out, "evaluation", "summary.json"))["froc_score"]
        == (reference["froc_score"])
    )
    assert len(summary["sensitivities"]) == 7
    if summary["branches"] is not None:  # the evaluation library's per-branch FROC
        assert set(summary["branches"]) == {"combined", "rpn", "fprn"}
        assert summary["branches"]["combined"]["froc_score"] == summary["froc_score"]
    # A rerun of a finished experiment trains nothing and pools the same CSV again.
    code, log = run_command(_command(dataset, out))
    assert code == 0, log[-3000:]
    assert "fold(s) 0-2 already done; skipped" in log and "[rpn]" not in log


def _wait_for(proc, pattern, lines, timeout=300):
    read_until(proc, lambda line: pattern in line, lines, timeout, f"never saw {pattern!r}")


@pytest.mark.slow
def test_folds_run_apart_killed_and_resumed_then_combined_match_one_run(dataset, one_run):
    out = dataset["root"] / "apart"
    # Folds 0 and 2 at once, as subprocesses; no pool: fold 1 is missing.
    code, log = run_command(_command(dataset, out, "--folds", "0,2", "--parallel", 2))
    assert code == 0, log[-4000:]
    assert "[fold 0] " in log and "[fold 2] " in log and "not pooled yet: fold(s) 1" in log
    assert not os.path.exists(out / "predictions.csv")

    # --combine refuses while fold 1 is missing, naming it.
    code, log = run_command(_command(dataset, out, "--combine"))
    assert code == 2 and "fold(s) 1 of 0-2 are not done" in log, log[-2000:]

    # Fold 1 killed (SIGKILL: nothing saved on the way out) after its step-2 checkpoint.
    proc = subprocess.Popen(
        _command(dataset, out, "--folds", 1),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    _wait_for(proc, "[rpn] step 3/4", lines)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not os.path.exists(out / "fold1" / "DONE.json")

    # The same command resumes it from the checkpoint and finishes it; now the pool is complete.
    code, log = run_command(_command(dataset, out, "--folds", 1))
    assert code == 0, log[-4000:]
    # From step 2, or from step 4 when the kill came after the next checkpoint.
    assert f"resumed from {out / 'fold1' / 'checkpoints' / 'rpn' / 'ckpt-'}" in log
    assert "pooled" in log

    # A fold killed after training, before its DONE.json: its finished phases return at once.
    before = _rows(out / "fold2" / "predictions.csv")
    os.remove(out / "fold2" / "DONE.json")
    os.remove(out / "fold2" / "predictions.csv")
    code, log = run_command(_command(dataset, out, "--folds", 2, "--no-pool"))
    assert code == 0, log[-4000:]
    assert "[rpn] already finished at step 4" in log and "[joint] already finished" in log
    assert _rows(out / "fold2" / "predictions.csv") == before

    # --combine over the folds run apart equals the one-process run.
    shutil.rmtree(out / "evaluation")
    code, log = run_command(_command(dataset, out, "--combine"))
    assert code == 0, log[-4000:]
    _assert_same_predictions(
        out / "predictions.csv", os.path.join(one_run["out"], "predictions.csv")
    )
    apart, one = _json(out / "summary.json"), _json(os.path.join(one_run["out"], "summary.json"))
    for key in ("froc_score", "sensitivities", "scans", "nodules", "folds_pooled"):
        assert apart[key] == one[key], key
    with (
        open(out / "seriesuids.csv") as a,
        open(os.path.join(one_run["out"], "seriesuids.csv")) as b,
    ):
        assert a.read() == b.read()


@pytest.mark.slow
def test_abs_recipe_on_one_fold_and_its_resume(dataset):
    """rpn, joint, abs, joint as train.py's recipe; a rerun redoes none of it."""
    out = dataset["root"] / "abs"
    command = [*_command(dataset, out, "--folds", 0, "--no-pool"), "--stages", "rpn,joint,abs"]
    code, log = run_command(command)
    assert code == 0, log[-4000:]
    fold = out / "fold0"
    done = _json(fold / "DONE.json")
    assert done["steps"] == ["rpn", "joint", "abs", "joint_abs"]
    assert done["checkpoint"].endswith(os.path.join("joint_abs", "ckpt-4"))
    assert _json(fold / "train_summary_joint_abs.json")["abs_file"] == str(
        fold / "abs_hard_negatives.json"
    )
    assert "[joint_abs] initialised the model from " + str(fold / "checkpoints" / "joint") in log
    before = _rows(fold / "predictions.csv")
    os.remove(fold / "DONE.json")
    code, log = run_command(command)
    assert code == 0, log[-4000:]
    assert "[rpn] finished before the ABS pass; skipped" in log
    assert "[joint] finished before the ABS pass; skipped" in log
    assert "[abs] hard negatives already mined" in log
    assert "[joint_abs] already finished at step 4" in log
    assert sorted(os.listdir(fold / "checkpoints")) == ["checkpoint", "joint", "joint_abs", "rpn"]
    assert _rows(fold / "predictions.csv") == before


# --------------------------------------------------------------------------------------------
# Fast: grammar, the pool's checks, usage errors
# --------------------------------------------------------------------------------------------


def test_fold_specs():
    assert cv_lib.parse_folds("3") == [3]
    assert cv_lib.parse_folds("0-9") == list(range(10))
    assert cv_lib.parse_folds("0,2,5") == [0, 2, 5]
    assert cv_lib.parse_folds("5, 0-2,2") == [0, 1, 2, 5]
    assert cv_lib.format_folds([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    for bad in ("", "a", "1-", "3-1", "10", "0-10", "1;2", "-1"):
        with pytest.raises(cv_lib.CrossvalError, match="folds"):
            cv_lib.parse_folds(bad)


def test_stages_follow_the_train_recipe():
    assert cv_lib.parse_stages("rpn,joint,abs") == ("rpn", "joint", "abs", "joint")
    steps = cv_lib.plan_steps(["rpn", "joint", "abs", "joint"])
    assert [(s.label, s.phase, s.checkpoint_dir) for s in steps] == [
        ("rpn", "rpn", "rpn"),
        ("joint", "joint", "joint"),
        ("abs", "abs", ""),
        ("joint_abs", "joint", "joint_abs"),
    ]
    assert [s.before_abs for s in steps] == [True, True, False, False]
    assert [s.label for s in cv_lib.plan_steps("rpn,alternating")] == ["rpn", "alternating"]
    for bad in ("rpn,abs", "joint,rpn", "rpn,joint,joint", "rpn,joint,abs,abs", "rpn,x", ""):
        with pytest.raises(cv_lib.CrossvalError, match="stage"):
            cv_lib.parse_stages(bad)


def _fake_fold(out, k, uids, rows):
    """A fold folder as run_fold leaves it: predictions.csv, then DONE.json."""
    fold = os.path.join(str(out), f"fold{k}")
    os.makedirs(fold, exist_ok=True)
    csv_io.write_predictions(os.path.join(fold, "predictions.csv"), rows)
    with open(os.path.join(fold, "DONE.json"), "w") as f:
        json.dump({"fold": k, "seriesuids": uids, "train_seconds": 1.0, "predict_seconds": 0.5}, f)


def _mark(uid, x, p):
    return {"seriesuid": uid, "coordX": x, "coordY": 20.0, "coordZ": 20.0, "probability": p}


def test_pool_checks_and_evaluates_hand_made_folds(tmp_path):
    """scan{i} is in subset i: fold k holds out scan{k}."""
    cache = write_cache(tmp_path / "cache", n_scans=3)
    out = tmp_path / "out"
    cv = cv_lib.CrossValidation(str(out), cache, log=lambda line: None)
    assert cv.cache_folds() == [0, 1, 2]
    meta = _json(os.path.join(cache, "scan0.json"))
    x, y, z = cache_voxel_to_world(meta, [meta["nodules"][0][c] for c in "zyx"])
    hit = {"seriesuid": "scan0", "coordX": x, "coordY": y, "coordZ": z, "probability": 0.9}
    _fake_fold(out, 0, ["scan0"], [hit, _mark("scan0", 1.0, 0.8)])
    _fake_fold(out, 1, ["scan1"], [_mark("scan1", 2.0, 0.7)])

    with pytest.raises(cv_lib.CrossvalError, match=r"fold\(s\) 2 of 0-2 are not done"):
        cv.pool()
    pool = cv.pool(allow_missing=True)
    assert (pool.folds, pool.missing, pool.rows) == ([0, 1], [2], 3)

    _fake_fold(out, 2, ["scan2"], [])
    pool = cv.pool()
    assert pool.folds == [0, 1, 2]
    with open(pool.seriesuids) as f:
        assert f.read().split() == ["scan0", "scan1", "scan2"]
    summary = cv.evaluate(pool)
    # No annotations.csv beside this cache and no LUNA16 root: the sidecars' nodules.
    assert summary["annotations"]["source"] == "cache sidecars"
    assert (summary["scans"], summary["nodules"], summary["true_positives"]) == (3, 6, 1)
    by_fold = {r["fold"]: r for r in summary["folds"]}
    assert by_fold[0]["nodules"] == 2 and by_fold[0]["findings"] == 2
    assert by_fold[0]["froc"] == pytest.approx(0.5)  # one of scan0's two nodules at 1 FP/scan
    assert by_fold[1]["froc"] == 0.0 and by_fold[2]["findings"] == 0
    assert "pooled" in cv_lib.format_table(summary)

    # A scan predicted by two folds, a fold with findings of a scan it did not hold out.
    _fake_fold(out, 2, ["scan2", "scan1"], [])
    with pytest.raises(cv_lib.CrossvalError, match="not of subset 2"):
        cv.pool()
    _fake_fold(out, 2, ["scan2"], [_mark("scan0", 3.0, 0.5)])
    with pytest.raises(cv_lib.CrossvalError, match="did not hold out: scan0"):
        cv.pool()
    # A fold asked for that the cache has no scan of.
    with pytest.raises(cv_lib.CrossvalError, match="fold.s. 7: the cache"):
        cv.pool([0, 7])


def _bad(dataset, out, *extra):
    code, log = run_command(_command(dataset, out, *extra), timeout=120)
    assert code == 2, log[-3000:]
    assert "Traceback" not in log
    return log


def test_bad_inputs_end_with_one_line_and_status_2(tmp_path):
    cache = write_cache(tmp_path / "cache", n_scans=3)
    config = tiny_config_file(tmp_path, EXPERIMENT_SECTIONS)
    dataset = {"cache": cache, "config": config}
    out = tmp_path / "out"
    assert "cannot read '0-x'" in _bad(dataset, out, "--folds", "0-x")
    assert "fold 12 does not exist" in _bad(dataset, out, "--folds", "12")
    assert "fold(s) 5: the cache" in _bad(dataset, out, "--folds", "5")
    assert "unknown stage(s) fpr" in _bad(dataset, out, "--folds", "0", "--stages", "rpn,fpr")
    log = _bad(dataset, out, "--combine")
    assert "fold(s) 0-2 of 0-2 are not done" in log and "--allow-missing" in log
    _fake_fold(out, 1, ["scan1"], [])
    assert "fold(s) 0,2 of 0-2 are not done" in _bad(dataset, out, "--combine")
    assert "ConfigError" in _bad(dataset, out, "--combine", "--set", "train.nope=1")
    assert "--gpus needs --parallel" in _bad(dataset, out, "--gpus", "0")
    # --allow-missing pools the done fold.
    code, log = run_command(_command(dataset, out, "--combine", "--allow-missing"), timeout=120)
    assert code == 0, log[-3000:]
    assert _json(out / "summary.json")["folds_missing"] == [0, 2]
