"""Export: atomic versioned SavedModels, the signature contract, stock ops, serving config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from tf_agg3d.serving import contract
from tf_agg3d.serving.errors import ExportError
from tf_agg3d.serving.models_config import ServedModel, models_config_text, write_models_config
from tf_agg3d.serving.publishing import existing_versions, export_saved_model
from tf_agg3d.serving.signatures import Agg3DExportModule, non_stock_op_types, saved_model_op_types

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return f.read()


def _listing(model_base):
    return sorted(os.listdir(model_base))


# --------------------------------------------------------------------------------------------
# Versions and atomicity (stand-in model: seconds)
# --------------------------------------------------------------------------------------------


def test_versions_increment_and_existing_versions_are_never_replaced_silently(tmp_path, helpers):
    first = helpers.export_standin(tmp_path)
    second = helpers.export_standin(tmp_path)
    model_base = os.path.join(tmp_path, "agg3d")
    assert (first.version, second.version) == (1, 2)
    assert second.path == os.path.join(model_base, "2")
    assert _listing(model_base) == ["1", "2"]  # no temp or backup directory left behind

    stamp = os.path.getmtime(os.path.join(first.path, "saved_model.pb"))
    with pytest.raises(ExportError, match=r"already exists: pass --overwrite.*version 3"):
        helpers.export_standin(tmp_path, version=1, scale=5.0)
    assert os.path.getmtime(os.path.join(first.path, "saved_model.pb")) == stamp

    helpers.export_standin(tmp_path, version=1, scale=5.0, overwrite=True)
    assert _listing(model_base) == ["1", "2"]
    loaded = tf.saved_model.load(first.path)
    meta = json.loads(loaded.signatures["metadata"]()["metadata"].numpy())
    assert meta["version"] == 1
    volume = np.zeros([8, 8, 8], np.int16)
    volume[0, 0, 0] = 400
    score = loaded.signatures["detect"](volume=tf.constant(volume))["rpn_scores"].numpy()[0]
    # scale 5 (the replacement), not 1: the overwrite really replaced the weights.
    assert score == pytest.approx(1 / (1 + np.exp(-400 / 64 / 100 * 5)), rel=1e-5)


def test_a_failed_export_leaves_neither_a_version_nor_a_temp_directory(tmp_path, helpers):
    class Broken(helpers.StandInWholeScan):
        @tf.function
        def detect(self, volume):
            return {"boxes": tf.zeros([0, 4])}  # lacks the other outputs

    config = helpers.tiny_config()
    module = Agg3DExportModule(Broken(), config, version=1)
    with pytest.raises(ExportError, match=r"whole_scan.detect: expected outputs .*missing"):
        export_saved_model(module, str(tmp_path))
    assert existing_versions(os.path.join(tmp_path, "agg3d")) == []
    assert _listing(os.path.join(tmp_path, "agg3d")) == []


def test_object_store_publishing_moves_saved_model_pb_last_and_overwrites(
    tmp_path, helpers, monkeypatch
):
    """The object-store path (docs/serving.md), on local files made to act as objects.

    Objects need no parent directories, so the simulated copy and rename create them; every
    rename must be one file moving from the hidden staging prefix into the version, and
    ``saved_model.pb`` must arrive after every other file of the version.
    """
    from tf_agg3d.serving import publishing

    monkeypatch.setattr(publishing, "_renames_directories", lambda path: False)
    model_base = os.path.join(tmp_path, "agg3d")
    final = os.path.join(model_base, "1")
    moves = []
    real_rename, real_copy = tf.io.gfile.rename, publishing.io_utils.copy_file

    def rename(src, dst, overwrite=False):
        assert os.path.relpath(src, model_base).startswith(".tmp-1-"), src
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.basename(dst) == "saved_model.pb":
            moves.append(("pb", sorted(_files(final))))
        else:
            moves.append(("other", os.path.relpath(dst, final)))
        real_rename(src, dst, overwrite=overwrite)

    def copy_file(src, dst, overwrite=True):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        real_copy(src, dst, overwrite)

    monkeypatch.setattr(tf.io.gfile, "rename", rename)
    monkeypatch.setattr(publishing.io_utils, "copy_file", copy_file)
    helpers.export_standin(tmp_path, version=1, scale=1.0)
    published = sorted(_files(final))
    assert moves[-1] == ("pb", sorted(set(published) - {"saved_model.pb"}))
    assert [kind for kind, _ in moves].count("pb") == 1
    assert "assets.extra/metadata.json" in published
    assert _listing(model_base) == ["1"]  # the staging prefix is gone

    moves.clear()
    helpers.export_standin(tmp_path, version=1, scale=5.0, overwrite=True)
    assert moves[-1] == ("pb", sorted(set(published) - {"saved_model.pb"}))
    assert sorted(_files(final)) == published and _listing(model_base) == ["1"]
    volume = np.zeros([8, 8, 8], np.int16)
    volume[0, 0, 0] = 400
    loaded = tf.saved_model.load(final)
    score = loaded.signatures["detect"](volume=tf.constant(volume))["rpn_scores"].numpy()[0]
    assert score == pytest.approx(1 / (1 + np.exp(-400 / 64 / 100 * 5)), rel=1e-5)


def _files(directory):
    """Files below `directory`, relative, '/'-separated ([] when it does not exist)."""
    return [
        os.path.relpath(os.path.join(folder, name), directory).replace(os.sep, "/")
        for folder, _, names in os.walk(directory)
        for name in names
    ]


def test_bad_max_volume_shape_is_refused(helpers):
    with pytest.raises(ExportError, match="max_volume_shape: expected three positive sizes"):
        Agg3DExportModule(
            helpers.StandInWholeScan(), helpers.tiny_config(), version=1, max_volume_shape=(0, 5)
        )


def test_standin_export_has_the_signatures_assets_and_size_check(standin_base, helpers):
    path = os.path.join(standin_base, "agg3d", "1")
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {"serving_default", "detect", "detect_crop", "metadata"}
    detect = loaded.signatures["serving_default"]
    spec = detect.structured_input_signature[1]["volume"]
    assert spec.dtype == tf.int16 and spec.shape.as_list() == [None, None, None]
    assert set(detect.structured_outputs) >= set(contract.DETECT_OUTPUTS)
    crop = loaded.signatures["detect_crop"].structured_input_signature[1]["crops"]
    assert crop.dtype == tf.int16 and crop.shape.as_list() == [None, *helpers.STANDIN_WINDOW]
    extra = os.path.join(path, "assets.extra")
    meta = json.loads(_read(extra, "metadata.json"))
    assert meta["version"] == 1 and meta["model_name"] == "agg3d"
    volume_contract = meta["signatures"]["detect"]["inputs"]["volume"]
    assert volume_contract["max_shape"] == list(helpers.STANDIN_MAX_SHAPE)
    assert volume_contract["dtype"] == "int16"
    assert "inference:" in _read(extra, "config.yaml")
    assert json.loads(_read(extra, "anchors.json"))["strides"] == [4, 8, 16]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"1 <= D <= 96.*\[97 4 4\]"):
        detect(volume=tf.zeros([97, 4, 4], tf.int16))


def test_warmup_requests_are_written_as_prediction_logs(tmp_path, helpers):
    from tensorflow_serving.apis import prediction_log_pb2

    result = helpers.export_standin(tmp_path, warmup_shape=(16, 16, 16))
    path = os.path.join(result.path, "assets.extra", "tf_serving_warmup_requests")
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    log = prediction_log_pb2.PredictionLog.FromString(records[0])
    request = log.predict_log.request
    assert request.model_spec.signature_name == "detect"
    assert tf.make_ndarray(request.inputs["volume"]).shape == (16, 16, 16)


# --------------------------------------------------------------------------------------------
# models.config
# --------------------------------------------------------------------------------------------


def _parse(text):
    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def test_models_config_policies_and_labels_round_trip_through_the_proto(tmp_path):
    text = models_config_text(
        [
            ServedModel(base_path="/models/agg3d", version_policy="latest", num_versions=2),
            ServedModel(
                name="agg3d_pinned",
                base_path="/models/agg3d",
                version_policy="specific",
                versions=(3, 4),
                version_labels={"stable": 3, "canary": 4},
            ),
        ]
    )
    parsed = _parse(text).model_config_list.config
    assert parsed[0].name == "agg3d" and parsed[0].model_platform == "tensorflow"
    assert parsed[0].model_version_policy.latest.num_versions == 2
    assert list(parsed[1].model_version_policy.specific.versions) == [3, 4]
    assert dict(parsed[1].version_labels) == {"stable": 3, "canary": 4}
    path = tmp_path / "models.config"
    write_models_config(str(path), [ServedModel(version_policy="all")])
    assert _parse(path.read_text()).model_config_list.config[0].model_version_policy.HasField("all")


@pytest.mark.parametrize(
    "model, message",
    [
        (ServedModel(version_policy="newest"), "version_policy: expected latest, all or specific"),
        (ServedModel(version_policy="specific"), "versions: the 'specific' version policy"),
        (
            ServedModel(version_policy="specific", versions=(1,), version_labels={"s": 2}),
            r"version_labels: versions \[2\] are not in",
        ),
        (ServedModel(num_versions=0), "num_versions: expected >= 1"),
    ],
)
def test_models_config_errors_name_the_field(model, message):
    with pytest.raises(ExportError, match=message):
        models_config_text([model])


def test_committed_serving_files_are_valid():
    config = _parse(_read(REPO, "serving", "models.config"))
    entry = config.model_config_list.config[0]
    assert entry.name == "agg3d" and entry.base_path == "/models/agg3d"
    batching = _read(REPO, "serving", "batching_parameters.txt")
    for field in ("max_batch_size", "batch_timeout_micros", "num_batch_threads"):
        assert field in batching
    readme = _read(REPO, "serving", "README.md")
    for needle in ("8500", "8501", "/v1/models/agg3d", "version_policy", "GetModelStatus"):
        assert needle in readme


def test_export_cli_writes_a_models_config_alone(tmp_path):
    out = tmp_path / "serving" / "models.config"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tf_agg3d.export",
            f"--export-base={tmp_path / 'models'}",
            f"--models-config={out}",
            "--version-policy=specific",
            "--versions=2,3",
            "--version-labels=stable=2",
            "--serving-base-path=/models/agg3d",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = _parse(out.read_text()).model_config_list.config[0]
    assert list(entry.model_version_policy.specific.versions) == [2, 3]
    assert dict(entry.version_labels) == {"stable": 2}


# --------------------------------------------------------------------------------------------
# The real detector (slow: one export per session)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_export_uses_only_stock_ops_and_no_roi_align_op(real_export):
    ops = saved_model_op_types(real_export.path)
    assert "RoiAlign3D" not in ops and "RoiAlign3DGrad" not in ops
    assert non_stock_op_types(ops) == []
    # The whole-scan loop and the 3D NMS are in the graph, not in a client.
    assert {"While", "TensorListFromTensor"} & ops or "StatelessWhile" in ops
    assert non_stock_op_types({"RoiAlign3D", "NoSuchOp", "Conv3D"}) == ["NoSuchOp", "RoiAlign3D"]


@pytest.mark.slow
def test_saved_model_cli_shows_the_documented_signatures(real_export):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorflow.python.tools.saved_model_cli",
            "show",
            "--dir",
            real_export.path,
            "--all",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for name in ("serving_default", "detect", "detect_crop", "metadata"):
        assert f"signature_def['{name}']" in out
    block = out.split("signature_def['serving_default']")[1].split("signature_def[")[0]
    assert "inputs['volume'] tensor_info:" in block
    assert "dtype: DT_INT16" in block and "shape: (-1, -1, -1)" in block
    for output in ("boxes", "scores", "rpn_scores", "fpr_scores", "num_detections", "num_windows"):
        assert f"outputs['{output}']" in block
    assert "shape: (-1, 4)" in block
    assert "shape: (-1, 32, 32, 32)" in out  # detect_crop's crops


@pytest.mark.slow
def test_real_export_equals_the_in_process_model(real_model, real_export, helpers):
    volume = helpers.chest_phantom((40, 36, 44), (1.0, 1.0, 1.0), (20, 18, 22))
    volume = volume + np.random.default_rng(0).integers(-30, 30, volume.shape).astype(np.int16)
    expected = {k: v.numpy() for k, v in real_model.whole_scan.detect(tf.constant(volume)).items()}
    loaded = tf.saved_model.load(real_export.path)
    got = {k: v.numpy() for k, v in loaded.signatures["detect"](volume=tf.constant(volume)).items()}
    assert int(got["num_detections"]) == int(expected["num_detections"]) > 0
    for key in ("boxes", "scores", "rpn_scores", "fpr_scores"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-5, err_msg=key)
    meta = json.loads(loaded.signatures["metadata"]()["metadata"].numpy())
    assert meta["version"] == 1
    assert meta["checkpoint"].endswith("ckpt-1")
    assert meta["inference"]["window_size"] == [32, 32, 32]
    crops = loaded.signatures["detect_crop"](crops=tf.constant(volume[None, :32, :32, :32]))
    assert crops["boxes"].shape[0] == 1 and crops["boxes"].shape[-1] == 4


@pytest.mark.slow
def test_export_cli_from_a_checkpoint(real_model, tmp_path):
    base = tmp_path / "models"
    (base / "agg3d" / "4").mkdir(parents=True)  # an existing version: the next one is 5
    command = [
        sys.executable,
        "-m",
        "tf_agg3d.export",
        f"--model-dir={real_model.model_dir}",
        f"--export-base={base}",
        f"--models-config={tmp_path / 'models.config'}",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exported agg3d version 5 to {base / 'agg3d' / '5'}" in proc.stdout
    assert sorted(os.listdir(base / "agg3d")) == ["4", "5"]
    assert non_stock_op_types(saved_model_op_types(str(base / "agg3d" / "5"))) == []
    entry = _parse((tmp_path / "models.config").read_text()).model_config_list.config[0]
    assert entry.base_path == str(base / "agg3d")
    # The same version again without --overwrite: refused before loading the model.
    again = subprocess.run(
        [*command, "--version=5"], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert again.returncode == 1
    assert "already exists: pass --overwrite" in again.stderr
