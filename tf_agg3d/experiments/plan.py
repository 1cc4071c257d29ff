"""What an experiment runs: LUNA16 folds, the stage recipe of one model, its training steps.

Shared by cross-validation (:mod:`tf_agg3d.experiments.crossval`) and the ablations
(:mod:`tf_agg3d.experiments.ablation`): both train one model directory through the stages of
``train.stages`` -- the ``python -m tf_agg3d.train --phase`` values run in order -- and parse the
same fold and stage grammars.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from tf_agg3d.config import ExperimentConfig

N_FOLDS = 10
STAGES = ("rpn", "joint", "alternating", "abs")
DEFAULT_STAGES = ("rpn", "joint")  # when the config has no train.stages
PHASE2 = ("joint", "alternating")


class ExperimentError(ValueError):
    """A bad request (fold spec, stages, suite) or an inconsistent output folder."""


class CacheExperiment:
    """What every experiment has: an output folder, the preprocessed cache its runs train on
    and predict, the ``--set`` overrides of every run and a line printer (default: print)."""

    def __init__(
        self,
        out_dir: str,
        cache_dir: str,
        overrides: Sequence[str],
        log: Callable[[str], None] | None,
    ):
        self.out_dir = str(out_dir)
        self.cache_dir = str(cache_dir)
        self.overrides = list(overrides)
        self.log = log or (lambda line: print(line, flush=True))


def parse_folds(spec: str | Sequence[int]) -> list[int]:
    """Fold numbers from ``"3"``, ``"0-9"``, ``"0,2,5"`` or ``"0-2,7"`` (sorted, unique).

    Raises:
      ExperimentError: anything else, or a fold outside 0..9.
    """
    if not isinstance(spec, str):
        spec = ",".join(str(k) for k in spec)
    folds: set[int] = set()
    hint = "folds are 0..9, e.g. '3', '0-9', '0,2,5'"
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ExperimentError(f"--folds {spec!r}: cannot read {part.strip()!r} ({hint})")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise ExperimentError(f"--folds {spec!r}: empty range {part.strip()!r} ({hint})")
        if hi >= N_FOLDS:
            raise ExperimentError(f"--folds {spec!r}: fold {hi} does not exist ({hint})")
        folds.update(range(lo, hi + 1))
    return sorted(folds)


def format_folds(folds: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (what :func:`parse_folds` reads back)."""
    parts, folds = [], sorted(folds)
    i = 0
    while i < len(folds):
        j = i
        while j + 1 < len(folds) and folds[j + 1] == folds[j] + 1:
            j += 1
        parts.append(str(folds[i]) if i == j else f"{folds[i]}-{folds[j]}")
        i = j + 1
    return ",".join(parts)


def parse_stages(spec: str | Sequence[str]) -> tuple[str, ...]:
    """The stage list from ``"rpn,joint,abs"`` (or a sequence), checked and made explicit.

    The stages are ``train --phase`` values run in order on one model directory, like
    ``train.stages``: ``rpn,joint,abs,joint`` is the paper's recipe. ``abs`` last is short for
    ``abs`` followed by the phase-2 stage before it (``rpn,joint,abs`` -> ``rpn,joint,abs,joint``).
    Rules: names from :data:`STAGES`; ``rpn`` first when present; one ``abs`` at most, after a
    phase-2 stage (``joint`` or ``alternating``) and followed by at most one phase-2 stage (the
    round after ABS); no other stage twice. The one exception is the RPN-only recipe of
    ``configs/luna16/rpn_only.yaml``, spelled out in full: ``rpn,abs,rpn`` (no FPRN, so ABS
    mines with the phase-1 model and the round after it is a second ``rpn`` round).

    Returns:
      The explicit stage list.

    Raises:
      ExperimentError: naming the problem.
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [str(s).strip() for s in names if str(s).strip()]
    shown = ",".join(names)
    if names == ["rpn", "abs", "rpn"]:
        return tuple(names)
    if not names:
        raise ExperimentError(f"stages {spec!r}: no stage (known: {', '.join(STAGES)})")
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ExperimentError(
            f"stages {shown}: unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})"
        )
    if "rpn" in names[1:]:
        raise ExperimentError(f"stages {shown}: rpn (phase 1) must come first, once")
    if names.count("abs") > 1:
        raise ExperimentError(f"stages {shown}: one abs round at most")
    before, after = names, []
    if "abs" in names:
        i = names.index("abs")
        before, after = names[:i], names[i + 1 :]
        phase2 = [s for s in before if s in PHASE2]
        if not phase2:
            raise ExperimentError(
                f"stages {shown}: abs mines hard negatives with a phase-2 model; put joint or "
                "alternating before it (or spell out the RPN-only recipe rpn,abs,rpn)"
            )
        if not after:
            after = [phase2[-1]]
        if len(after) > 1 or after[0] not in PHASE2:
            raise ExperimentError(
                f"stages {shown}: after abs comes one phase-2 round (joint or alternating)"
            )
    if len(set(before)) != len(before):
        raise ExperimentError(f"stages {shown}: a stage appears twice")
    return tuple(before + (["abs", *after] if "abs" in names else []))


def stages_from_config(config: ExperimentConfig) -> tuple[str, ...]:
    """``train.stages`` of the config when it has that field and it is set, else rpn,joint."""
    stages = getattr(config.train, "stages", None)
    if not stages:
        return DEFAULT_STAGES
    return parse_stages(stages)


@dataclasses.dataclass(frozen=True)
class Step:
    """One training run of a model directory.

    Attributes:
      label: its name in logs and timings (``rpn``, ``joint``, ``abs``, ``joint_abs``).
      phase: the ``train.phase`` it runs.
      checkpoint_dir: its folder under ``checkpoints/`` ("" for the ABS pass).
      before_abs: a run that an ABS pass of the same plan follows. Once the pass has written
        its file the run is over, and must not run again: with the file present the trainer
        would take it for a round after ABS (``<phase>_abs``).
    """

    label: str
    phase: str
    checkpoint_dir: str
    before_abs: bool = False


def plan_steps(stages: Sequence[str]) -> list[Step]:
    """The training runs of `stages` (see :func:`parse_stages`).

    ``rpn,joint,abs,joint`` -> rpn, joint, abs, joint_abs: ``python -m tf_agg3d.train --phase``
    rpn, joint, abs, joint on one model directory (the round after ABS trains into
    ``checkpoints/joint_abs``).
    """
    stages = parse_stages(stages)
    has_abs = "abs" in stages
    steps: list[Step] = []
    seen_abs = False
    for name in stages:
        if name == "abs":
            seen_abs = True
            steps.append(Step("abs", "abs", ""))
        elif seen_abs:
            steps.append(Step(f"{name}_abs", name, f"{name}_abs"))
        else:
            steps.append(Step(name, name, name, before_abs=has_abs))
    return steps
