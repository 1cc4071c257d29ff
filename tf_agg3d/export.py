"""Export a trained detector as a TF-Serving SavedModel, and/or write a models.config.

Usage::

  python -m tf_agg3d.export --model-dir DIR --export-base BASE [--version N] \\
      [--checkpoint PATH] [--overwrite] [--warmup] [--max-volume-shape 512,512,512]
  # also (re)write a models.config for the base (alone when --model-dir is omitted):
  python -m tf_agg3d.export --export-base BASE --models-config serving/models.config \\
      [--serving-base-path /models/agg3d] [--version-policy latest|all|specific] \\
      [--versions 3,4] [--version-labels stable=3,canary=4]

The SavedModel lands in ``BASE/agg3d/<version>/`` (default version: highest existing + 1),
written under a temporary name and moved into place, so TF-Serving never loads half a model.
--model-dir, --export-base and --models-config may be ``s3://`` / ``gs://`` URLs; on object
stores the version's files are moved in one by one with ``saved_model.pb`` last
(:mod:`tf_agg3d.serving.publishing`).

Exit status: 0 on success, 1 when the export or the models.config failed (a ``kind: message``
line on stderr), 2 for a usage error, a missing optional package (tensorflow-io for s3://), or
no usable checkpoint (none in --model-dir, or a truncated / damaged one, named).
Every flag also takes its underscore spelling (``--model_dir``, ``--export_base``).
"""

from __future__ import annotations

import os

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags

FLAGS = flags.FLAGS
cli_flags.define_model_dir_flag("Training run directory (config.yaml + checkpoints).")
flags.DEFINE_string("export-base", None, "TF-Serving model root; writes BASE/MODEL/VERSION.")
flags.DEFINE_integer("version", None, "Version to write (default: highest existing + 1).")
flags.DEFINE_string("checkpoint", None, "Checkpoint name/number/prefix (default: the latest).")
flags.DEFINE_boolean("overwrite", False, "Replace an existing version.")
flags.DEFINE_string("model-name", "agg3d", "TF-Serving model name.")
flags.DEFINE_list("max-volume-shape", ["512", "512", "512"], "Largest accepted D,H,W.")
flags.DEFINE_boolean("warmup", False, "Write assets.extra/tf_serving_warmup_requests.")
flags.DEFINE_string("models-config", None, "Also (re)write this TF-Serving models.config.")
flags.DEFINE_string(
    "serving-base-path",
    None,
    "base_path in models.config as the server sees it (default: BASE/MODEL, absolute).",
)
flags.DEFINE_enum("version-policy", "latest", ["latest", "all", "specific"], "Version policy.")
flags.DEFINE_integer("num-versions", 1, "Versions served by the 'latest' policy.")
flags.DEFINE_list("versions", [], "Versions served by the 'specific' policy.")
flags.DEFINE_list("version-labels", [], "label=version pairs, e.g. stable=3,canary=4.")


def main(argv) -> int:
    """The command's body (flags already parsed): returns the exit status."""
    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {argv[1:]}")
    opts = cli_flags.values()
    import tensorflow as tf

    from tf_agg3d.config import ConfigError
    from tf_agg3d.data.errors import DataError
    from tf_agg3d.models.checkpoints import CheckpointNotFoundError
    from tf_agg3d.serving.errors import ExportError
    from tf_agg3d.serving.models_config import ServedModel, write_models_config
    from tf_agg3d.serving.publishing import export_from_checkpoint
    from tf_agg3d.utils.files import join
    from tf_agg3d.utils.filesystems import ensure_filesystems, is_url

    if not opts.export_base:
        raise cli_exit.UsageError("--export-base is required")
    if not opts.model_dir and not opts.models_config:
        raise cli_exit.UsageError(
            "give --model-dir (export) and/or --models-config (serving config)"
        )
    shape = cli_flags.integers("max-volume-shape", opts.max_volume_shape)
    if len(shape) != 3:
        raise cli_exit.UsageError(
            f"--max-volume-shape: expected D,H,W, got {opts.max_volume_shape}"
        )
    labels = {}
    for pair in opts.version_labels:
        label, sep, version = pair.partition("=")
        if not sep or not label or not version.isdigit():
            raise cli_exit.UsageError(f"--version-labels: expected label=version, got {pair!r}")
        labels[label] = int(version)
    try:
        ensure_filesystems(opts.model_dir, opts.export_base, opts.models_config)
    except ImportError as err:  # MissingExtraError: s3:// without tensorflow-io
        cli_exit.report(err)
        return cli_exit.USAGE
    base = opts.export_base if is_url(opts.export_base) else os.path.abspath(opts.export_base)
    try:
        if opts.model_dir:
            result = export_from_checkpoint(
                opts.model_dir,
                base,
                version=opts.version,
                checkpoint=opts.checkpoint,
                overwrite=opts.overwrite,
                model_name=opts.model_name,
                max_volume_shape=shape,
                warmup=opts.warmup,
            )
            print(f"exported {opts.model_name} version {result.version} to {result.path}")
        if opts.models_config:
            model = ServedModel(
                name=opts.model_name,
                base_path=opts.serving_base_path or join(base, opts.model_name),
                version_policy=opts.version_policy,
                num_versions=opts.num_versions,
                versions=tuple(cli_flags.integers("versions", opts.versions)),
                version_labels=labels,
            )
            write_models_config(opts.models_config, [model])
            print(f"wrote {opts.models_config} (base_path {model.base_path})")
    except CheckpointNotFoundError as err:  # none there, or an unreadable (corrupt) one
        cli_exit.report(err)
        return cli_exit.USAGE
    except (
        ExportError,
        ConfigError,
        DataError,
        FileNotFoundError,
        ValueError,
        tf.errors.OpError,  # storage errors: permissions, an unreachable endpoint
    ) as err:
        cli_exit.report(err)
        return cli_exit.ITEMS_FAILED
    return cli_exit.OK


def run() -> None:
    """``agg3d-export`` / ``python -m tf_agg3d.export``."""
    cli_exit.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
