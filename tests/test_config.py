import math
import pathlib

import pytest
import yaml

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


# --------------------------------------------------------------------------------------------
# Inheritance: `base: other.yaml`
# --------------------------------------------------------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_chain_of_bases_applies_root_first_then_each_child(tmp_path):
    _write(
        tmp_path / "root.yaml",
        "name: root\ndata:\n  batch_size: 3\n  crop_size: [64, 64, 64]\n"
        "model:\n  anchors:\n    sizes: [[1, 2], [3, 4], [5, 6]]\n",
    )
    _write(tmp_path / "mid.yaml", "base: root.yaml\nname: mid\ndata:\n  batch_size: 4\n")
    child = _write(
        tmp_path / "child.yaml",
        "base: mid.yaml\nname: child\nmodel:\n  anchors:\n    sizes: [[7], [8], [9]]\n",
    )
    c = load_config(str(child))
    assert c.name == "child"
    assert c.data.batch_size == 4  # mid over root
    assert c.data.crop_size == (64, 64, 64)  # from root, untouched by the children
    # A list replaces the base's list whole; mappings merge key by key.
    assert c.model.anchors.sizes == ((7.0,), (8.0,), (9.0,))
    assert c.model.anchors.positive_iou == 0.5  # a default nobody set


def test_base_is_relative_to_the_file_not_the_working_directory(tmp_path, monkeypatch):
    _write(tmp_path / "common" / "root.yaml", "data:\n  batch_size: 5\n")
    child = _write(tmp_path / "exp" / "child.yaml", "base: ../common/root.yaml\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(str(child)).data.batch_size == 5
    monkeypatch.chdir(tmp_path)
    assert load_config("exp/child.yaml").data.batch_size == 5
    # An absolute base is taken as it is.
    absolute = _write(tmp_path / "abs.yaml", f"base: {tmp_path / 'common' / 'root.yaml'}\n")
    assert load_config(str(absolute)).data.batch_size == 5


def test_a_base_of_a_url_config_is_a_url_in_the_same_folder():
    from tf_agg3d.config.yaml_files import _resolve_base

    assert _resolve_base("s3://b/configs/luna16/x.yaml", "3d_ag.yaml") == (
        "s3://b/configs/luna16/3d_ag.yaml"
    )
    assert _resolve_base("gs://b/configs/x.yaml", "luna16/y.yaml") == "gs://b/configs/luna16/y.yaml"
    assert _resolve_base("s3://b/c/x.yaml", "../y.yaml") == "s3://b/y.yaml"
    assert _resolve_base("s3://b/c/x.yaml", "gs://o/y.yaml") == "gs://o/y.yaml"


def test_a_base_cycle_is_refused_naming_the_files(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(str(a))
    itself = _write(tmp_path / "self.yaml", "base: ./self.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*self\.yaml -> .*self\.yaml"):
        load_config(str(itself))


def test_a_file_reached_twice_without_a_cycle_is_no_cycle(tmp_path):
    # Two configs may share a base; only a file that is its own ancestor is a cycle.
    _write(tmp_path / "root.yaml", "data:\n  batch_size: 3\n")
    _write(tmp_path / "a.yaml", "base: root.yaml\n")
    b = _write(tmp_path / "b.yaml", "base: a.yaml\ndata:\n  fold: 2\n")
    c = load_config(str(b))
    assert (c.data.batch_size, c.data.fold) == (3, 2)


def test_unknown_keys_and_bad_types_anywhere_in_a_chain_name_their_file(tmp_path):
    _write(tmp_path / "root.yaml", "data:\n  batch_size: 3\n")
    child = _write(tmp_path / "child.yaml", "base: root.yaml\ndata:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: unknown config key 'data\.batchsize'"):
        load_config(str(child))
    _write(tmp_path / "bad_root.yaml", "model:\n  fpr:\n    enabled: 3\n")
    child2 = _write(tmp_path / "child2.yaml", "base: bad_root.yaml\n")
    with pytest.raises(ConfigError, match=r"bad_root\.yaml: model\.fpr\.enabled: expected"):
        load_config(str(child2))


def test_bad_base_values_and_missing_bases_are_refused(tmp_path):
    child = _write(tmp_path / "child.yaml", "base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read config"):
        load_config(str(child))
    for value in ("[a.yaml]", "3", "''"):
        bad = _write(tmp_path / "bad.yaml", f"base: {value}\n")
        with pytest.raises(ConfigError, match=r"bad\.yaml: base: expected a config file name"):
            load_config(str(bad))


def test_overrides_apply_after_the_whole_chain(tmp_path):
    _write(tmp_path / "root.yaml", "data:\n  batch_size: 3\n  fold: 1\n")
    child = _write(tmp_path / "child.yaml", "base: root.yaml\ndata:\n  batch_size: 4\n")
    c = load_config(str(child), ["data.batch_size=7", "data.fold=2"])
    assert (c.data.batch_size, c.data.fold) == (7, 2)


def test_a_chain_applies_over_a_given_base_config(tmp_path):
    # predict merges --config over the trained model's config.yaml (load_config's `base`).
    model_config = load_config(None, ["data.batch_size=9", "data.fold=4"])
    _write(tmp_path / "root.yaml", "data:\n  batch_size: 3\n")
    child = _write(tmp_path / "child.yaml", "base: root.yaml\n")
    c = load_config(str(child), base=model_config)
    assert (c.data.batch_size, c.data.fold) == (3, 4)


@pytest.mark.parametrize(
    "stages, message",
    [
        ("[]", "train.stages: empty"),
        ("[rpn, jiont]", r"train.stages: unknown phase\(s\) \['jiont'\]"),
        ("[abs, joint]", "train.stages: 'abs' cannot come first"),
    ],
)
def test_a_recipe_that_cannot_run_is_refused(stages, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"train.stages={stages}"])


# --------------------------------------------------------------------------------------------
# The shipped configs: every file loads; the paper's rows hold the paper's numbers
# --------------------------------------------------------------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
LUNA16 = CONFIGS / "luna16"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
ANCHOR1 = ((4.0, 6.0), (8.0, 12.0), (16.0, 24.0))
# Old names and the file each now is.
OLD_NAMES = {
    "paper_luna16.yaml": "3d_ag.yaml",
    "paper_luna16_no_lm.yaml": "3d_ag.yaml",
    "paper_luna16_no_da.yaml": "no_da.yaml",
    "paper_luna16_focal.yaml": "focal.yaml",
    "paper_luna16_ohem.yaml": "ohem.yaml",
    "paper_luna16_alternating.yaml": "alternating.yaml",
    "paper_luna16_crop96.yaml": "crop96.yaml",
    "paper_luna16_anchor2.yaml": "anchor2.yaml",
}


def luna16(name):
    return load_config(str(LUNA16 / name))


def test_the_config_folder_is_found():
    assert (LUNA16 / "3d_ag.yaml").is_file()
    assert len(ALL_YAML) >= 20


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    config = load_config(str(path))
    assert config.train.stages


@pytest.mark.parametrize(
    "path",
    sorted(p for p in LUNA16.glob("*.yaml") if p.name != "3d_ag.yaml"),
    ids=lambda p: p.name,
)
def test_each_luna16_child_names_its_base_and_holds_only_its_difference(path):
    own = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(own.get("base"), str), f"{path.name} names no base"
    parent = to_dict(load_config(str(path.parent / own["base"])))
    child = to_dict(load_config(str(path)))

    def leaves(d, prefix=()):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, (*prefix, k))
            else:
                yield (*prefix, k)

    def get(d, key):
        for part in key:
            d = d[part]
        return d

    for key in leaves({k: v for k, v in own.items() if k != "base"}):
        assert get(child, key) != get(
            parent, key
        ), f"{path.name}: {'.'.join(key)} repeats its base's value {get(parent, key)!r}"


