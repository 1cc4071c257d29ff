"""Command-line flags: one spelling rule for every command, and the flags commands share.

Every flag is written with dashes (``--model-dir``, ``--max-marks``) and still accepts
underscores (``--model_dir``, ``--max_marks``), whichever way it was defined:
:func:`canonical_argv` (run by :func:`tf_agg3d.cli.exit.parse_flags`, the ``flags_parser``
every command hands to absl) rewrites each flag name on the command line to the spelling it
was registered with before absl parses it. Boolean flags take ``--no-name`` / ``--no_name``
besides absl's ``--noname``. Values are never rewritten: an argument that is the value of the
flag before it is left as it is.

New flags are defined with dashed names (that is how ``--help`` shows them); read them with
:func:`value` (either spelling) or :func:`values` (a namespace with underscore attributes).

Logging is quiet by default: absl's ``-v`` / ``--verbosity`` defaults to WARNING for our
commands instead of absl's INFO, so absl and TensorFlow INFO lines appear only with
``--verbosity=0`` (or ``-v 0``); the project's own progress lines are printed, or logged
through the ``tf_agg3d`` logger, which stays at INFO unless a level below INFO is asked for.
TensorFlow's C++ INFO and WARNING lines follow the same flag (:mod:`tf_agg3d.utils.verbosity`).
"""

from __future__ import annotations

import logging as std_logging
import types
from collections.abc import Sequence

from absl import flags

FLAGS = flags.FLAGS

# absl's level for "not asked for": WARNING (absl itself would raise it to INFO).
DEFAULT_VERBOSITY = -1


def _registered(name: str, flag_values: flags.FlagValues) -> str | None:
    """The registered spelling of flag `name` (dashes and underscores interchangeable)."""
    for candidate in (name, name.replace("-", "_"), name.replace("_", "-")):
        if candidate in flag_values:
            return candidate
    return None


def _negated_boolean(name: str, flag_values: flags.FlagValues) -> str | None:
    """For ``no-x`` / ``no_x`` / ``nox``: the registered boolean flag ``x``, else None."""
    if not name.startswith("no"):
        return None
    target = _registered(name[2:].lstrip("-_"), flag_values)
    if target is not None and flag_values[target].boolean:
        return target
    return None


