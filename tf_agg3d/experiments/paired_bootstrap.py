"""The FROC difference of two detectors on the same scans, with a paired bootstrap CI over scans.

Each detector is given as one :class:`tf_agg3d.evaluation.froc.MatchResult` per training seed,
every one over the same held-out scans in the same order. The point estimate is the difference
of the seed-mean FROCs (mean over the variant's seeds minus mean over the baseline's). For the
CI, the held-out scans are resampled with replacement B times; ONE draw serves every run of
both detectors (paired: a hard scan drawn twice counts twice for both), and in each replicate
the FROC is recomputed for every run, averaged over each detector's seeds, and differenced.
The interval is the 2.5 / 97.5 percentiles of the B differences.

Seeds are pooled by averaging, not resampled: the CI is the uncertainty that comes from which
scans were held out, for the seed-averaged detector. Seed-to-seed spread (training noise) is
reported beside it (min-max and std of the per-seed FROCs), not folded into the interval.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tf_agg3d.evaluation import froc as froc_lib


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Variant minus baseline: the seed-mean FROC difference and its bootstrap interval."""

    difference: float
    ci_lower: float
    ci_upper: float
    replicates: int
    confidence: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_same_scans(matches: Sequence[froc_lib.MatchResult]) -> int:
    scans = list(matches[0].seriesuids)
    for m in matches[1:]:
        if list(m.seriesuids) != scans:
            raise ValueError("paired runs must be matched over the same scans, in the same order")
    return len(scans)


def seed_mean_froc(matches: Sequence[froc_lib.MatchResult], fp_rates) -> float:
    """The FROC of each run (seed), averaged."""
    return float(np.mean([froc_lib.froc(m, fp_rates).froc_score for m in matches]))


def _replicate_mean(matches, fp_rates, draws: np.ndarray) -> np.ndarray:
    """[B] the seed-mean FROC of each replicate (scans drawn by `draws`)."""
    per_run = [froc_lib.replicate_sensitivities(m, fp_rates, draws).mean(axis=1) for m in matches]
    return np.mean(per_run, axis=0)


def paired_difference(
    variant: Sequence[froc_lib.MatchResult],
    baseline: Sequence[froc_lib.MatchResult],
    fp_rates=froc_lib.FP_RATES,
    n: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    chunk: int = 64,
) -> PairedDifference:
    """The seed-mean FROC of `variant` minus that of `baseline`, with a paired bootstrap CI.

    Args:
      variant, baseline: one match per seed (at least one each), all over the same scans.
      fp_rates: the FP-per-scan points of the FROC.
      n: bootstrap replicates (> 0).
      seed: seed of the scan draws (equal seeds give equal intervals).
      confidence: two-sided level of the interval.
      chunk: replicates per vectorised block.

    Raises:
      ValueError: no run on one side, runs over different scans, or `n` < 1.
    """
    if not variant or not baseline:
        raise ValueError("a paired difference needs at least one run of each detector")
    if n < 1:
        raise ValueError(f"bootstrap replicates must be > 0, got {n}")
    n_scans = _check_same_scans([*variant, *baseline])
    difference = seed_mean_froc(variant, fp_rates) - seed_mean_froc(baseline, fp_rates)
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n, chunk):
        draws = rng.integers(n_scans, size=(min(chunk, n - start), n_scans))
        diffs.append(
            _replicate_mean(variant, fp_rates, draws) - _replicate_mean(baseline, fp_rates, draws)
        )
    diffs = np.concatenate(diffs)
    tail = 100.0 * (1.0 - confidence) / 2.0
    lower, upper = np.nanpercentile(diffs, [tail, 100.0 - tail])
    return PairedDifference(float(difference), float(lower), float(upper), n, confidence)