@pytest.mark.parametrize("old, new", sorted(OLD_NAMES.items()))
def test_old_config_names_are_their_new_file_and_nothing_else(old, new):
    own = yaml.safe_load((CONFIGS / old).read_text(encoding="utf-8"))
    assert own == {"base": f"luna16/{new}"}
    assert to_dict(load_config(str(CONFIGS / old))) == to_dict(luna16(new))


def test_3d_ag_is_the_papers_best_single_model():
    # Table IV (0.939) / Table III "Crop 128†, DA, Joint".
    c = luna16("3d_ag.yaml")
    assert c.model.fpr.enabled
    assert c.model.fpr.diameter_alignment is True
    assert c.model.fpr.local_magnification is False
    assert c.data.crop_size == (128, 128, 128)
    assert c.model.anchors.strides == (4, 8, 16)
    assert c.model.anchors.sizes == ANCHOR1
    assert (c.model.anchors.positive_iou, c.model.anchors.negative_iou) == (0.5, 0.02)
    assert c.loss.rpn_classification == "adaptive_focal"
    assert (c.loss.alpha, c.loss.gamma) == (0.8, 5.0)
    # Phase 1, joint phase 2, one ABS round, the joint round after it.
    assert c.train.stages == ("rpn", "joint", "abs", "joint")
    assert (c.train.epochs, c.train.abs_epochs) == (50, 30)
    # 0.269 = sigmoid(-1), for training's proposals and for inference.
    sigmoid_minus_1 = 1.0 / (1.0 + math.e)
    assert abs(c.model.proposals.score_threshold - sigmoid_minus_1) < 5e-4
    assert abs(c.inference.score_threshold - sigmoid_minus_1) < 5e-4
    assert c.evaluation.fp_rates == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def test_every_luna16_row_keeps_the_papers_common_settings():
    for path in sorted(LUNA16.glob("*.yaml")):
        c = load_config(str(path))
        assert (c.model.anchors.positive_iou, c.model.anchors.negative_iou) == (0.5, 0.02)
        assert (c.loss.alpha, c.loss.gamma) == (0.8, 5.0), path.name
        assert c.preprocess.spacing_mm == 1.0
        assert c.train.epochs == 50 and c.train.abs_epochs == 30
        assert abs(c.inference.score_threshold - 1.0 / (1.0 + math.e)) < 5e-4
        assert c.name == f"luna16_{path.stem}", path.name


