"""The Beam batch jobs' command lines: ``agg3d-beam-preprocess`` and ``agg3d-beam-predict``.

``python -m tf_agg3d.pipelines.preprocess`` and ``python -m tf_agg3d.pipelines.predict`` run
these too (those modules hand their ``__main__`` over here; their docstrings are the usage).
Flags are defined when a command starts, not at import, since both commands live here.

Each command takes its own flags (dashed or underscored, as every tf_agg3d command) and hands
every other argument to Beam as pipeline options (``--runner DataflowRunner --project P
--region R --temp_location gs://...``, ``--direct_num_workers=4``, ...); an argument that is
neither is a usage error. With no runner named the DirectRunner runs on every local core
(:func:`tf_agg3d.pipelines.common.pipeline_options`).

Exit status: 0 every scan done; 1 some scan failed (the others are done; the dead-letter CSV
names them) or the pipeline failed; 2 a usage, configuration or input error found before any
work, or a missing apache-beam (``pip install 'tf_agg3d[beam]'``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.cli.flags import define_once
from tf_agg3d.cli.output import report

FLAGS = flags.FLAGS


# --------------------------------------------------------------------------------------------
# Running a command whose unknown flags are Beam's
# --------------------------------------------------------------------------------------------


def _asks_for_help(argv: Sequence[str]) -> bool:
    help_flags = ("help", "h", "helpshort", "helpfull", "helpxml", "?")
    return any(
        a.startswith("-") and a.lstrip("-").partition("=")[0] in help_flags for a in argv[1:]
    )


def parse_known_flags(argv: Sequence[str]) -> list[str]:
    """absl's parsing of this command's flags (both spellings); the others are left, in order,
    for Beam. A bad value of a known flag exits with status 2; ``--help`` with 0.

    Returns:
      The program name and the arguments that are not this command's flags.
    """
    try:
        rest = FLAGS(cli_flags.canonical_argv(argv, FLAGS), known_only=True)
    except flags.Error as err:
        cli_exit.usage_error(str(err))
    except SystemExit:
        if _asks_for_help(argv):
            raise SystemExit(0) from None
        raise
    cli_flags.apply_verbosity()
    if not cli_flags.given("verbosity"):
        # Beam's own INFO/WARNING lines (pickling, options) only with -v 0.
        logging.getLogger("apache_beam").setLevel(logging.ERROR)
    return rest


def run_command(
    main: Callable[[list[str]], int | None],
    define: Callable[[], None],
    doc: str | None,
    argv: Sequence[str] | None = None,
) -> None:
    """Defines the flags, parses them (the rest goes to `main` for Beam), runs `main`, exits
    with its status (:func:`tf_agg3d.cli.exit.call` maps the errors)."""
    from tf_agg3d.utils.process import exit_after
    from tf_agg3d.utils.verbosity import quiet_native_logs

    argv = list(sys.argv if argv is None else argv)
    if "tensorflow" not in sys.modules:
        # Also inherited by local Beam workers, which import TensorFlow later.
        quiet_native_logs(argv, os.environ)
    main_module = sys.modules.get("__main__")
    if doc and main_module is not None and not getattr(main_module, "__doc__", None):
        main_module.__doc__ = doc  # absl's --help prints __main__'s docstring
    define()
    if argv:
        cli_flags.file_under_program([__name__, cli_flags.__name__], argv[0])
    app.run(
        lambda args: exit_after(cli_exit.call(main, args)),
        argv=argv,
        flags_parser=parse_known_flags,
    )


def _check_beam_args(args: Sequence[str]) -> None:
    """A usage error for arguments that are neither this command's flags nor Beam's."""
    from tf_agg3d.pipelines import common

    common.require_beam()
    unknown = common.unknown_beam_args(args)
    if unknown:
        raise cli_exit.UsageError(
            f"not a flag of this command nor a Beam pipeline option: {' '.join(unknown)}"
        )


def _run_job(run: Callable[[], object]) -> int:
    """Runs a pipeline; returns the command's exit status. A pipeline (or a ``--model-dir``
    export) that failed is one ``kind: message`` line and status 1, as a failed scan is."""
    from tf_agg3d.pipelines.common import PipelineError
    from tf_agg3d.serving.errors import ExportError

    try:
        summary = run()
    except (PipelineError, ExportError) as err:
        cli_exit.report(err)
        return cli_exit.ITEMS_FAILED
    return cli_exit.items_status(summary.failed)


# --------------------------------------------------------------------------------------------
# agg3d-beam-preprocess
# --------------------------------------------------------------------------------------------


def _define_luna16_selection_flags(luna_root_help: str) -> None:
    """``--luna-root``, ``--subsets`` and ``--seriesuids``: how both jobs pick LUNA16 scans."""
    define_once(flags.DEFINE_string, "luna-root", None, luna_root_help)
    define_once(flags.DEFINE_list, "subsets", None, "LUNA16 subsets, e.g. 0,1 (default: all).")
    define_once(
        flags.DEFINE_string, "seriesuids", None, "File of the seriesuids to take (default: all)."
    )


def define_preprocess_flags() -> None:
    """Defines ``agg3d-beam-preprocess``'s flags (the rest of the line is Beam's)."""
    _define_luna16_selection_flags(
        "LUNA16 folder or gs://, s3:// URL (subset0..9/, seg-lungs-LUNA16/, annotations CSVs)."
    )
    define_once(
        flags.DEFINE_string, "annotations", None, "annotations.csv (default: under the root)."
    )
    define_once(flags.DEFINE_string, "excluded", None, "annotations_excluded.csv (default: found).")
    define_once(flags.DEFINE_string, "out", None, "Cache folder or URL (<seriesuid>.npy/.json).")
    define_once(flags.DEFINE_boolean, "force", False, "Redo scans whose cache entry is complete.")
    cli_flags.define_config_flags(
        "YAML experiment config (its `preprocess` section is used).",
        "Config override key=value, e.g. preprocess.fill_hu=-1000.",
    )


def preprocess_main(argv: list[str]) -> int:
    """``agg3d-beam-preprocess``'s body: `argv` holds the program name and Beam's options."""
    from tf_agg3d.data.luna16.csv_io import read_seriesuids

    cli_flags.require("luna-root", "out")
    opts = cli_flags.values()
    subsets = cli_flags.integers("subsets", opts.subsets) or None
    config = cli_flags.load_config_from_flags().preprocess
    from tf_agg3d.pipelines import preprocess

    _check_beam_args(argv[1:])
    uids = read_seriesuids(opts.seriesuids) if opts.seriesuids else None
    return _run_job(
        lambda: preprocess.run_preprocess_pipeline(
            opts.luna_root,
            opts.out,
            config,
            beam_args=argv[1:],
            subsets=subsets,
            seriesuids=uids,
            annotations_path=opts.annotations,
            excluded_path=opts.excluded,
            force=opts.force,
            report=report,
        )
    )


def run_preprocess() -> None:
    """``agg3d-beam-preprocess`` / ``python -m tf_agg3d.pipelines.preprocess``."""
    from tf_agg3d.pipelines import preprocess

    run_command(preprocess_main, define_preprocess_flags, preprocess.__doc__)


# --------------------------------------------------------------------------------------------
# agg3d-beam-predict
# --------------------------------------------------------------------------------------------


def define_predict_flags() -> None:
    """Defines ``agg3d-beam-predict``'s flags (the rest of the line is Beam's)."""
    # The model: an export, or a training run exported first with the settings given here.
    define_once(
        flags.DEFINE_string,
        "export",
        None,
        "Exported model: EXPORT_BASE/agg3d/VERSION (python -m tf_agg3d.export), or the model "
        "base EXPORT_BASE/agg3d for its newest version.",
    )
    cli_flags.define_model_dir_flag(
        "Training run (config.yaml + checkpoints) to export first, instead of --export."
    )
    cli_flags.define_config_flags(
        "With --model-dir: YAML merged over the run's config.yaml.",
        "With --model-dir: config override key=value, e.g. inference.overlap=16.",
    )
    define_once(flags.DEFINE_string, "checkpoint", None, "With --model-dir: checkpoint to export.")
    define_once(flags.DEFINE_float, "threshold", None, "With --model-dir: RPN score threshold.")
    define_once(
        flags.DEFINE_integer, "max-marks", None, "With --model-dir: most findings per scan."
    )
    define_once(
        flags.DEFINE_string,
        "export-base",
        None,
        "With --model-dir: where to export it (kept; default: a temporary folder, or one under "
        "--temp_location for cluster runners, removed at the end).",
    )
    # The scans: a cache, a LUNA16 download, or scan files.
    define_once(flags.DEFINE_string, "cache", None, "Preprocessed cache folder.")
    _define_luna16_selection_flags(
        "LUNA16 folder: scans preprocessed on the fly, with their seg-lungs-LUNA16 mask."
    )
    define_once(flags.DEFINE_string, "scans", None, "File listing scan files / DICOM folders.")
    define_once(flags.DEFINE_multi_string, "scan", None, "Scan file / DICOM folder (repeatable).")
    # The output.
    define_once(flags.DEFINE_string, "out", None, "Output CSV (LUNA16 columns + 3 extra).")
    define_once(
        flags.DEFINE_string, "failures", None, "Dead-letter CSV (default: <out>_failures.csv)."
    )


def _predict_inputs(opts) -> tuple[list[int] | None, list[str] | None]:
    """Checks the flag combination; returns (--subsets, the scans of --scans / --scan)."""
    if bool(opts.export) == bool(opts.model_dir):
        raise cli_exit.UsageError("give exactly one of --export or --model-dir")
    scans = bool(opts.scans or opts.scan)
    if sum(bool(v) for v in (opts.cache, opts.luna_root, scans)) != 1:
        raise cli_exit.UsageError("give exactly one of --cache, --luna-root or --scans/--scan")
    if opts.seriesuids and not (opts.cache or opts.luna_root):
        raise cli_exit.UsageError("--seriesuids needs --cache or --luna-root")
    if opts.subsets and not opts.luna_root:
        raise cli_exit.UsageError("--subsets needs --luna-root")
    if opts.export:
        graph_flags = [
            f"--{name}"
            for name, value in (
                ("threshold", opts.threshold),
                ("max-marks", opts.max_marks),
                ("config", opts.config),
                ("set", opts.set),
                ("checkpoint", opts.checkpoint),
                ("export-base", opts.export_base),
            )
            if value not in (None, [], "")
        ]
        if graph_flags:
            raise cli_exit.UsageError(
                f"{', '.join(graph_flags)}: need --model-dir (an export's inference settings "
                "are part of its graph; export again with them)"
            )
    subsets = cli_flags.integers("subsets", opts.subsets) or None
    if not scans:
        return subsets, None
    from tf_agg3d.pipelines.predict_jobs import read_scan_list

    return subsets, [*(read_scan_list(opts.scans) if opts.scans else []), *(opts.scan or [])]


def predict_main(argv: list[str]) -> int:
    """``agg3d-beam-predict``'s body: `argv` holds the program name and Beam's options."""
    from tf_agg3d.data.luna16.csv_io import read_seriesuids

    cli_flags.require("out")
    opts = cli_flags.values()
    from tf_agg3d.pipelines import predict

    _check_beam_args(argv[1:])
    subsets, scans = _predict_inputs(opts)
    config = None
    if opts.model_dir:
        from tf_agg3d.config import load_config
        from tf_agg3d.models.loading import load_model_config

        overrides = list(opts.set)
        if opts.threshold is not None:
            overrides.append(f"inference.score_threshold={opts.threshold!r}")
        if opts.max_marks is not None:
            overrides.append(f"inference.max_marks={opts.max_marks}")
        config = load_config(opts.config, overrides, base=load_model_config(opts.model_dir))
    uids = read_seriesuids(opts.seriesuids) if opts.seriesuids else None
    # Flags named like run_predict_pipeline's parameters go through as they are.
    passed = cli_flags.keywords(
        opts, "out", "export", "model_dir", "checkpoint", "export_base", "cache", "luna_root"
    )
    return _run_job(
        lambda: predict.run_predict_pipeline(
            **passed,
            config=config,
            subsets=subsets,
            seriesuids=uids,
            scans=scans,
            failures=opts.failures,
            beam_args=argv[1:],
            report=report,
        )
    )


def run_predict() -> None:
    """``agg3d-beam-predict`` / ``python -m tf_agg3d.pipelines.predict``."""
    from tf_agg3d.pipelines import predict

    run_command(predict_main, define_predict_flags, predict.__doc__)
