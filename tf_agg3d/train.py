r"""Trains the detector: phase 1 (RPN), phase 2 (joint / alternating), Anchor Based Sampling.

Usage:
  python -m tf_agg3d.train --config configs/luna16/3d_ag.yaml --model-dir DIR [--cache CACHE] \
      [--phase rpn|joint|alternating|abs] [--fold K] [--max-steps N] [--set key=value ...]

The paper's recipe on one model directory::

  python -m tf_agg3d.train --config C --model-dir M --cache CACHE --fold 0 --phase rpn
  python -m tf_agg3d.train --config C --model-dir M --cache CACHE --fold 0 --phase joint
  python -m tf_agg3d.train --config C --model-dir M --cache CACHE --fold 0 --phase abs
  python -m tf_agg3d.train --config C --model-dir M --cache CACHE --fold 0 --phase joint

(the last run is the round after ABS: it finds ``M/abs_hard_negatives.json`` and trains
``train.abs_epochs`` more epochs into ``M/checkpoints/joint_abs``). Rerunning any command
resumes from its newest checkpoint; a finished phase returns at once.

Flags override the config: ``--cache`` sets data.cache_dir, ``--phase`` train.phase, ``--fold``
data.fold (fold k holds out LUNA16 subset k), ``--max-steps`` train.max_steps (the phase's length
in steps, instead of epochs). The resolved config is saved as ``M/config.yaml``.

tf.distribute: MirroredStrategy over the visible GPUs (the CPU otherwise); with ``TF_CONFIG``
naming a cluster, MultiWorkerMirroredStrategy (run the same command on every worker).

--model-dir, --cache and --config may be ``s3://`` / ``gs://`` URLs (``s3://`` needs
tensorflow-io): checkpoints, summaries and config.yaml are written there, and a remote cache's
training volumes are kept in memory up to ``data.remote_cache_bytes`` so each is downloaded
once per run.

Exit status: 0 done; 2 bad configuration or data, or a missing optional package, found before
any work; 1 a failure during training (e.g. a non-finite loss: the message names the last good
checkpoint); 143 after SIGTERM (a checkpoint was saved first; rerun to resume). Errors print as
one ``kind: message`` line on stderr. Every flag also takes its underscore spelling
(``--model_dir``, ``--max_steps``); ``-v 0`` / ``--verbosity=0`` adds TensorFlow's INFO logging.
"""

from __future__ import annotations

from absl import flags

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags

FLAGS = flags.FLAGS
cli_flags.define_config_flags(
    "YAML experiment config (configs/*.yaml).",
    "Config override key=value, e.g. data.batch_size=4.",
)
cli_flags.define_model_dir_flag(
    "Model directory: checkpoints, summaries, config.yaml.", required=True
)
flags.DEFINE_string("cache", None, "Preprocessed cache folder (sets data.cache_dir).")
flags.DEFINE_enum(
    "phase", None, ["rpn", "joint", "alternating", "abs"], "Phase (sets train.phase)."
)
flags.DEFINE_integer("fold", None, "Held-out LUNA16 subset 0..9, -1 for none (sets data.fold).")
flags.DEFINE_integer("max-steps", None, "Phase length in steps (sets train.max_steps).")


def resolve_config(config_path, overrides, cache=None, phase=None, fold=None, max_steps=None):
    """The experiment config from a YAML file, ``--set`` overrides and the dedicated flags.

    Raises:
      ConfigError: unknown keys, wrong types, or impossible values (naming the key).
    """
    from tf_agg3d.config import load_config

    extra = list(overrides)
    if cache is not None:
        extra.append(f"data.cache_dir={cache}")
    if phase is not None:
        extra.append(f"train.phase={phase}")
    if fold is not None:
        extra.append(f"data.fold={fold}")
    if max_steps is not None:
        extra.append(f"train.max_steps={max_steps}")
    # Quote path values as YAML strings so e.g. "123" or "no" stay strings.
    extra = [_quote_path(o) for o in extra]
    return load_config(config_path, extra)


def _quote_path(override: str) -> str:
    key, _, value = override.partition("=")
    if key.strip() in (
        "data.cache_dir",
        "data.train_seriesuids",
        "data.val_seriesuids",
        "data.abs_file",
        "train.init_checkpoint",
    ) and not value.startswith(("'", '"')):
        return f"{key}={value!r}" if value else override
    return override


def main(argv: list[str]) -> int:
    """The command's body (flags already parsed): returns the exit status."""
    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {argv[1:]}")
    from tf_agg3d.training.checks import validate_training_config
    from tf_agg3d.utils.filesystems import ensure_filesystems

    opts = cli_flags.values()
    # Before any work: a missing tensorflow-io, a bad config (ConfigError, DataError) are
    # reported at once, in one line, with status 2 (tf_agg3d.cli.exit.call). The config's own
    # paths (a cache set in the YAML, uid lists) are known once it is read.
    ensure_filesystems(opts.model_dir, opts.cache, opts.config)
    config = resolve_config(
        opts.config,
        opts.set,
        cache=opts.cache,
        phase=opts.phase,
        fold=opts.fold,
        max_steps=opts.max_steps,
    )
    data = config.data
    ensure_filesystems(
        data.cache_dir,
        data.train_seriesuids,
        data.val_seriesuids,
        data.abs_file,
        config.train.init_checkpoint,
    )
    validate_training_config(config)

    # The strategy comes first: MultiWorkerMirroredStrategy must exist before TensorFlow
    # initialises its devices (importing tensorflow does not initialise them).
    import tensorflow as tf

    from tf_agg3d.data.errors import DataError
    from tf_agg3d.training.loop import NonFiniteLossError, TrainingInterrupted, exit_code_for
    from tf_agg3d.training.strategy import make_strategy
    from tf_agg3d.training.trainer import Trainer

    try:
        strategy = make_strategy(config.train.distribute)
        trainer = Trainer(config, opts.model_dir, strategy=strategy)
        trainer.setup()
    except (DataError, FileNotFoundError, ValueError) as err:
        cli_exit.report(err, type(err).__name__)
        return cli_exit.USAGE
    except tf.errors.OpError as err:  # storage: permissions, an unreachable endpoint
        cli_exit.report(err)
        return cli_exit.ITEMS_FAILED
    try:
        trainer.run()
    except tf.errors.OpError as err:  # storage failing mid-run; rerun to resume
        cli_exit.report(err)
        return cli_exit.ITEMS_FAILED
    except TrainingInterrupted as err:
        print(f"training interrupted: {err}; rerun the same command to resume", flush=True)
        return exit_code_for(err)
    except NonFiniteLossError as err:
        cli_exit.report(err)
        return exit_code_for(err)
    return cli_exit.OK


def run() -> None:
    """``agg3d-train`` / ``python -m tf_agg3d.train``."""
    cli_exit.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
