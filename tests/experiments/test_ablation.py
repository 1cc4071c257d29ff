"""Ablations (tf_agg3d.experiments.ablation*, python -m tf_agg3d.ablate).

Fast cases: the suites' deltas on a base config, the paired bootstrap on constructed matches
whose answer is known, the runner's bookkeeping (resume, shared runs, seeds) with an injected
trainer that writes predictions instead of training, and the report's columns. The slow case
runs the real command (``--suite smoke``) on a 4-scan cache and reruns it.
"""

from __future__ import annotations

import json
import os

import pytest
from support import (
    EXPERIMENT_SECTIONS,
    PYTHON,
    run_command,
    tiny_config_file,
    write_cache,
)

from tf_agg3d.config import load_config, to_dict
from tf_agg3d.data.cache import cache_voxel_to_world
from tf_agg3d.data.luna16 import csv_io
from tf_agg3d.evaluation.io import read_annotations, read_predictions
from tf_agg3d.experiments import ablation as ab_lib
from tf_agg3d.experiments import ablation_report, ablation_suites, model_run, plan
from tf_agg3d.experiments.paired_bootstrap import paired_difference
from tf_agg3d.experiments.scoring import scan_match

# A longer bootstrap than the other experiment tests: the report's paired CIs.
SECTIONS = EXPERIMENT_SECTIONS | {"evaluation": {"bootstrap": 50}}


def _base(tmp_path, stages, crop=(128, 128, 128), **train_settings):
    train = {"stages": list(stages), **train_settings}
    sections = {**SECTIONS, "train": train, "data": {"crop_size": list(crop)}}
    return tiny_config_file(tmp_path, sections)


# --------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------


def _overrides(variant, base_path):
    return dict(
        o.split("=", 1) for o in ablation_suites.variant_overrides(variant, load_config(base_path))
    )


def test_variants_change_only_their_rows_settings(tmp_path):
    suite = ablation_suites.get_suite("table3")
    base = _base(tmp_path, ["rpn", "joint", "abs", "joint"], max_steps=10)
    by_name = {v.name: _overrides(v, base) for v in suite.variants}
    assert by_name["3d_ag"]["train.stages"] == "[rpn,joint,abs,joint]"
    assert by_name["3d_ag"]["model.fpr.diameter_alignment"] == "true"
    assert by_name["3d_ag"]["model.fpr.local_magnification"] == "false"
    assert by_name["3d_ag_lm"]["model.fpr.local_magnification"] == "true"
    assert by_name["no_da"]["model.fpr.diameter_alignment"] == "false"
    # The base's ABS round is kept; only phase 2 changes.
    assert by_name["rpn_only"] == {"model.fpr.enabled": "false", "train.stages": "[rpn,abs,rpn]"}
    assert by_name["alternating"]["train.stages"] == "[rpn,alternating,abs,alternating]"
    assert by_name["crop96"]["data.crop_size"] == "[96,96,96]"
    # Apart from the keys they name, the variants are the base.
    assert set(by_name["alternating"]) == set(by_name["3d_ag"])
    assert set(by_name["crop96"]) - set(by_name["3d_ag"]) == {"data.crop_size"}

    small = _base(tmp_path, ["rpn", "joint"], crop=(64, 64, 64), max_steps=0)
    assert _overrides(suite.variant("rpn_only"), small)["train.stages"] == "[rpn]"
    assert _overrides(suite.variant("crop96"), small)["data.crop_size"] == "[48,48,48]"
    assert ablation_suites.variant_stages(["rpn"], "joint") == ("rpn", "joint")
    # The matched-steps RPN-only row: 3D-AG trains 2 phases (3 with ABS), RPN only 1 (2).
    steps = suite.variant("rpn_only_steps")
    assert set(by_name["rpn_only_steps"]) - set(by_name["rpn_only"]) == {"train.max_steps"}
    assert by_name["rpn_only_steps"]["train.max_steps"] == "15"  # 10 per phase, x 3/2
    # Without max_steps, epochs: x 2 beside rpn,joint.
    assert "train.max_steps" not in _overrides(steps, small)
    assert _overrides(steps, small)["train.epochs"] == str(2 * load_config(small).train.epochs)
    assert steps.optional and steps.paper == suite.variant("rpn_only").paper
    table2 = {v.name: _overrides(v, small) for v in ablation_suites.get_suite("table2").variants}
    assert {o["loss.rpn_classification"] for o in table2.values()} == {
        "adaptive_focal",
        "focal",
        "ohem",
    }
    assert all(o["model.fpr.enabled"] == "false" for o in table2.values())
    # Every paper row has its number (the vanilla focal loss: not reported).
    assert suite.variant("3d_ag").paper.combined == 0.939
    assert ablation_suites.get_suite("table2").variant("focal").paper.combined is None
    with pytest.raises(plan.ExperimentError, match="unknown suite"):
        ablation_suites.get_suite("table9")


