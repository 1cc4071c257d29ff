"""The one flag spelling rule (dashes or underscores) and the shared flags, in-process."""

from __future__ import annotations

import pytest
from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.utils import verbosity


@pytest.fixture
def fv():
    values = flags.FlagValues()
    flags.DEFINE_string("model-dir", None, "dashed", flag_values=values)
    flags.DEFINE_integer("max_marks", None, "underscored", flag_values=values)
    flags.DEFINE_bool("keep-noisy", False, "dashed boolean", flag_values=values)
    flags.DEFINE_bool("merge", True, "boolean", flag_values=values)
    flags.DEFINE_multi_string("set", [], "multi", flag_values=values)
    return values


@pytest.mark.parametrize(
    "argv",
    [
        ["p", "--model-dir", "m", "--max-marks", "7"],
        ["p", "--model_dir", "m", "--max_marks", "7"],
        ["p", "--model_dir=m", "--max-marks=7"],
        ["p", "-model-dir=m", "-max_marks", "7"],
    ],
)
def test_both_spellings_of_every_flag_parse_alike(fv, argv):
    rest = fv(cli_flags.canonical_argv(argv, fv))
    assert rest == ["p"]
    assert cli_flags.value("model_dir", fv) == cli_flags.value("model-dir", fv) == "m"
    opts = cli_flags.values(fv)
    assert (opts.model_dir, opts.max_marks) == ("m", 7)


@pytest.mark.parametrize(
    "args, keep_noisy, merge",
    [
        (["--keep-noisy", "--nomerge"], True, False),
        (["--keep_noisy", "--no-merge"], True, False),
        (["--nokeep-noisy", "--no_merge"], False, False),
        (["--no-keep_noisy", "--merge"], False, True),
        (["--keep-noisy=false"], False, True),
    ],
)
def test_booleans_and_their_negations_take_both_spellings(fv, args, keep_noisy, merge):
    fv(cli_flags.canonical_argv(["p", *args], fv))
    assert (fv["keep-noisy"].value, fv["merge"].value) == (keep_noisy, merge)


def test_values_positionals_and_unknown_flags_are_left_alone(fv):
    argv = ["p", "--set", "--max_marks", "--model_dir", "a_b-c", "ensemble", "--not_a_flag"]
    assert cli_flags.canonical_argv(argv, fv) == [
        "p",
        "--set",
        "--max_marks",  # the value of --set, not a flag
        "--model-dir",
        "a_b-c",
        "ensemble",
        "--not_a_flag",
    ]
    assert cli_flags.canonical_argv(["p", "--", "--max-marks"], fv) == ["p", "--", "--max-marks"]


def test_require_names_missing_flags_with_dashes(fv):
    fv(["p", "--max_marks=3"])
    with pytest.raises(cli_exit.UsageError, match="missing --model-dir$"):
        cli_flags.require("model_dir", "max_marks", flag_values=fv)


def test_shared_flag_definers_are_idempotent():
    values = flags.FlagValues()
    for _ in range(2):
        cli_flags.define_config_flags(flag_values=values)
        cli_flags.define_model_dir_flag(flag_values=values)
    values(
        cli_flags.canonical_argv(["p", "--config=c.yaml", "--set=a.b=1", "--model_dir=m"], values)
    )
    assert (values.config, values.set, values["model-dir"].value) == ("c.yaml", ["a.b=1"], "m")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["p"], None),
        (["p", "-v", "0"], 0),
        (["p", "--verbosity=1"], 1),
        (["p", "-v=-2"], -2),
        (["p", "--v", "info"], 0),
        (["p", "--verbosity", "warning"], -1),
        (["p", "--", "-v", "0"], None),
        (["p", "--out", "v"], None),
    ],
)
def test_requested_verbosity(argv, expected):
    assert verbosity.requested_verbosity(argv) == expected


@pytest.mark.parametrize(
    "argv, environ, expected",
    [
        (["p"], {}, "2"),  # quiet by default: TensorFlow's C++ INFO and WARNING lines hidden
        (["p", "-v", "-1"], {}, "1"),  # warnings asked for
        (["p", "-v", "0"], {}, None),  # INFO asked for: TensorFlow's own default (all)
        (["p", "--verbosity=-2"], {}, "2"),
        (["p"], {"TF_CPP_MIN_LOG_LEVEL": "0"}, "0"),  # the user's setting wins
    ],
)
def test_native_log_level_follows_verbosity_unless_the_user_set_it(argv, environ, expected):
    env = dict(environ)
    verbosity.quiet_native_logs(argv, env)
    assert env.get("TF_CPP_MIN_LOG_LEVEL") == expected


def test_only_commands_are_quieted():
    assert verbosity.running_as_command(["-m", "--out", "x"])
    assert verbosity.running_as_command(["/venv/bin/agg3d-predict"])
    assert not verbosity.running_as_command(["/venv/bin/pytest"])
    assert not verbosity.running_as_command(["-c"])