def canonical_argv(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """`argv` with every flag name in the spelling it is registered with.

    Names that are no flag (and positional arguments, values, anything after ``--``) are left
    as they are, for absl to parse or report.
    """
    out = [argv[0]] if argv else []
    args = list(argv[1:])
    takes_value = False  # the previous argument was a non-boolean flag without "=value"
    for i, arg in enumerate(args):
        if takes_value:
            takes_value = False
            out.append(arg)
            continue
        if arg == "--":
            out.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            out.append(arg)
            continue
        dashes = "--" if arg.startswith("--") else "-"
        name, sep, rest = arg[len(dashes) :].partition("=")
        target = _registered(name, flag_values)
        if target is not None:
            out.append(dashes + target + sep + rest)
            takes_value = not sep and not flag_values[target].boolean
            continue
        negated = _negated_boolean(name, flag_values)
        if negated is not None:
            out.append(dashes + "no" + negated + sep + rest)
            continue
        out.append(arg)
    return out


def apply_verbosity(flag_values: flags.FlagValues = FLAGS) -> None:
    """WARNING for absl logging unless ``--verbosity`` was given; the project's logger at INFO.

    The ``tf_agg3d`` standard logger (library modules log through ``tf_agg3d.<module>``) keeps
    INFO unless a level below it was asked for, so the project's own messages still show.
    """
    if "verbosity" not in flag_values:
        return
    verbosity = flag_values["verbosity"]
    if verbosity.using_default_value:
        # Assigning marks the flag as given, so app.run no longer raises it to INFO.
        flag_values.verbosity = DEFAULT_VERBOSITY
    # -1 (the default) and 0: INFO; DEBUG or a level above INFO: the root logger's, as absl set it.
    level = std_logging.INFO if verbosity.value in (-1, 0) else std_logging.NOTSET
    std_logging.getLogger("tf_agg3d").setLevel(level)


def file_under_program(
    modules: Sequence[str], program: str, flag_values: flags.FlagValues = FLAGS
) -> None:
    """Lists the flags defined in `modules` under `program` too, so ``--help`` shows them.

    absl's ``--help`` lists the flags of the main program's module only; a console script's
    main module is the script, while the command's flags were defined in its module (and the
    shared ones in this one).
    """
    by_module = flag_values.flags_by_module_dict()
    shown = {id(flag) for flag in by_module.get(program, [])}
    for module in modules:
        for flag in by_module.get(module, []):
            if id(flag) not in shown:
                flag_values.register_flag_by_module(program, flag)
                shown.add(id(flag))


def value(name: str, flag_values: flags.FlagValues = FLAGS):
    """The value of flag `name`, spelled with dashes or underscores."""
    registered = _registered(name, flag_values)
    if registered is None:
        raise KeyError(f"no flag --{name}")
    return flag_values[registered].value


def values(flag_values: flags.FlagValues = FLAGS) -> types.SimpleNamespace:
    """Every flag's value as an attribute named with underscores (``opts.model_dir``)."""
    return types.SimpleNamespace(
        **{name.replace("-", "_"): flag_values[name].value for name in flag_values}
    )


def keywords(opts: types.SimpleNamespace, *names: str) -> dict:
    """``{name: opts.name}``: the flags a command hands to a library call whose parameters
    have the flags' names (underscore spelling)."""
    return {name: getattr(opts, name) for name in names}


def given(name: str, flag_values: flags.FlagValues = FLAGS) -> bool:
    """Whether flag `name` (either spelling) was set on the command line."""
    registered = _registered(name, flag_values)
    return registered is not None and flag_values[registered].present > 0


def require(*names: str, flag_values: flags.FlagValues = FLAGS) -> None:
    """Raises a usage error naming each of `names` (dashed) whose value is empty."""
    from absl.app import UsageError  # tf_agg3d.cli.exit.UsageError

    missing = [f"--{n.replace('_', '-')}" for n in names if not value(n, flag_values)]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")


def integers(name: str, values: Sequence[str] | None) -> list[int]:
    """The values of list flag `name` as integers ([] when unset); a usage error naming the
    flag if one is not an integer."""
    from absl.app import UsageError  # tf_agg3d.cli.exit.UsageError

    try:
        return [int(v) for v in values or ()]
    except ValueError:
        raise UsageError(f"--{name}: expected integers, got {','.join(values)}") from None


# The flags several commands share. Each definer is idempotent per FlagValues, so a command
# module and a helper may both ask for them.


def define_once(
    define, name: str, default, help_text: str, flag_values: flags.FlagValues = FLAGS
) -> None:
    """``define(name, default, help_text)`` (an absl ``DEFINE_*``) unless `name` is defined."""
    if name not in flag_values:
        define(name, default, help_text, flag_values=flag_values)


def define_config_flags(
    config_help: str = "YAML experiment config (configs/*.yaml).",
    set_help: str = "Config override key=value (repeatable), e.g. inference.overlap=16.",
    *,
    default_config: str | None = None,
    with_set: bool = True,
    flag_values: flags.FlagValues = FLAGS,
) -> None:
    """Defines ``--config`` (a YAML file) and, unless `with_set` is False, ``--set key=value``."""
    define_once(flags.DEFINE_string, "config", default_config, config_help, flag_values)
    if with_set:
        define_once(flags.DEFINE_multi_string, "set", [], set_help, flag_values)


def define_experiment_flags(unit: str, config_help: str, set_help: str) -> None:
    """The flags of the experiment commands (``tf_agg3d.ablate``, ``tf_agg3d.crossval``).

    ``--config`` / ``--set`` (see :func:`define_config_flags`), ``--parallel`` (how many
    `unit`, e.g. "Folds", run at once as subprocesses), ``--gpus`` and the annotation CSVs.
    """
    define_config_flags(config_help, set_help)
    if "parallel" in FLAGS:  # defined already (definers are idempotent)
        return
    flags.DEFINE_integer("parallel", 1, f"{unit} at once, as subprocesses (1: in this process).")
    flags.DEFINE_list("gpus", [], "With --parallel: GPU ids, one per process (round robin).")
    flags.DEFINE_string("annotations", None, "annotations.csv (default: what the cache provides).")
    flags.DEFINE_string("excluded", None, "annotations_excluded.csv (default: beside annotations).")


def define_model_dir_flag(
    help_text: str = "Model directory (config.yaml + checkpoints).",
    *,
    required: bool = False,
    flag_values: flags.FlagValues = FLAGS,
) -> None:
    """Defines ``--model-dir`` (``--model_dir`` works too)."""
    define_once(flags.DEFINE_string, "model-dir", None, help_text, flag_values)
    if required:
        flags.mark_flag_as_required("model-dir", flag_values=flag_values)


def load_config_from_flags(base=None, extra_overrides: Sequence[str] = ()):
    """``load_config(--config, --set + extra_overrides, base=base)``.

    Raises:
      ConfigError, FileNotFoundError: an unreadable or invalid file or override.
    """
    from tf_agg3d.config import load_config

    overrides = [*value("set"), *extra_overrides] if "set" in FLAGS else list(extra_overrides)
    return load_config(value("config"), overrides, base=base)