def test_rpn_only_abs_recipe_is_a_valid_stage_list():
    assert plan.parse_stages("rpn,abs,rpn") == ("rpn", "abs", "rpn")
    steps = plan.plan_steps("rpn,abs,rpn")
    assert [(s.label, s.checkpoint_dir, s.before_abs) for s in steps] == [
        ("rpn", "rpn", True),
        ("abs", "", False),
        ("rpn_abs", "rpn_abs", False),
    ]
    for bad in ("rpn,abs", "rpn,abs,rpn,rpn", "rpn,abs,joint,rpn"):
        with pytest.raises(plan.ExperimentError, match="stage"):
            plan.parse_stages(bad)


# --------------------------------------------------------------------------------------------
# Paired bootstrap
# --------------------------------------------------------------------------------------------

N_SCANS = 20


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """20 scans with one 6 mm nodule each at (10, 10, 10)."""
    root = tmp_path_factory.mktemp("paired")
    path = root / "annotations.csv"
    lines = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    lines += [f"s{i:02d},10,10,10,6" for i in range(N_SCANS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"root": root, "annotations": read_annotations(str(path))}


def _match(truth, name, hit_scans):
    """A detector that hits the nodule of `hit_scans` (p 0.9) and marks one FP per scan."""
    rows = []
    for i in range(N_SCANS):
        uid = f"s{i:02d}"
        if i in hit_scans:
            rows.append(
                {"seriesuid": uid, "coordX": 10, "coordY": 10, "coordZ": 10, "probability": 0.9}
            )
        rows.append(
            {"seriesuid": uid, "coordX": 60, "coordY": 60, "coordZ": 60, "probability": 0.2}
        )
    path = str(truth["root"] / f"{name}.csv")
    csv_io.write_predictions(path, rows)
    uids = [f"s{i:02d}" for i in range(N_SCANS)]
    return scan_match(
        truth["annotations"], None, read_predictions(path), uids, load_config().evaluation
    )


def test_identical_detectors_differ_by_zero_with_a_ci_of_zero(truth):
    a = _match(truth, "a", set(range(0, N_SCANS, 2)))
    b = _match(truth, "b", set(range(0, N_SCANS, 2)))
    d = paired_difference([a], [b], n=200, seed=1)
    assert d.difference == 0.0
    # Paired: the same resample for both, so every replicate differs by exactly 0 (an unpaired
    # bootstrap of two FROCs near 0.5 on 20 scans would spread about +-0.3).
    assert d.ci_lower == 0.0 and d.ci_upper == 0.0


def test_a_detector_that_finds_more_nodules_is_ahead_with_a_ci_above_zero(truth):
    all_hits = _match(truth, "all", set(range(N_SCANS)))
    half = _match(truth, "half", set(range(0, N_SCANS, 2)))
    d = paired_difference([all_hits], [half], n=200, seed=1)
    assert d.difference == pytest.approx(0.5)
    assert 0.0 < d.ci_lower <= d.difference <= d.ci_upper
    reverse = paired_difference([half], [all_hits], n=200, seed=1)
    assert reverse.difference == pytest.approx(-0.5) and reverse.ci_upper < 0.0
    # Seeds are pooled by their mean: seeds (all, half) vs (half) -> +0.25.
    pooled = paired_difference([all_hits, half], [half], n=200, seed=1)
    assert pooled.difference == pytest.approx(0.25)
    assert 0.0 < pooled.ci_lower <= pooled.ci_upper < 0.5
    other = _match(truth, "fewer", set(range(5)))
    other.seriesuids = other.seriesuids[::-1]
    with pytest.raises(ValueError, match="same scans"):
        paired_difference([other], [half])


# --------------------------------------------------------------------------------------------
# The runner's bookkeeping, with an injected trainer
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_training(monkeypatch):
    """Replaces training + prediction: 3d_ag-like variants hit every nodule, others one per
    scan; each call is counted."""
    calls = []

    def train_and_predict(run, steps, configs, cache_dir, uids, strategy, log, tag):
        calls.append(tag)
        rows = []
        for uid in uids:
            with open(os.path.join(cache_dir, f"{uid}.json"), encoding="utf-8") as f:
                meta = json.load(f)
            nodules = meta["nodules"] if configs[0].model.fpr.enabled else meta["nodules"][:1]
            for n in nodules:
                x, y, z = cache_voxel_to_world(meta, [n["z"], n["y"], n["x"]])
                p = 0.9
                rows.append(
                    {
                        "seriesuid": uid,
                        "coordX": x,
                        "coordY": y,
                        "coordZ": z,
                        "probability": p,
                        "diameter_mm": n["d"],
                        "rpn_score": p,
                        "fpr_score": p,
                    }
                )
        os.makedirs(run.path, exist_ok=True)
        csv_io.write_predictions(run.predictions, rows)
        return {
            "checkpoint": "ckpt-1",
            "findings": len(rows),
            "timings": {"rpn": 1.0},
            "train_seconds": 1.0,
            "predict_seconds": 0.5,
        }

    monkeypatch.setattr(model_run, "train_and_predict", train_and_predict)
    return calls


def _ablation(tmp_path, suites=("smoke",), **kwargs):
    cache = os.path.join(str(tmp_path), "cache")
    if not os.path.isdir(cache):
        write_cache(cache, n_scans=4)  # scan{i} in subset i
    return ab_lib.Ablation(
        str(tmp_path / "out"),
        cache,
        suites,
        base_config=_base(tmp_path, ["rpn", "joint"]),
        test_subsets=(2, 3),
        log=lambda line: None,
        **kwargs,
    )


def test_finished_runs_are_skipped_and_unfinished_ones_rerun(tmp_path, fake_training):
    ablation = _ablation(tmp_path, seeds=2)
    keys = ablation.keys()
    assert [k.name for k in keys] == [
        "smoke/3d_ag/0",
        "smoke/3d_ag/1",
        "smoke/rpn_only/0",
        "smoke/rpn_only/1",
    ]
    assert ablation.split() == {"train": ["scan0", "scan1"], "test": ["scan2", "scan3"]}
    for key in keys:
        ablation.run(key)
    assert len(fake_training) == 4
    for key in keys:  # all done: nothing trains again
        ablation.run(key)
    assert len(fake_training) == 4
    done = ablation.run_dir(keys[0]).read_done()
    assert done["scores"]["combined"] == pytest.approx(1.0) and done["fprn"] is True
    assert done["seriesuids"] == ["scan2", "scan3"]
    # A run killed before its marker runs again, and only it.
    os.remove(ablation.run_dir(keys[2]).done_path)
    for key in keys:
        ablation.run(key)
    assert fake_training[4:] == [keys[2].name]
    # Another split in the same output folder is refused.
    moved = ab_lib.Ablation(
        str(tmp_path / "out"),
        os.path.join(str(tmp_path), "cache"),
        ["smoke"],
        base_config=ablation.base_config,
        test_subsets=(3,),
        log=lambda line: None,
    )
    with pytest.raises(plan.ExperimentError, match="use a new --out"):
        moved.write_split()


def test_runs_differ_only_by_seed_and_identical_variants_share_runs(tmp_path):
    ablation = _ablation(tmp_path, suites=("table3", "table2"))
    a0, a1 = (ab_lib.RunKey("table3", "3d_ag", s) for s in (0, 1))
    c0, c1 = to_dict(ablation.config(a0)), to_dict(ablation.config(a1))
    diff = {
        (sec, k)
        for sec in c0
        for k in c0[sec]
        if isinstance(c0[sec], dict) and c0[sec][k] != c1[sec][k]
    }
    assert diff == {("train", "seed"), ("data", "seed")}
    assert ablation.config(a1).data.fold == -1
    assert ablation.config(a1).data.train_seriesuids.endswith("train_seriesuids.csv")
    # table2's adaptive focal loss is table3's RPN only on this (adaptive focal) base.
    shared = [p for p in ablation.planned if p.variant.name == "adaptive_focal"][0]
    assert shared.runs_of == ("table3", "rpn_only")
    assert "crop96" not in {p.variant.name for p in ablation.planned}  # optional
    assert len(ablation.keys()) == 3 * (5 + 2)  # 5 table3 variants, focal and ohem
    with pytest.raises(plan.ExperimentError, match="unknown variant"):
        _ablation(tmp_path, variants=["nope"])
    with pytest.raises(plan.ExperimentError, match="suite/variant/seed"):
        ab_lib.parse_run("3d_ag:1")


def test_report_columns_and_paired_difference(tmp_path, fake_training):
    ablation = _ablation(tmp_path, seeds=2)
    for key in ablation.keys()[:3]:  # rpn_only seed 1 is not done yet
        ablation.run(key)
    report = ablation_report.write_report(ablation, command="python -m tf_agg3d.ablate ...")
    with open(report["files"]["ablation.csv"], encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == ",".join(ablation_report.COLUMNS)
    assert len(lines) == 1 + 3 + 2  # a row per finished run, an aggregate row per variant
    agg = {r["variant"]: r for r in report["variants"]}
    assert agg["3d_ag"]["runs"] == 2 and agg["3d_ag"]["froc"] == pytest.approx(1.0)
    assert agg["3d_ag"]["diff_vs_baseline"] is None  # the baseline
    rpn = agg["rpn_only"]
    assert rpn["runs"] == 1 and rpn["fprn_froc"] is None and rpn["paper_froc"] == 0.917
    assert rpn["froc"] < 1.0
    assert rpn["diff_vs_baseline"] == pytest.approx(rpn["froc"] - 1.0)
    assert rpn["diff_ci_lower"] <= rpn["diff_vs_baseline"] <= rpn["diff_ci_upper"] < 0
    with open(report["files"]["ablation.md"], encoding="utf-8") as f:
        md = f.read()
    assert "| RPN only | " in md and "1/2 |" in md and "0.939 (0.930 / 0.908)" in md
    assert "paired bootstrap" in md and "(baseline)" in md
    with open(report["files"]["ablation.png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _command(cache, config, out, *extra):
    return [
        PYTHON,
        "-m",
        "tf_agg3d.ablate",
        "--suite",
        "smoke",
        "--data",
        cache,
        "--base_config",
        config,
        "--out",
        str(out),
        "--test-subsets",
        "2,3",
        *extra,
    ]


def test_usage_errors_end_with_status_2(tmp_path):
    cache = write_cache(tmp_path / "cache", n_scans=4)
    config = _base(tmp_path, ["rpn", "joint"])
    code, log = run_command(
        _command(cache, config, tmp_path / "out", "--suite", "table9"), timeout=120
    )
    assert code == 2 and "unknown suite 'table9'" in log and "Traceback" not in log, log[-2000:]
    code, log = run_command(
        _command(cache, config, tmp_path / "out", "--test-subsets", "7"), timeout=120
    )
    assert code == 2 and "no test scan" in log, log[-2000:]


@pytest.mark.slow
def test_smoke_suite_end_to_end_and_its_resume(tmp_path):
    cache = write_cache(tmp_path / "cache", n_scans=4, shape=(40, 40, 40))
    config = tiny_config_file(tmp_path, EXPERIMENT_SECTIONS)
    out = tmp_path / "out"
    code, log = run_command(_command(cache, config, out))
    assert code == 0, log[-4000:]
    for run in ("3d_ag", "rpn_only"):
        done = json.loads(
            (out / "runs" / "smoke" / run / "seed0" / "DONE.json").read_text(encoding="utf-8")
        )
        assert done["seriesuids"] == ["scan2", "scan3"]
        assert set(done["scores"]) == {"combined", "rpn", "fprn"}
    assert done["steps"] == ["rpn"] and done["fprn"] is False
    assert (out / "ablation.png").exists() and "| 3D-AG (DA, joint) |" in log
    with open(out / "ablation.csv", encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 1 + 2 + 2
    code, log = run_command(_command(cache, config, out))
    assert code == 0, log[-4000:]
    assert "2 run(s) already done; skipped" in log and "[rpn] phase rpn" not in log
