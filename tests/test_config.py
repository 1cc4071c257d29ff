import pytest

from tf_agg3d.config import ConfigError, ExperimentConfig, load_config, save_config, to_dict


def test_defaults_are_the_papers_setting():
    c = load_config()
    assert isinstance(c, ExperimentConfig)
    assert c.model.anchors.sizes == ((4.0, 6.0), (8.0, 12.0), (16.0, 24.0))
    assert c.loss.rpn_classification == "adaptive_focal"
    assert (c.loss.alpha, c.loss.gamma) == (0.8, 5.0)
    assert c.model.backbone.pyramid_channels == 32


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "data:\n  batch_size: 3\n  crop_size: [64, 64, 64]\nmodel:\n  fpr:\n    enabled: false\n"
    )
    c = load_config(
        str(p), ["data.batch_size=5", "model.anchors.sizes=[[5, 10], [15, 20], [25, 35]]"]
    )
    assert c.data.batch_size == 5
    assert c.data.crop_size == (64, 64, 64)
    assert c.model.fpr.enabled is False
    assert c.model.anchors.sizes == ((5.0, 10.0), (15.0, 20.0), (25.0, 35.0))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batchsize=2", "unknown config key 'data.batchsize'"),
        ("data.batch_size=two", "data.batch_size: expected an integer"),
        ("model.fpr.enabled=3", "model.fpr.enabled: expected true/false"),
        ("data.crop_size=[64, 64]", "data.crop_size: expected 3 values"),
        ("nonsense", "expected key=value"),
        ("model.backbone=4", "model.backbone: expected a mapping"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: top level must be a mapping"):
        load_config(str(bad))


def test_save_and_reload_round_trip(tmp_path):
    c = load_config(None, ["train.learning_rate=0.01", "inference.overlap=16"])
    path = tmp_path / "out" / "config.yaml"
    save_config(c, str(path))
    assert to_dict(load_config(str(path))) == to_dict(c)


def test_a_config_whose_two_hu_windows_differ_is_refused_naming_both_keys(tmp_path):
    # The cache is clipped to preprocess.hu_window; the model normalises
    # model.backbone.hu_window: one window, held in two sections, so they must agree.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["preprocess.hu_window=[-1000, 400]"])
    assert "preprocess.hu_window" in str(err.value)
    assert "model.backbone.hu_window" in str(err.value)
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  backbone:\n    hu_window: [-1000, 400]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: preprocess\.hu_window .* must be equal"):
        load_config(str(p))


def test_equal_hu_windows_load():
    c = load_config(
        None, ["preprocess.hu_window=[-1000, 400]", "model.backbone.hu_window=[-1000, 400]"]
    )
    assert c.preprocess.hu_window == c.model.backbone.hu_window == (-1000.0, 400.0)


def test_training_and_prediction_thresholds_and_caps_are_separate_settings():
    # model.proposals.score_threshold (training's proposals) and inference.score_threshold
    # (predict --threshold), inference.max_marks (findings written) and evaluation.max_marks
    # (the FROC's official cap) are different settings: each is set on its own.
    c = load_config(None, ["inference.score_threshold=0.0", "inference.max_marks=7"])
    assert c.model.proposals.score_threshold == 0.269
    assert c.evaluation.max_marks == 100
