"""What the demos (:mod:`tf_agg3d.demo`, :mod:`tf_agg3d.demo_deeplesion`) share: their folders
and their steps.

Each step runs a real command-line entry point in a subprocess, as a user would type it. A step
that fails ends the demo (``SystemExit`` with a message: exit status 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence


def evaluate_args(
    annotations_dir: str, predictions: str, seriesuids: str, out: str, *extra: str
) -> list[str]:
    """``tf_agg3d.evaluate`` and its arguments: the FROC of `predictions` on the scans of
    `seriesuids` against a LUNA16 folder's annotations.csv and annotations_excluded.csv."""
    return [
        "tf_agg3d.evaluate",
        "--annotations",
        os.path.join(annotations_dir, "annotations.csv"),
        "--excluded",
        os.path.join(annotations_dir, "annotations_excluded.csv"),
        "--predictions",
        predictions,
        "--seriesuids",
        seriesuids,
        "--out",
        out,
        *extra,
    ]


def run_step(step: str, args: list[str]) -> float:
    """Runs ``python -m <args>``; returns its seconds, or exits the demo if it failed."""
    print(f"\n=== {step}: {' '.join(args)}", flush=True)
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", *args], check=False)
    if proc.returncode != 0:
        raise SystemExit(f"demo step '{step}' failed with exit status {proc.returncode}")
    return time.time() - start


class Demo:
    """One demo run: its folders and the seconds each step took.

    Attributes:
      out: the demo's folder.
      raw: OUT/<raw_name>, the generated dataset.
      cache: OUT/cache, the preprocessed cache.
      model_dir: OUT/model, the trained model.
      timings: step name -> seconds, filled in as the steps run.
    """

    def __init__(self, out: str, raw_name: str):
        self.out = out
        self.raw, self.cache, self.model_dir = (
            os.path.join(out, p) for p in (raw_name, "cache", "model")
        )
        self.timings: dict[str, float] = {}

    def step(self, name: str, args: list[str]) -> None:
        """:func:`run_step`, recording its seconds under `name`."""
        self.timings[name] = run_step(name, args)

    def generate(
        self, module: str, unit: str, count: int, seed: int, extra_args: Sequence[str] = ()
    ) -> None:
        """Runs a synthetic generator into OUT/<raw_name> (step ``generate``).

        Args:
          module: the generator's module (``tf_agg3d.data.synthetic``,
            ``tf_agg3d.data.synthetic_deeplesion``).
          unit: what its ``--n-<unit>`` flag counts ("scans", "series").
          count, seed: its ``--n-<unit>`` and ``--seed``.
          extra_args: more flags of the generator.
        """
        self.step(
            "generate",
            [
                module,
                "--out",
                self.raw,
                f"--n-{unit}",
                str(count),
                "--seed",
                str(seed),
                *extra_args,
            ],
        )

    def train_phases(self, config: str, train_list: str, steps: dict[str, int]) -> None:
        """Trains phase 1 (RPN), then the joint phase (timings ``train_<phase>``).

        Args:
          config: the ``tf_agg3d.train`` ``--config``.
          train_list: the training seriesuid list (``data.train_seriesuids``).
          steps: phase ("rpn", "joint") -> max steps (0: the config's).
        """
        train_common = [
            "tf_agg3d.train",
            "--config",
            config,
            "--model-dir",
            self.model_dir,
            "--cache",
            self.cache,
            "--set",
            f"data.train_seriesuids={train_list}",
        ]
        for phase in ("rpn", "joint"):
            extra = ["--max-steps", str(steps[phase])] if steps[phase] else []
            args = [*train_common, "--phase", phase, *extra]
            self.timings[f"train_{phase}"] = run_step(f"train {phase}", args)

    def predict_and_evaluate(
        self, test_list: str, annotations_dir: str, extra_eval_args: Sequence[str] = ()
    ) -> tuple[dict, str]:
        """Predicts on the test list into OUT/predictions.csv, then evaluates into
        OUT/evaluation (steps ``predict`` and ``evaluate``).

        Args:
          test_list: the held-out seriesuid list.
          annotations_dir: folder with annotations.csv and annotations_excluded.csv.
          extra_eval_args: more ``tf_agg3d.evaluate`` flags.

        Returns:
          (the evaluation's summary.json as a dict, the evaluation folder).
        """
        predictions = os.path.join(self.out, "predictions.csv")
        self.step(
            "predict",
            [
                "tf_agg3d.predict",
                "--model-dir",
                self.model_dir,
                "--cache",
                self.cache,
                "--seriesuids",
                test_list,
                "--out",
                predictions,
            ],
        )
        eval_dir = os.path.join(self.out, "evaluation")
        self.step(
            "evaluate",
            evaluate_args(
                annotations_dir,
                predictions,
                test_list,
                eval_dir,
                "--cache",
                self.cache,
                *extra_eval_args,
            ),
        )
        with open(os.path.join(eval_dir, "summary.json")) as f:
            return json.load(f), eval_dir

    def seconds(self) -> dict[str, float]:
        """Each step's seconds, rounded to 0.1 s (for the final summary)."""
        return {k: round(v, 1) for k, v in self.timings.items()}
