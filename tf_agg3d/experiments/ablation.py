"""Ablations: every variant of a suite, for every seed, trained and scored on held-out scans.

A suite (:mod:`tf_agg3d.experiments.ablation_suites`: ``table3``, ``table2``, ``smoke``) is a set
of variants of one base config; each variant x seed is one run: the variant's stages trained on
the cache scans of the training subsets (``--train-subsets``), the held-out subsets' scans
(``--test-subsets``) predicted, and the combined, RPN-branch and FPRN-branch FROC scored.

Layout of the output folder ``OUT``::

  OUT/split/train_seriesuids.csv   the training scans (``data.train_seriesuids`` of every run)
  OUT/split/test_seriesuids.csv    the held-out scans (the FROC's FP-per-scan divisor)
  OUT/runs/<suite>/<variant>/seed<s>/   one run's model directory (config.yaml, checkpoints/),
      timings.json, predictions.csv, scores.json (the branch FROCs), DONE.json (written last)
  OUT/ablation.csv, ablation.md, ablation.png   the report (tf_agg3d.experiments.ablation_report)

A run's config is, later wins: the base config, the suite's overrides (``smoke``: a few steps),
``--set``, the variant's overrides, then the run's own: the cache, the training list, the
seed (``train.seed`` and ``data.seed``: runs of one variant differ only by it) and the phase.
Two variants whose configs come out identical (``table2``'s adaptive focal loss and
``table3``'s RPN only on an adaptive-focal base) share their runs.

Resuming: a run with DONE.json is skipped; an unfinished one resumes from its checkpoints
(:mod:`tf_agg3d.experiments.model_run`) and predicts and scores again.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence

from tf_agg3d.config import EvalConfig, ExperimentConfig, load_config, to_dict
from tf_agg3d.data.errors import DataError
from tf_agg3d.experiments import annotation_sources, model_run, scoring
from tf_agg3d.experiments.ablation_suites import Suite, Variant, get_suite, variant_overrides
from tf_agg3d.experiments.plan import (
    CacheExperiment,
    ExperimentError,
    format_folds,
    plan_steps,
    stages_from_config,
)
from tf_agg3d.experiments.run_dir import RunDir, now
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_json, atomic_write_text

DONE_FORMAT = "tf_agg3d.ablate.run.v1"
SCORES_NAME = "scores.json"


@dataclasses.dataclass(frozen=True, order=True)
class RunKey:
    """One run: a variant of a suite, trained with one seed."""

    suite: str
    variant: str
    seed: int

    @property
    def name(self) -> str:
        """``suite/variant/seed`` (what ``--runs`` takes)."""
        return f"{self.suite}/{self.variant}/{self.seed}"


def parse_run(spec: str) -> RunKey:
    """``table3/3d_ag/1`` -> RunKey("table3", "3d_ag", 1).

    Raises:
      ExperimentError: another form.
    """
    m = re.fullmatch(r"\s*([\w-]+)/([\w-]+)/(\d+)\s*", spec)
    if not m:
        raise ExperimentError(f"--runs {spec!r}: expected suite/variant/seed, e.g. table3/3d_ag/0")
    return RunKey(m.group(1), m.group(2), int(m.group(3)))


@dataclasses.dataclass(frozen=True)
class PlannedVariant:
    """A variant of a suite with its overrides resolved against the base config.

    Attributes:
      suite, variant: the suite and its variant.
      overrides: every override of its runs but the run's own (suite, --set, variant).
      runs_of: the (suite, variant) whose runs it uses: itself, or an earlier variant with
        identical overrides.
      seeds: the seeds it is run with.
    """

    suite: Suite
    variant: Variant
    overrides: tuple[str, ...]
    runs_of: tuple[str, str]
    seeds: tuple[int, ...]

    def run_keys(self) -> list[RunKey]:
        return [RunKey(*self.runs_of, s) for s in self.seeds]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class Ablation(CacheExperiment):
    """An ablation experiment: suites, a cache, a base config and an output folder.

    Args:
      out_dir: the output folder (see the module docstring); local or a URL.
      cache_dir: the preprocessed cache; each sidecar's ``subset`` puts it in the training or
        the held-out split.
      suites: suite names (``table3``, ``table2``, ``smoke``).
      base_config: the base YAML (None: the defaults).
      seeds: seeds per variant (0: each suite's default).
      overrides: ``--set`` overrides for every run.
      train_subsets: subsets to train on (empty: every subset not held out).
      test_subsets: the held-out subsets.
      variants: restrict to these variant names (an optional variant runs only when named).
      log: line printer.

    Raises:
      ConfigError, ExperimentError: a bad config, suite or variant.
    """

    def __init__(
        self,
        out_dir: str,
        cache_dir: str,
        suites: Sequence[str],
        base_config: str | None = None,
        seeds: int = 0,
        overrides: Sequence[str] = (),
        train_subsets: Sequence[int] = (),
        test_subsets: Sequence[int] = (0, 1),
        variants: Sequence[str] = (),
        log: Callable[[str], None] | None = None,
    ):
        super().__init__(out_dir, cache_dir, overrides, log)
        self.base_config = base_config or None
        self.test_subsets = sorted({int(k) for k in test_subsets})
        self.train_subsets = sorted({int(k) for k in train_subsets})
        if not self.test_subsets:
            raise ExperimentError("no held-out subset (--test-subsets)")
        both = set(self.train_subsets) & set(self.test_subsets)
        if both:
            raise ExperimentError(
                f"subset(s) {format_folds(sorted(both))} both trained on and held out"
            )
        if seeds < 0:
            raise ExperimentError(f"--seeds must be >= 0, got {seeds}")
        names = list(dict.fromkeys(suites))
        if not names:
            raise ExperimentError("no suite (--suite table3, table2 or smoke)")
        self.suites = [get_suite(n) for n in names]
        self.planned = self._plan(seeds, set(variants))
        self.eval_config: EvalConfig = load_config(self.base_config, self.overrides).evaluation
        self._split: dict[str, list[str]] | None = None
        self._annotations: dict[tuple[str, str], dict] = {}

    def _plan(self, seeds: int, wanted: set[str]) -> list[PlannedVariant]:
        known = {v.name for s in self.suites for v in s.variants}
        unknown = sorted(wanted - known)
        if unknown:
            raise ExperimentError(
                f"--variants: unknown variant(s) {', '.join(unknown)} of suite(s) "
                f"{', '.join(s.name for s in self.suites)} (known: {', '.join(sorted(known))})"
            )
        planned: list[PlannedVariant] = []
        seen: dict[str, tuple[str, str]] = {}
        for suite in self.suites:
            base = load_config(self.base_config, [*suite.overrides, *self.overrides])
            for variant in suite.variants:
                named = variant.name in wanted
                if (wanted and not named) or (variant.optional and not named):
                    continue
                overrides = (*suite.overrides, *self.overrides, *variant_overrides(variant, base))
                # Identical configs share their runs (a ConfigError names a bad key).
                config = load_config(self.base_config, list(overrides))
                same = json.dumps(to_dict(config), sort_keys=True, default=str)
                runs_of = seen.setdefault(same, (suite.name, variant.name))
                n = seeds or suite.seeds
                planned.append(PlannedVariant(suite, variant, overrides, runs_of, tuple(range(n))))
        if wanted and not any(p.variant.name == p.suite.baseline for p in planned):
            self.log("note: --variants leaves out the baseline; no differences will be reported")
        return planned

    # ---- runs ----------------------------------------------------------------------------------

    def keys(self) -> list[RunKey]:
        """Every run of the plan, each once (shared runs too)."""
        return sorted({k for p in self.planned for k in p.run_keys()})

    def planned_for(self, key: RunKey) -> PlannedVariant:
        for p in self.planned:
            if p.runs_of == (key.suite, key.variant) and key.seed in p.seeds:
                return p
        raise ExperimentError(f"run {key.name} is not part of this ablation")

    def run_dir(self, key: RunKey) -> RunDir:
        return RunDir(uio.join(self.out_dir, "runs", key.suite, key.variant, f"seed{key.seed}"))

    def is_done(self, key: RunKey) -> bool:
        return self.run_dir(key).is_done()

    def config(self, key: RunKey, phase: str | None = None) -> ExperimentConfig:
        """The config of one run (and phase).

        Raises:
          ConfigError: naming the key.
        """
        planned = self.planned_for(key)
        extra = [
            *planned.overrides,
            f"data.cache_dir={self.cache_dir!r}",
            "data.fold=-1",
            f"data.train_seriesuids={self.split_file('train')!r}",
            f"train.seed={key.seed}",
            f"data.seed={key.seed}",
        ]
        if phase is not None:
            extra.append(f"train.phase={phase}")
        return load_config(self.base_config, extra)

    # ---- the split -----------------------------------------------------------------------------

    def split_file(self, name: str) -> str:
        return uio.join(self.out_dir, "split", f"{name}_seriesuids.csv")

    def split(self) -> dict[str, list[str]]:
        """``{"train": uids, "test": uids}`` from the cache's subsets (sorted).

        Raises:
          DataError: an unreadable cache, or no scan on one side.
        """
        if self._split is None:
            from tf_agg3d.dataloaders.input_pipeline import load_scans

            split: dict[str, list[str]] = {"train": [], "test": []}
            for scan in load_scans(self.cache_dir):
                if scan.subset in self.test_subsets:
                    split["test"].append(scan.uid)
                elif scan.subset >= 0 and (
                    not self.train_subsets or scan.subset in self.train_subsets
                ):
                    split["train"].append(scan.uid)
            for side, subsets in (("test", self.test_subsets), ("train", self.train_subsets)):
                if not split[side]:
                    raise DataError(
                        self.cache_dir,
                        f"no {side} scan: the cache has none of subset(s) "
                        f"{format_folds(subsets) if subsets else 'other than the held-out ones'}",
                    )
            self._split = {side: sorted(uids) for side, uids in split.items()}
        return self._split

    def write_split(self) -> None:
        """Writes the split's lists; refuses an output folder made with another split.

        Raises:
          ExperimentError: ``OUT/split/test_seriesuids.csv`` lists other scans (a new cache or
            other subsets: finished runs would be scored on other scans).
        """
        split = self.split()
        for side in ("train", "test"):
            path = self.split_file(side)
            text = "".join(f"{u}\n" for u in split[side])
            if uio.exists(path):
                if uio.read_text(path) != text:
                    raise ExperimentError(
                        f"{path} lists other scans than the cache's subsets give now (another "
                        "cache or other --train-subsets/--test-subsets?): use a new --out"
                    )
                continue
            atomic_write_text(path, text)

    def validate(self) -> None:
        """Checks every run's and stage's config before any work (ConfigError names the key)."""
        from tf_agg3d.training.checks import validate_training_config

        for key in self.keys():
            config = self.config(key)
            for step in plan_steps(stages_from_config(config)):
                validate_training_config(self.config(key, step.phase))

    def annotation_files(self, annotations: str = "", excluded: str = "") -> dict:
        """The held-out scans' annotation files (see
        :func:`tf_agg3d.experiments.annotation_sources.annotation_files`)."""
        given = (annotations, excluded)
        if given not in self._annotations:
            self._annotations[given] = annotation_sources.annotation_files(
                self.cache_dir, self.split()["test"], self.out_dir, annotations, excluded, self.log
            )
        return self._annotations[given]

    # ---- one run -------------------------------------------------------------------------------

    def run(self, key: RunKey, strategy=None, annotations: str = "", excluded: str = "") -> dict:
        """Trains run `key`, predicts the held-out scans, scores them, writes DONE.json last.

        A run with DONE.json is skipped (its record is returned).

        Raises:
          ExperimentError: a run not in the plan. RunFailed: a scan could not be predicted.
          The trainer's errors (TrainingInterrupted, NonFiniteLossError, ...) pass on.
        """
        from tf_agg3d.evaluation.report import EvalInputs

        run_dir = self.run_dir(key)
        if run_dir.is_done():
            self.log(f"{key.name}: already done ({run_dir.done_path}); skipped")
            return run_dir.read_done()
        self.write_split()
        config = self.config(key)
        steps = plan_steps(stages_from_config(config))
        configs = [self.config(key, step.phase) for step in steps]
        uids = self.split()["test"]
        self.log(
            f"=== {key.name}: train on {len(self.split()['train'])} scan(s), hold out "
            f"{len(uids)}; stages {' -> '.join(s.label for s in steps)}; model {run_dir.path}"
        )
        done = model_run.train_and_predict(
            run_dir, steps, configs, self.cache_dir, uids, strategy, self.log, key.name
        )
        files = self.annotation_files(annotations, excluded)
        inputs = EvalInputs(
            annotations=files["annotations"],
            predictions=run_dir.predictions,
            excluded=files["excluded"],
            seriesuids=self.split_file("test"),
            label=key.name,
        )
        branches, note = scoring.branch_scores(inputs, self.eval_config)
        if branches is None:
            raise DataError(run_dir.predictions, note)
        scores = {name: block["froc_score"] for name, block in branches.items()}
        atomic_write_json(run_dir.file(SCORES_NAME), {"branches": branches, "annotations": files})
        record = {
            "format": DONE_FORMAT,
            "run": key.name,
            "seriesuids": list(uids),
            "scores": scores,
            "fprn": bool(config.model.fpr.enabled),
            "steps": [s.label for s in steps],
            "overrides": list(self.planned_for(key).overrides),
            "base_config": self.base_config,
            "cache": self.cache_dir,
            "finished": now(),
        } | {k: done[k] for k in ("checkpoint", "findings", "timings")}
        record |= {k: done[k] for k in ("train_seconds", "predict_seconds")}
        run_dir.write_done(record)
        self.log(
            f"{key.name}: done: FROC {_cell(scores['combined'])} (RPN {_cell(scores['rpn'])}, "
            f"FPRN {_cell(scores['fprn'])}); train {done['train_seconds']:.1f} s"
        )
        return record