def test_table_iii_rows():
    lm = luna16("3d_ag_lm.yaml")
    assert lm.model.fpr.diameter_alignment and lm.model.fpr.local_magnification
    assert "abs" in lm.train.stages
    no_da = luna16("no_da.yaml")
    assert no_da.model.fpr.enabled
    assert not no_da.model.fpr.diameter_alignment and not no_da.model.fpr.local_magnification
    assert "abs" in no_da.train.stages
    for name, lm_on in (("no_abs.yaml", False), ("no_abs_lm.yaml", True)):
        c = luna16(name)
        assert c.data.crop_size == (128, 128, 128)
        assert c.model.fpr.local_magnification is lm_on
        assert c.train.stages == ("rpn", "joint")
    for name, lm_on in (("crop96.yaml", False), ("crop96_lm.yaml", True)):
        c = luna16(name)
        assert c.data.crop_size == (96, 96, 96)
        assert c.model.fpr.diameter_alignment
        assert c.model.fpr.local_magnification is lm_on
        assert c.train.stages == ("rpn", "joint")
    alt = luna16("alternating.yaml")
    assert alt.data.crop_size == (96, 96, 96)
    assert alt.model.fpr.diameter_alignment and alt.model.fpr.local_magnification
    assert alt.train.stages == ("rpn", "alternating")


def test_table_ii_rows_are_rpn_only():
    rows = {
        # file: (anchor strides, sizes, loss, ABS round)
        "rpn_only.yaml": ((4, 8, 16), ANCHOR1, "adaptive_focal", True),  # f
        "rpn_only_no_abs.yaml": ((4, 8, 16), ANCHOR1, "adaptive_focal", False),  # d
        "ohem.yaml": ((4, 8, 16), ANCHOR1, "ohem", False),  # c
        "anchor2.yaml": (
            (4, 8, 16),
            ((5.0, 10.0), (15.0, 20.0), (25.0, 35.0)),
            "adaptive_focal",
            False,
        ),  # e
        "single_scale_focal.yaml": (
            (4,),
            ((4.0, 6.0, 8.0, 12.0, 16.0, 24.0),),
            "adaptive_focal",
            False,
        ),  # b
        "single_scale_ohem.yaml": ((4,), ((4.0, 6.0, 8.0, 12.0, 16.0, 24.0),), "ohem", False),  # a
        "focal.yaml": ((4, 8, 16), ANCHOR1, "focal", False),  # vanilla focal, no number
    }
    for name, (strides, sizes, loss, with_abs) in rows.items():
        c = luna16(name)
        assert not c.model.fpr.enabled, name
        assert c.model.anchors.strides == strides, name
        assert c.model.anchors.sizes == sizes, name
        assert c.loss.rpn_classification == loss, name
        assert c.data.crop_size == (128, 128, 128), name
        assert c.train.stages == (("rpn", "abs", "rpn") if with_abs else ("rpn",)), name


def test_reproduction_doc_names_every_luna16_config():
    text = (REPO / "docs" / "reproduction.md").read_text(encoding="utf-8")
    for path in sorted(LUNA16.glob("*.yaml")):
        assert f"configs/luna16/{path.name}" in text, path.name
