"""What the Beam batch jobs share: the optional import, runner defaults, dead letters, counters.

- **apache-beam is optional** (the ``beam`` extra). This module imports it when it is there;
  :data:`DoFn` and :data:`ModelHandler` are Beam's classes then, and placeholders otherwise, so
  every module of the package still imports (the smoke tests import them all). The commands
  call :func:`require_beam` first, which names the extra to install.
- **Runner defaults** (:func:`pipeline_options`): with no runner named, or the DirectRunner
  named without a running mode, the DirectRunner runs in ``multi_processing`` mode on every
  local core (``--direct_num_workers``), so one command line works on a laptop and, with
  ``--runner DataflowRunner ...``, on a cluster. :class:`RunnerInfo` says what was chosen and
  how many threads each local worker may use.
- **Dead letters**: a scan that fails becomes a :class:`Failure` (uid, stage, error), never an
  exception that fails the pipeline; :func:`write_failures` writes them as one CSV, atomically.
- **Counters**: :func:`counter` / :func:`distribution` in one namespace, read back from the
  finished pipeline by :func:`metric_totals`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence

from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_text
from tf_agg3d.utils.filesystems import MissingExtraError, is_url

BEAM_EXTRA_HINT = "pip install 'tf_agg3d[beam]' (or: pip install -r requirements/beam.txt)"
METRICS_NAMESPACE = "tf_agg3d"
FAILURE_COLUMNS = ("uid", "stage", "error")

# Runners that run the workers on this machine (local paths work there).
LOCAL_RUNNERS = frozenset(
    {"direct", "directrunner", "bundlebaseddirectrunner", "switchingdirectrunner", "prismrunner"}
)
# Portable environments whose workers are this process's children (Flink/Spark in LOOPBACK).
LOCAL_ENVIRONMENTS = frozenset({"loopback"})


@contextlib.contextmanager
def _quiet_root_logger():
    # `import apache_beam` logs "apitools not found ..." through logging.warning(), which also
    # installs a root handler when there is none (basicConfig) and so doubles every later
    # absl line. A NullHandler for the import's time keeps both away.
    root = logging.getLogger()
    guard = logging.NullHandler()
    level = root.level
    root.addHandler(guard)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(guard)
        root.setLevel(level)


try:
    with _quiet_root_logger():
        import apache_beam as beam
        from apache_beam.ml.inference import base as inference_base
        from apache_beam.options import pipeline_options as beam_options
except ImportError:  # the beam extra is not installed: see require_beam
    beam = None
    inference_base = None
    beam_options = None


class _NoBeam:
    """Stands in for Beam's base classes when apache-beam is absent (never instantiated)."""

    def __init__(self, *args, **kwargs):
        require_beam()


DoFn = beam.DoFn if beam is not None else _NoBeam
ModelHandler = inference_base.ModelHandler if inference_base is not None else _NoBeam


def require_beam() -> None:
    """Raises :class:`MissingExtraError` (an ImportError) naming the extra without apache-beam."""
    if beam is None:
        raise MissingExtraError(f"the Beam batch jobs need apache-beam: {BEAM_EXTRA_HINT}")


# --------------------------------------------------------------------------------------------
# Runner options
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunnerInfo:
    """The runner a job runs on.

    Attributes:
      name: the runner's name (``DirectRunner`` when none was named).
      local: whether its workers run on this machine (local paths work).
      workers: local worker processes (DirectRunner), None for a cluster.
      threads_per_worker: the CPU threads each local worker may use (cores / workers; SimpleITK
        and TensorFlow would otherwise each take every core), None for a cluster.
      mode: the DirectRunner's running mode, "" for other runners.
    """

    name: str
    local: bool
    workers: int | None
    threads_per_worker: int | None
    mode: str = ""

    def describe(self) -> str:
        if self.workers is None:
            return self.name
        return f"{self.name} ({self.mode}, {self.workers} worker(s))"


