"""The training CLI on object storage, against a real S3-compatible server (moto).

Two real ``python -m tf_agg3d.train`` runs on a tiny config read the cache from a bucket and
write the model directory to another: the first stops at step 2 with a checkpoint in the
bucket, the second resumes from it and goes on to step 4. Exit statuses are the ones a shell
sees after S3 use (tf_agg3d/utils/process.py).
"""

from __future__ import annotations

import json

import pytest
from support import tiny_config_file, write_cache

from tf_agg3d.data.readers.dicom_tfio import tfio_dicom_available

pytest.importorskip("moto.server", reason="needs moto[server] (requirements/pinned.txt)")
pytestmark = [
    pytest.mark.needs_tfio,
    pytest.mark.slow,
    pytest.mark.skipif(not tfio_dicom_available(), reason="needs tensorflow-io"),
]


def _train(s3, config, model_dir, cache, max_steps):
    return s3.run(
        [
            "-m",
            "tf_agg3d.train",
            f"--config={config}",
            f"--model-dir={model_dir}",
            f"--cache={cache}",
            "--phase=rpn",
            f"--max-steps={max_steps}",
            "--set=train.checkpoint_every_steps=2",
        ],
        timeout=400,
    )


def test_train_writes_checkpoints_to_a_bucket_and_resumes_from_them(s3, tmp_path):
    s3.create_bucket("train-cache")
    s3.create_bucket("train-runs")
    local_cache = write_cache(str(tmp_path / "cache"), n_scans=2)
    s3.upload_tree(local_cache, "train-cache", "cache")
    config = tiny_config_file(tmp_path)
    model_dir, cache = "s3://train-runs/tiny", "s3://train-cache/cache"

    first = _train(s3, config, model_dir, cache, 2)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert "training volumes" in log and "each is downloaded once" in log, log[-3000:]
    keys = s3.keys("train-runs", "tiny/")
    assert "tiny/config.yaml" in keys and "tiny/checkpoints/checkpoint" in keys, keys
    assert "tiny/checkpoints/rpn/ckpt-2.index" in keys, keys
    pointer = s3.get("train-runs", "tiny/checkpoints/checkpoint").decode()
    assert 'model_checkpoint_path: "rpn/ckpt-2"' in pointer, pointer
    assert not [k for k in keys if "/.tmp-" in k or "_temp" in k], keys

    second = _train(s3, config, model_dir, cache, 4)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads(s3.get("train-runs", "tiny/train_summary_rpn.json"))
    assert summary["resumed_from"] == f"{model_dir}/checkpoints/rpn/ckpt-2", summary
    assert (summary["start_step"], summary["final_step"]) == (2, 4), summary
    assert summary["checkpoint"] == f"{model_dir}/checkpoints/rpn/ckpt-4", summary
    pointer = s3.get("train-runs", "tiny/checkpoints/checkpoint").decode()
    assert 'model_checkpoint_path: "rpn/ckpt-4"' in pointer, pointer

    # A cache prefix that does not exist: status 2 before any work, after S3 use.
    bad = _train(s3, config, model_dir, "s3://train-cache/nothing-here", 4)
    assert bad.returncode == 2, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "data.cache_dir: s3://train-cache/nothing-here does not exist" in bad.stderr
