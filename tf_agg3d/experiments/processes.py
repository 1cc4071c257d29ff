"""Experiment runs as parallel subprocesses: N at a time, output relayed line by line.

Cross-validation folds and ablation runs each start their own command (``python -m
tf_agg3d.crossval ... --folds k``, ``python -m tf_agg3d.ablate ... --runs v:s``) so that N of them
train at once, optionally one GPU each; :func:`run_parallel` keeps N running, prefixes every
line of a child's output with its name, and passes SIGTERM / SIGINT on to the children.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence

from tf_agg3d.experiments.plan import ExperimentError


def _relay(stream, prefix: str, log: Callable[[str], None]) -> None:
    for line in stream:
        log(prefix + line.rstrip("\n"))


def run_parallel(
    commands: Mapping[Hashable, Sequence[str]],
    parallel: int,
    gpus: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    poll_seconds: float = 0.2,
    name: Callable[[Hashable], str] = "fold {}".format,
) -> dict[Hashable, int]:
    """Runs one command per key, `parallel` at a time; each output line prefixed ``[name]``.

    Args:
      commands: key -> its command line (e.g. fold k -> ``python -m tf_agg3d.crossval ...
        --folds k``).
      parallel: processes at once (>= 1).
      gpus: GPU ids: process slot j gets ``CUDA_VISIBLE_DEVICES=gpus[j % len(gpus)]``; empty
        leaves the variable as it is (on a CPU machine: just `parallel` processes).
      log: line printer.
      env: the environment (default ``os.environ``).
      name: a key's name in the prefix and the progress lines (default ``fold {key}``).

    Returns:
      key -> exit status. SIGTERM / SIGINT are passed on to the running processes (which save a
      checkpoint and stop), then re-raised as KeyboardInterrupt once they have ended.
    """
    if parallel < 1:
        raise ExperimentError(f"--parallel must be >= 1, got {parallel}")
    log = log or (lambda line: print(line, flush=True))
    base_env = dict(os.environ if env is None else env)
    pending = list(commands.items())
    free = list(range(parallel))
    running: dict[int, tuple[Hashable, subprocess.Popen, threading.Thread]] = {}
    results: dict[Hashable, int] = {}
    stop: list[int] = []

    def on_signal(signum, frame):
        del frame
        stop.append(signum)
        for _, proc, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        while pending or running:
            while pending and free and not stop:
                slot = free.pop(0)
                key, command = pending.pop(0)
                proc_env = dict(base_env)
                where = "CPU"
                if gpus:
                    proc_env["CUDA_VISIBLE_DEVICES"] = str(gpus[slot % len(gpus)])
                    where = f"GPU {proc_env['CUDA_VISIBLE_DEVICES']}"
                log(f"[{name(key)}] starting on {where}: {' '.join(command)}")
                proc = subprocess.Popen(
                    list(command),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=proc_env,
                )
                thread = threading.Thread(
                    target=_relay, args=(proc.stdout, f"[{name(key)}] ", log), daemon=True
                )
                thread.start()
                running[slot] = (key, proc, thread)
            if stop and not running:
                break
            time.sleep(poll_seconds)
            for slot, (key, proc, thread) in list(running.items()):
                if proc.poll() is not None:
                    thread.join()
                    results[key] = proc.returncode
                    log(f"[{name(key)}] ended with exit status {proc.returncode}")
                    del running[slot]
                    free.append(slot)
    finally:
        for _, proc, _ in running.values():  # only after an exception of our own
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        raise KeyboardInterrupt(f"stopped by signal {stop[0]}; ended: {results}")
    return results
