r"""Converts DeepLesion into the cache (README "Conventions") plus LUNA16-style CSV files.

    python -m tf_agg3d.preprocess_deeplesion --root DIR --out CACHE [--splits 1,2,3] \
        [--workers N] [--config YAML] [--set preprocess.crop_margin_mm=5] [--seriesuids FILE] \
        [--dl-info PATH] [--keep-noisy] [--no-merge] [--large-mm 48] [--small-lesion-mm 10] \
        [--force]

Every flag also takes its underscore spelling (``--dl_info``, ``--keep_noisy``); booleans take
``--no-merge`` as well as absl's ``--nomerge``.

DIR holds ``Images_png/<patient>_<study>_<series>/<NNN>.png`` and ``DL_info.csv``. CACHE gets
one ``<series>.npy/.json`` per series folder, ``annotations.csv`` (with ``lesion_type``,
``split`` and ``large`` columns), an empty ``annotations_excluded.csv`` and
``{train,val,test}_seriesuids.csv``, ready for ``python -m tf_agg3d.evaluate``. Conventions
(frame, merging, the small-lesion rule, border clipping): docs/deeplesion.md.

Exit status: 0 when every selected series is cached (now or before); 1 when any series or
DL_info.csv row failed (each named with its file, line and field; the others are written);
2 for a bad configuration or a DL_info.csv without the official header, found before any work.
"""

from __future__ import annotations

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.cli import preprocess_steps as steps
from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data.deeplesion.conversion import run_conversion
from tf_agg3d.data.deeplesion.lesions import DeepLesionOptions
from tf_agg3d.data.preprocessing.runner import RunSummary

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "DeepLesion folder (Images_png/, DL_info.csv).")
flags.DEFINE_string("out", None, "Cache folder to write <series>.npy/.json and the CSVs into.")
flags.DEFINE_list("splits", None, "Train_Val_Test values to convert, e.g. 1,2,3 (default all).")
steps.define_flags(
    "preprocess.fill_hu=0", "File of series folder names (one a line) to restrict to."
)
flags.DEFINE_string("dl-info", None, "DL_info.csv (default: ROOT/DL_info.csv).")
flags.DEFINE_bool("keep-noisy", False, "Keep rows with Possibly_noisy = 1 (the paper drops them).")
flags.DEFINE_bool("merge", True, "Merge multi-annotated lesions (--nomerge to keep every row).")
flags.DEFINE_float("large-mm", 48.0, "Lesions with a diameter >= this are flagged large.")
flags.DEFINE_float(
    "small-lesion-mm", 10.0, "Long diameter below which d = min(box long side, long diameter)."
)
flags.DEFINE_bool("force", False, "Reconvert series already in the cache.")
flags.mark_flags_as_required(["root", "out"])


def _convert(config: PreprocessConfig) -> RunSummary:
    opts = cli_flags.values()
    splits = steps.numbers("splits", opts.splits)
    if splits is not None and any(s not in (1, 2, 3) for s in splits):
        raise ValueError(f"--splits must be values 1, 2, 3, got {opts.splits}")
    options = DeepLesionOptions(
        large_mm=opts.large_mm,
        small_lesion_mm=opts.small_lesion_mm,
        merge=opts.merge,
        keep_noisy=opts.keep_noisy,
    )
    return run_conversion(
        opts.root,
        opts.out,
        config,
        options,
        splits=splits,
        force=opts.force,
        dl_info=opts.dl_info,
        **steps.run_arguments(opts),
    )


def main(argv: list[str]) -> int:
    """The command's body (flags already parsed): returns the exit status.

    A bad configuration, a DL_info.csv without the official header, bad --splits (a usage
    error or ValueError) or a missing optional package (ImportError) reach
    :func:`tf_agg3d.cli.exit.call`: status 2.
    """
    return steps.main(_convert, argv)


def run() -> None:
    """``agg3d-preprocess-deeplesion`` / ``python -m tf_agg3d.preprocess_deeplesion``."""
    cli_exit.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
