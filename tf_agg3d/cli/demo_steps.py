"""What the demos (:mod:`tf_agg3d.demo`, :mod:`tf_agg3d.demo_deeplesion`) share: their steps.

Each step runs a real command-line entry point in a subprocess, as a user would type it. A step
that fails ends the demo (``SystemExit`` with a message: exit status 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import MutableMapping, Sequence


def run_step(step: str, args: list[str]) -> float:
    """Runs ``python -m <args>``; returns its seconds, or exits the demo if it failed."""
    print(f"\n=== {step}: {' '.join(args)}", flush=True)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", *args], check=False)
    if proc.returncode != 0:
        raise SystemExit(f"demo step '{step}' failed with exit status {proc.returncode}")
    return time.time() - start


def train_phases(
    config: str,
    model_dir: str,
    cache: str,
    train_list: str,
    steps: dict[str, int],
    timings: MutableMapping[str, float],
) -> None:
    """Trains phase 1 (RPN), then the joint phase, recording ``train_<phase>`` seconds.

    Args:
      config, model_dir, cache: the ``tf_agg3d.train`` flags of the same names.
      train_list: the training seriesuid list (``data.train_seriesuids``).
      steps: phase ("rpn", "joint") -> max steps (0: the config's).
      timings: receives the seconds of each phase.
    """
    train_common = [
        "tf_agg3d.train",
        "--config",
        config,
        "--model-dir",
        model_dir,
        "--cache",
        cache,
        "--set",
        f"data.train_seriesuids={train_list}",
    ]
    for phase in ("rpn", "joint"):
        extra = ["--max-steps", str(steps[phase])] if steps[phase] else []
        timings[f"train_{phase}"] = run_step(
            f"train {phase}", [*train_common, "--phase", phase, *extra]
        )


def predict_and_evaluate(
    out: str,
    model_dir: str,
    cache: str,
    test_list: str,
    annotations_dir: str,
    timings: MutableMapping[str, float],
    extra_eval_args: Sequence[str] = (),
) -> tuple[dict, str]:
    """Predicts on the test list into OUT/predictions.csv, then evaluates into OUT/evaluation.

    Args:
      out: the demo's folder.
      model_dir, cache: the trained model and the cache.
      test_list: the held-out seriesuid list.
      annotations_dir: folder with annotations.csv and annotations_excluded.csv.
      timings: receives the seconds of ``predict`` and ``evaluate``.
      extra_eval_args: more ``tf_agg3d.evaluate`` flags.

    Returns:
      (the evaluation's summary.json as a dict, the evaluation folder).
    """
    predictions = os.path.join(out, "predictions.csv")
    timings["predict"] = run_step(
        "predict",
        [
            "tf_agg3d.predict",
            "--model-dir",
            model_dir,
            "--cache",
            cache,
            "--seriesuids",
            test_list,
            "--out",
            predictions,
        ],
    )
    eval_dir = os.path.join(out, "evaluation")
    timings["evaluate"] = run_step(
        "evaluate",
        [
            "tf_agg3d.evaluate",
            "--annotations",
            os.path.join(annotations_dir, "annotations.csv"),
            "--excluded",
            os.path.join(annotations_dir, "annotations_excluded.csv"),
            "--predictions",
            predictions,
            "--seriesuids",
            test_list,
            "--out",
            eval_dir,
            "--cache",
            cache,
            *extra_eval_args,
        ],
    )
    with open(os.path.join(eval_dir, "summary.json")) as f:
        return json.load(f), eval_dir
