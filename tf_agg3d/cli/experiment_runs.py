"""What the experiment commands (``tf_agg3d.ablate``, ``tf_agg3d.crossval``) share.

Both check the same command line (no positional arguments, ``--parallel`` / ``--gpus``), then
run their runs (folds; variant x seed) either as ``--parallel`` child processes or one after
another in this process, and end with the same exit statuses: 0 done, 1 a run failed, 143 after
SIGTERM (a checkpoint was saved; rerun to resume).
"""

from __future__ import annotations

import abc
import types
from collections.abc import Sequence

from tf_agg3d.cli import exit as cli_exit
from tf_agg3d.cli import flags as cli_flags

# The status of an interrupted run (SIGTERM), as tf_agg3d.train ends with.
INTERRUPTED = 143


def checked_options(argv: Sequence[str], *required: str) -> types.SimpleNamespace:
    """The flags' values (:func:`tf_agg3d.cli.flags.values`) once the command line is checked.

    Raises:
      UsageError: positional arguments, a `required` flag not given, ``--parallel`` below 1,
        ``--gpus`` without ``--parallel N`` (N >= 2).
    """
    if len(argv) > 1:
        raise cli_exit.UsageError(f"unexpected arguments: {argv[1:]}")
    cli_flags.require(*required)
    opts = cli_flags.values()
    if opts.parallel < 1:
        raise cli_exit.UsageError(f"--parallel must be >= 1, got {opts.parallel}")
    if opts.gpus and opts.parallel < 2:
        raise cli_exit.UsageError("--gpus needs --parallel N (N >= 2)")
    return opts


class Runs(abc.ABC):
    """The runs of an experiment command: each run not done yet trained, as ``--parallel``
    child processes or one after another in this process.

    A command subclasses it to say what a run is (its name, its child command line, how it
    trains) and sets `title`, what the SIGTERM line names.

    Args:
      opts: the command's flags (:func:`checked_options`).
      experiment: the experiment (``Ablation``, ``CrossValidation``): ``is_done(run)``.
    """

    title = "experiment"

    def __init__(self, opts: types.SimpleNamespace, experiment):
        self.opts = opts
        self.experiment = experiment

    @abc.abstractmethod
    def name(self, run) -> str:
        """The run's name in progress lines."""

    @abc.abstractmethod
    def skipped(self, runs: list) -> str:
        """The line naming the `runs` skipped because they are done."""

    @abc.abstractmethod
    def command(self, run) -> list[str]:
        """The ``--parallel`` child process that trains `run` alone."""

    @abc.abstractmethod
    def failed(self, statuses: dict) -> str:
        """The error line for the child processes that failed: {run: exit status}."""

    @abc.abstractmethod
    def distribute(self, run) -> str:
        """``train.distribute`` of `run`'s config."""

    @abc.abstractmethod
    def train(self, run, strategy) -> None:
        """Trains `run` in this process under `strategy`."""

    def run(self, runs: Sequence) -> int:
        """Trains each of `runs` that is not done; the exit status."""
        todo = [r for r in runs if not self.experiment.is_done(r)]
        skipped = [r for r in runs if r not in todo]
        if skipped:
            print(self.skipped(skipped), flush=True)
        if not todo:
            return cli_exit.OK
        if self.opts.parallel > 1:
            return self._run_children(todo)
        return self._train_here(todo)

    def _run_children(self, todo: list) -> int:
        from tf_agg3d.experiments.processes import run_parallel

        commands = {run: self.command(run) for run in todo}
        try:
            results = run_parallel(
                commands, self.opts.parallel, gpus=self.opts.gpus, name=self.name
            )
        except KeyboardInterrupt as err:
            print(f"{self.title} interrupted: {err}; rerun to resume", flush=True)
            return INTERRUPTED
        failed = {run: code for run, code in results.items() if code != 0}
        if failed:
            cli_exit.print_error("error", self.failed(failed))
            return cli_exit.ITEMS_FAILED
        return cli_exit.OK

    def _train_here(self, todo: list) -> int:
        """The first failure ends the runs: an interrupted run (SIGTERM) with its status, a run
        that failed (a non-finite loss, unpredictable scans, storage failing mid-run) with 1."""
        import tensorflow as tf

        from tf_agg3d.experiments.model_run import RunFailed
        from tf_agg3d.training.loop import NonFiniteLossError, TrainingInterrupted, exit_code_for
        from tf_agg3d.training.strategy import make_strategy

        # One strategy for every run: MultiWorkerMirroredStrategy must exist before TensorFlow
        # initialises its devices.
        strategy = make_strategy(self.distribute(todo[0]))
        for run in todo:
            try:
                self.train(run, strategy)
            except TrainingInterrupted as err:
                print(f"{self.name(run)}: training interrupted: {err}; rerun to resume", flush=True)
                return exit_code_for(err)
            except (NonFiniteLossError, RunFailed, tf.errors.OpError) as err:  # rerun to resume
                cli_exit.report(err)
                return cli_exit.ITEMS_FAILED
        return cli_exit.OK
