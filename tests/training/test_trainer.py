"""Trainer: config checks, NaN stop, Anchor Based Sampling round trip, phase-2 start."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from support import REPO, subprocess_env, tiny_config, train_command, write_cache

from tf_agg3d.config import ConfigError
from tf_agg3d.dataloaders import input_pipeline as pipeline
from tf_agg3d.models import checkpoints as ckpt_lib
from tf_agg3d.training import abs as abs_lib
from tf_agg3d.training.abs import ABS_FILE
from tf_agg3d.training.checks import validate_training_config
from tf_agg3d.training.detector_task import DetectorTask, plan_phase
from tf_agg3d.training.loop import NonFiniteLossError
from tf_agg3d.training.trainer import Trainer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"), n_scans=3)


def _one_device():
    return tf.distribute.OneDeviceStrategy("/cpu:0")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.phase=finetune", "train.phase"),
        ("data.crop_size=[40, 32, 32]", "data.crop_size"),
        ("data.crop_size=[32, 32, 48]", "data.rotate90"),
        ("data.fold=12", "data.fold"),
        ("data.abs_fraction=0.5", "data.abs_fraction"),
        ("loss.rpn_classification=hinge", "loss.rpn_classification"),
        ("train.optimizer=lbfgs", "train.optimizer"),
        ("train.distribute=tpu", "train.distribute"),
        ("data.train_seriesuids=/nonexistent/list.csv", "data.train_seriesuids"),
    ],
)
def test_bad_values_fail_naming_the_key(tmp_path, cache_dir, override, key):
    config = tiny_config(tmp_path, cache_dir, [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_training_config(config)


def test_crop_must_fit_the_backbone_when_anchors_sit_on_one_level(tmp_path, cache_dir):
    # Single-scale anchors live on stride 4 only, but the backbone still pools to stride 16.
    single = ["model.anchors.strides=[4]", "model.anchors.sizes=[[4, 6, 8, 12, 16, 24]]"]
    with pytest.raises(ConfigError, match=r"data\.crop_size: .*multiples of 16"):
        validate_training_config(
            tiny_config(tmp_path, cache_dir, [*single, "data.crop_size=[36, 32, 32]"])
        )
    validate_training_config(tiny_config(tmp_path, cache_dir, single))


def test_missing_or_empty_cache_names_the_key(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=r"data\.cache_dir: .* does not exist"):
        validate_training_config(tiny_config(tmp_path, str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data\.cache_dir: .* no cache entries"):
        validate_training_config(tiny_config(tmp_path, str(tmp_path / "empty")))
    validate_training_config(tiny_config(tmp_path, cache_dir))


def test_cli_rejects_a_bad_config_before_any_work(tmp_path, cache_dir):
    model_dir = tmp_path / "model"
    for extra, message in (
        (["--set", "data.batchsize=2"], "unknown config key 'data.batchsize'"),
        (["--set", "train.learning_rate=fast"], "train.learning_rate: expected a number"),
        (["--cache", str(tmp_path / "missing")], "data.cache_dir"),
    ):
        cmd = train_command(
            tmp_path, model_dir, *extra, cache=None if "--cache" in extra else cache_dir
        )
        proc = subprocess.run(
            cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr
        assert not model_dir.exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    config = tiny_config(tmp_path, cache_dir, ["train.max_steps=6"])
    model_dir = str(tmp_path / "model")

    class Poisoned(DetectorTask):
        """The loss turns NaN from step 3 on (the step variable is read in-graph)."""

        def combine(self, terms, mode, step):
            out = super().combine(terms, mode, step)
            out["loss"] = out["loss"] + tf.where(step >= 3.0, float("nan"), 0.0)
            return out

    trainer = Trainer(
        config, model_dir, strategy=_one_device(), log=lambda _: None, task=Poisoned(config)
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 4.*ckpt-2"):
        trainer.run()
    assert ckpt_lib.checkpoint_step(ckpt_lib.latest_phase_checkpoint(model_dir, "rpn")) == 2
    assert ckpt_lib.checkpoint_step(ckpt_lib.latest_model_checkpoint(model_dir)) == 2
    with open(os.path.join(model_dir, "train_summary_rpn.json")) as f:
        assert json.load(f)["status"] == "non_finite_loss"


def test_phase_two_needs_phase_one(tmp_path, cache_dir):
    config = tiny_config(tmp_path, cache_dir, ["train.phase=joint"])
    trainer = Trainer(config, str(tmp_path / "m"), strategy=_one_device(), log=lambda _: None)
    with pytest.raises(FileNotFoundError, match="phase-1 checkpoint"):
        trainer.setup()


@pytest.mark.slow
def test_rpn_then_joint_then_abs_then_oversampling_round(tmp_path, cache_dir):
    model_dir = str(tmp_path / "model")
    quiet = dict(strategy=_one_device(), log=lambda _: None)
    rpn = Trainer(tiny_config(tmp_path, cache_dir, ["train.max_steps=2"]), model_dir, **quiet)
    summary = rpn.run()
    assert summary["status"] == "finished" and summary["final_step"] == 2
    assert os.path.exists(os.path.join(model_dir, "config.yaml"))

    joint_cfg = tiny_config(tmp_path, cache_dir, ["train.phase=joint", "train.max_steps=2"])
    joint = Trainer(joint_cfg, model_dir, **quiet)
    summary = joint.run()
    assert summary["initialised_from"].endswith(os.path.join("rpn", "ckpt-2"))
    assert {"fpr_cls", "rpn_cls", "rpn_reg"} <= set(summary["last_losses"])
    assert summary["last_terms"]["n_fpr_pos"] >= 1  # jittered ground truth gives positives

    # ABS with threshold 0: every proposal that misses the nodules is a hard negative.
    abs_cfg = tiny_config(tmp_path, cache_dir, ["train.phase=abs", "train.abs_score_threshold=0.0"])
    summary = Trainer(abs_cfg, model_dir, **quiet).run()
    path = os.path.join(model_dir, ABS_FILE)
    with open(path) as f:
        stored = json.load(f)
    assert stored["format"] == pipeline.ABS_FORMAT
    assert summary["hard_negatives"] == len(stored["hard_negatives"]) > 0
    assert stored["checkpoint"].endswith(os.path.join("joint", "ckpt-2"))

    # The next round finds the file, trains into joint_abs from the newest model, and its
    # crops oversample the hard negatives.
    plan = plan_phase(joint_cfg, model_dir, 3)
    assert plan.name == "joint_abs" and plan.abs_file == path
    round2 = Trainer(joint_cfg, model_dir, **quiet)
    round2.setup()
    assert round2.init_from.endswith(os.path.join("joint", "ckpt-2"))
    assert len(round2.task.hard_negatives) == len(stored["hard_negatives"])
    sampler = pipeline.CropSampler(
        joint_cfg.data, round2.task.train_scans, hard_negatives=round2.task.hard_negatives
    )
    kinds = [sampler.sample(i)[2] for i in range(100)]
    share = kinds.count(pipeline.KIND_HARD_NEGATIVE) / len(kinds)
    assert abs(share - joint_cfg.data.abs_fraction) < 0.12


class _FixedScorer:
    """Returns preset detections for every scan (stands in for the whole-scan search)."""

    def __init__(self, boxes, scores):
        self.boxes, self.scores = boxes, scores

    def detect(self, volume, fill_hu):
        del volume, fill_hu
        return self.boxes, self.scores


def test_evaluate_scans_counts_hits_and_false_positives(cache_dir):
    scan = pipeline.load_scans(cache_dir, ["scan0"])[0]
    first, second = scan.nodules
    # A hit on the first nodule at 0.95, a hit on the second at 0.4, one far miss at 0.6.
    miss = first.copy()
    miss[:3] = [2.0, 2.0, 2.0]
    boxes = np.stack([first, second, miss]).astype(np.float32)
    scores = np.asarray([0.95, 0.4, 0.6], np.float32)
    result = abs_lib.evaluate_scans(
        _FixedScorer(boxes, scores), [scan], cache_dir, thresholds=(0.3, 0.5, 0.9)
    )
    assert result["scans"] == 1 and result["nodules"] == 2
    at = result["at"]
    assert (at["0.3"]["found"], at["0.3"]["false_positives"]) == (2, 1)
    assert (at["0.5"]["found"], at["0.5"]["false_positives"]) == (1, 1)
    assert (at["0.9"]["found"], at["0.9"]["false_positives"]) == (1, 0)
    assert at["0.5"]["sensitivity"] == 0.5


def test_validation_runs_the_whole_scan_search_on_the_held_out_fold(tmp_path, cache_dir):
    config = tiny_config(
        tmp_path,
        cache_dir,
        ["data.fold=0", "train.max_steps=2", "train.val_max_scans=1", "train.val_every_steps=1"],
    )
    lines = []
    trainer = Trainer(config, str(tmp_path / "model"), strategy=_one_device(), log=lines.append)
    summary = trainer.run()
    # Fold 0 holds out scan0 (subset 0), the only validation scan; it has two nodules.
    assert summary["val_scans"] == 1 and summary["train_scans"] == 2
    validation = summary["validation"]
    assert validation["scans"] == 1 and validation["nodules"] == 2
    for values in validation["at"].values():
        assert 0.0 <= values["sensitivity"] <= 1.0 and values["false_positives"] >= 0
    assert sum("validation on 1 scans" in line for line in lines) == 2  # step 1, then the end