def local_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _given(args: Sequence[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)


def unknown_beam_args(args: Sequence[str]) -> list[str]:
    """The arguments of `args` that no Beam pipeline option takes (typos, stray words)."""
    require_beam()
    parser = beam_options._BeamArgumentParser(allow_abbrev=False)  # noqa: SLF001
    classes: dict[str, type] = {}
    for cls in beam_options.PipelineOptions.__subclasses__():
        classes.setdefault(str(cls), cls)
    for cls in classes.values():
        cls._add_argparse_args(parser)  # noqa: SLF001
    _, unknown = parser.parse_known_args(list(args))
    return unknown


def pipeline_options(beam_args: Sequence[str], cores: int | None = None):
    """Beam's PipelineOptions for `beam_args`, with this project's local defaults.

    With no ``--runner`` (or the DirectRunner), ``--direct_running_mode`` defaults to
    ``multi_processing`` and ``--direct_num_workers`` to the local cores. Workers log errors
    only unless ``--default_sdk_harness_log_level`` is given.

    Args:
      beam_args: Beam's flags (``--runner``, ``--project``, ``--direct_num_workers=2``, ...).
      cores: the local cores (default :func:`local_cores`).

    Returns:
      (PipelineOptions, :class:`RunnerInfo`).

    Raises:
      ValueError: an argument that is no Beam option, or a worker count below 1.
    """
    require_beam()
    args = list(beam_args)
    unknown = unknown_beam_args(args)
    if unknown:
        raise ValueError(
            f"not a flag of this command nor a Beam pipeline option: {' '.join(unknown)}"
        )
    options = beam_options.PipelineOptions(args)
    standard = options.view_as(beam_options.StandardOptions)
    if not _given(args, "default_sdk_harness_log_level"):
        options.view_as(beam_options.WorkerOptions).default_sdk_harness_log_level = "ERROR"
    runner = standard.runner or "DirectRunner"
    key = runner.rsplit(".", 1)[-1].lower()
    environment = (options.view_as(beam_options.PortableOptions).environment_type or "").lower()
    if key not in ("direct", "directrunner"):
        local = key in LOCAL_RUNNERS or environment in LOCAL_ENVIRONMENTS
        return options, RunnerInfo(runner, local, None, None)
    direct = options.view_as(beam_options.DirectOptions)
    cores = cores or local_cores()
    if not _given(args, "direct_running_mode"):
        direct.direct_running_mode = "multi_processing"
    if not _given(args, "direct_num_workers") or direct.direct_num_workers == 0:
        direct.direct_num_workers = cores
    if direct.direct_num_workers < 1:
        raise ValueError(f"--direct_num_workers: expected >= 1, got {direct.direct_num_workers}")
    standard.runner = runner
    mode = direct.direct_running_mode
    workers = direct.direct_num_workers if mode != "in_memory" else 1
    threads = max(1, cores // workers) if mode == "multi_processing" else None
    return options, RunnerInfo(runner, True, workers, threads, mode)


def check_reachable(info: RunnerInfo, paths: Iterable[tuple[str, str | None]]) -> None:
    """Refuses local paths when the workers do not run on this machine.

    Args:
      info: the runner.
      paths: (flag name, path) pairs (path None: not given).

    Raises:
      ValueError: naming each flag whose path is local while the runner is a cluster's.
    """
    if info.local:
        return
    local = [f"{flag} {path}" for flag, path in paths if path and not is_url(path)]
    if local:
        raise ValueError(
            f"{info.name} runs the workers elsewhere: give object-storage URLs (gs://, s3://) "
            f"instead of local paths: {', '.join(local)}"
        )


class PipelineError(RuntimeError):
    """The pipeline itself failed (not a scan: those are dead letters); the message is short."""


def _short(err: BaseException, limit: int = 600) -> str:
    # Runner errors carry whole worker tracebacks; the last lines say what failed where.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " | ".join(lines[-3:]) or type(err).__name__
    return text if len(text) <= limit else "..." + text[-limit:]


def run_pipeline(pipeline):
    """Runs `pipeline` to its end; returns the PipelineResult.

    Raises:
      PipelineError: the pipeline failed or ended in a state other than DONE.
    """
    from apache_beam.runners.runner import PipelineState

    try:
        result = pipeline.run()
        state = result.wait_until_finish()
    except Exception as err:  # noqa: BLE001 - whatever the runner raises, say it in one line
        raise PipelineError(f"the pipeline failed: {type(err).__name__}: {_short(err)}") from err
    if state is not None and str(state) != PipelineState.DONE:
        raise PipelineError(f"the pipeline ended in state {state}")
    return result


# --------------------------------------------------------------------------------------------
# Dead letters
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Failure:
    """One scan that failed: its uid (or label), the stage it failed in, and why."""

    uid: str
    stage: str
    error: str


def error_message(err: BaseException) -> str:
    """One line about `err`: a DataError's own message (it names the file), else
    ``Type: message`` (as :func:`tf_agg3d.data.preprocessing.runner.preprocess_one` words it)."""
    from tf_agg3d.data.errors import DataError

    text = str(err) if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def failures_csv(failures: Iterable[Failure]) -> str:
    """The dead-letter CSV: ``uid,stage,error``, one row per failure, sorted by uid."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FAILURE_COLUMNS)
    for f in sorted(failures, key=lambda f: (f.uid, f.stage, f.error)):
        writer.writerow([f.uid, f.stage, f.error])
    return buf.getvalue()


def write_failures(path: str, failures: Iterable[Failure]) -> None:
    """Writes the dead-letter CSV atomically (a header alone when nothing failed)."""
    atomic_write_text(path, failures_csv(failures))


def write_failures_step(failures: list, path: str) -> str:
    """The pipelines' last step: all the failures (one list) -> the dead-letter CSV; its path."""
    write_failures(path, failures)
    return path


def read_failures(path: str) -> list[Failure]:
    """The rows of a dead-letter CSV ([] when the file does not exist)."""
    if not uio.exists(path):
        return []
    rows = list(csv.reader(io.StringIO(uio.read_text(path))))
    return [Failure(*row) for row in rows[1:] if len(row) == len(FAILURE_COLUMNS)]


def summary_line(
    job: str, counts: dict[str, int], seconds: float, per_item_s: float | None, runner: RunnerInfo
) -> str:
    """The line a run ends with (benchmarks parse it): ``beam JOB summary: k=v ...
    seconds=S [worker_s_per_scan=W] runner=R``."""
    fields = [f"{key}={value}" for key, value in counts.items()] + [f"seconds={seconds:.1f}"]
    if per_item_s is not None:
        fields.append(f"worker_s_per_scan={per_item_s:.3f}")
    fields.append(f"runner={runner.describe()}")
    return f"beam {job} summary: " + " ".join(fields)


def report_failures(report: Callable[[str], None], failed: Sequence[Failure], path: str) -> None:
    """A run's closing lines: each failed item, then the dead-letter CSV (none if none failed)."""
    for f in failed:
        report(f"  failed {f.uid} ({f.stage}): {f.error}")
    if failed:
        report(f"dead letters: {path}")


# --------------------------------------------------------------------------------------------
# Counters and files
# --------------------------------------------------------------------------------------------


def counter(name: str):
    """A Beam counter in this project's namespace."""
    return beam.metrics.Metrics.counter(METRICS_NAMESPACE, name)


def distribution(name: str):
    """A Beam distribution (integers) in this project's namespace."""
    return beam.metrics.Metrics.distribution(METRICS_NAMESPACE, name)


def _value(result):
    # Committed values where the runner has them (exactly-once), else the attempted ones.
    try:
        committed = result.committed
    except Exception:  # noqa: BLE001 - runners that do not commit metrics raise here
        committed = None
    return committed if committed is not None else result.attempted


def metric_totals(result) -> dict[str, object]:
    """This project's counters (name -> int) and distributions (name -> {count, sum, min,
    max}) from a finished pipeline; {} when the runner reports no metrics."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        found = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    except Exception:  # noqa: BLE001 - a runner without a metrics API
        return {}
    totals: dict[str, object] = {}
    for item in found.get("counters", []):
        name = item.key.metric.name
        totals[name] = int(totals.get(name, 0)) + int(_value(item) or 0)
    for item in found.get("distributions", []):
        value = _value(item)
        if value is not None and value.count:
            totals[item.key.metric.name] = {
                "count": int(value.count),
                "sum": int(value.sum),
                "min": int(value.min),
                "max": int(value.max),
            }
    return totals


def say(line: str, stream=None) -> None:
    """Prints one line with a single write, so that workers sharing a terminal do not
    interleave within a line (stdout by default)."""
    import sys

    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def seconds_per_item(metrics: dict, *names: str) -> float | None:
    """Mean worker seconds per item of the millisecond distributions `names` (summed: e.g.
    loading + detecting), per item of the first; None when none was recorded."""
    first = metrics.get(names[0]) if names else None
    if not isinstance(first, dict) or not first.get("count"):
        return None
    total = sum(metrics[n]["sum"] for n in names if isinstance(metrics.get(n), dict))
    return total / 1000.0 / first["count"]


def remove_tree(path: str) -> None:
    """Deletes a folder (local) or every object under a prefix (URL); missing is fine."""
    if is_url(path):
        import tensorflow as tf

        with contextlib.suppress(tf.errors.NotFoundError):
            tf.io.gfile.rmtree(uio.fs_path(path))
    else:
        shutil.rmtree(path, ignore_errors=True)
