"""Preprocesses LUNA16 into the cache (README "Conventions").

    python -m tf_agg3d.preprocess --luna-root DIR --out CACHE [--subsets 0,1] [--workers N]
        [--config YAML] [--set preprocess.crop_margin_mm=8] [--seriesuids FILE]

Every flag also takes its underscore spelling (``--luna_root``).

--luna-root and --out may be `s3://bucket/prefix` or `gs://...` URLs (README "Object storage").

Exit status: 0 when every scan is cached (written now or before), 1 when any scan failed (the
others are still done), 2 for a bad configuration, a malformed CSV or a missing optional
package (tensorflow-io for s3://), found before any work.
"""

from __future__ import annotations

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags
from tf_agg3d.cli import preprocess_steps as steps
from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data.preprocessing.runner import RunSummary, run_preprocess

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "luna-root", None, "LUNA16 folder or s3://, gs:// URL (subset0..9/, seg-lungs-LUNA16/, CSVs)."
)
flags.DEFINE_string("out", None, "Cache folder or URL to write <seriesuid>.npy/.json into.")
flags.DEFINE_list("subsets", None, "Subset numbers, e.g. 0,1 (default: all subset* folders).")
steps.define_flags("preprocess.fill_hu=-1000", "File of seriesuids (one per line) to restrict to.")
flags.DEFINE_string("annotations", None, "annotations.csv (default: found under --luna-root).")
flags.DEFINE_string("excluded", None, "annotations_excluded.csv (default: found under the root).")
flags.mark_flags_as_required(["luna-root", "out"])


def _convert(config: PreprocessConfig) -> RunSummary:
    opts = cli_flags.values()
    return run_preprocess(
        opts.luna_root,
        opts.out,
        config,
        subsets=steps.numbers("subsets", opts.subsets),
        annotations_path=opts.annotations,
        excluded_path=opts.excluded,
        **steps.run_arguments(opts),
    )


def main(argv: list[str]) -> int:
    """The command's body (flags already parsed): returns the exit status.

    A bad configuration, a malformed CSV, a non-integer --subsets (a usage error) or a missing
    tensorflow-io (ImportError) reach :func:`tf_agg3d.cli.exit.call`: status 2.
    """
    return steps.main(_convert, argv)


def run() -> None:
    """``agg3d-preprocess`` / ``python -m tf_agg3d.preprocess``."""
    cli_exit.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
