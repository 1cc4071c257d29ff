"""The ablation report: ``ablation.csv``, ``ablation.md`` and ``ablation.png`` of finished runs.

Per variant: the FROC of each seed and their mean, std, min and max; the RPN-branch and
FPRN-branch FROC (seed means; FPRN "-" for a model without FPRN); the difference from the
suite's baseline with a paired bootstrap 95% CI over the held-out scans
(:mod:`tf_agg3d.experiments.paired_bootstrap`); and the paper's number of the row. Runs not done
yet are left out (the report says how many seeds each variant has), so a report can be written
mid-experiment.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np

from tf_agg3d.experiments.ablation import Ablation, PlannedVariant
from tf_agg3d.experiments.paired_bootstrap import PairedDifference, paired_difference
from tf_agg3d.experiments.scoring import scan_match
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_bytes, atomic_write_text

CSV_NAME = "ablation.csv"
MARKDOWN_NAME = "ablation.md"
PLOT_NAME = "ablation.png"
COLUMNS = (
    "suite",
    "variant",
    "seed",
    "runs",
    "froc",
    "froc_std",
    "froc_min",
    "froc_max",
    "rpn_froc",
    "fprn_froc",
    "diff_vs_baseline",
    "diff_ci_lower",
    "diff_ci_upper",
    "paper_froc",
    "paper_rpn",
    "paper_fprn",
    "paper_row",
    "train_seconds",
    "predict_seconds",
)


@dataclasses.dataclass
class VariantResult:
    """The finished runs of one variant.

    Attributes:
      planned: the variant as planned.
      records: seed -> the run's DONE.json (finished runs only).
      matches: seed -> the combined score's match over the held-out scans.
      difference: variant minus the suite's baseline (None for the baseline, or without runs).
    """

    planned: PlannedVariant
    records: dict[int, dict]
    matches: dict[int, object]
    difference: PairedDifference | None = None

    def scores(self, branch: str) -> list[float]:
        values = [r["scores"][branch] for r in self.records.values()]
        return [float(v) for v in values if v is not None]

    def mean(self, branch: str) -> float | None:
        if branch == "fprn" and not all(r.get("fprn") for r in self.records.values()):
            return None  # no FPRN: the fpr_score column repeats the RPN's
        values = self.scores(branch)
        return float(np.mean(values)) if values else None

    def seconds(self, key: str) -> float | None:
        values = [float(r.get(key) or 0.0) for r in self.records.values()]
        return round(float(np.sum(values)), 1) if values else None


def collect(
    ablation: Ablation, annotations: str = "", excluded: str = "", seed: int = 0
) -> list[tuple[str, list[VariantResult]]]:
    """Reads the finished runs and computes each variant's paired difference from its baseline.

    Returns:
      ``[(suite name, [VariantResult in the suite's order])]``.
    """
    from tf_agg3d.evaluation.io import read_annotations, read_predictions

    files = ablation.annotation_files(annotations, excluded)
    gt = read_annotations(files["annotations"])
    gt_excluded = read_annotations(files["excluded"], excluded=True) if files["excluded"] else None
    uids = ablation.split()["test"]
    config = ablation.eval_config
    out: dict[str, list[VariantResult]] = {}
    for planned in ablation.planned:
        records, matches = {}, {}
        for key in planned.run_keys():
            run = ablation.run_dir(key)
            if not run.is_done():
                continue
            records[key.seed] = run.read_done()
            predictions = read_predictions(run.predictions)
            matches[key.seed] = scan_match(gt, gt_excluded, predictions, uids, config)
        out.setdefault(planned.suite.name, []).append(VariantResult(planned, records, matches))
    for results in out.values():
        baseline = [r for r in results if r.planned.variant.name == r.planned.suite.baseline]
        if not baseline or not baseline[0].matches:
            continue
        for result in results:
            if result is not baseline[0] and result.matches:
                result.difference = paired_difference(
                    list(result.matches.values()),
                    list(baseline[0].matches.values()),
                    config.fp_rates,
                    n=max(config.bootstrap, 1),
                    seed=seed,
                )
    return list(out.items())


def _num(value, digits: int = 4) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else str(round(float(value), digits))


def csv_rows(results: Sequence[tuple[str, list[VariantResult]]]) -> list[dict]:
    """One row per variant x finished seed, then one aggregate row (seed ``all``) per variant."""
    rows = []
    for suite, variants in results:
        base = next(
            (r for r in variants if r.planned.variant.name == r.planned.suite.baseline), None
        )
        for result in variants:
            v = result.planned.variant
            paper = {
                "paper_froc": v.paper.combined,
                "paper_rpn": v.paper.rpn,
                "paper_fprn": v.paper.fprn,
                "paper_row": v.paper.row,
            }
            for seed, record in sorted(result.records.items()):
                s = record["scores"]
                other = None if base in (None, result) else base.records.get(seed)
                diff = None
                if (
                    other is not None
                    and s["combined"] is not None
                    and other["scores"]["combined"] is not None
                ):
                    diff = s["combined"] - other["scores"]["combined"]
                rows.append(
                    {
                        "suite": suite,
                        "variant": v.name,
                        "seed": seed,
                        "runs": 1,
                        "froc": s["combined"],
                        "rpn_froc": s["rpn"],
                        "fprn_froc": s["fprn"] if record.get("fprn") else None,
                        "diff_vs_baseline": diff,
                        "train_seconds": record.get("train_seconds"),
                        "predict_seconds": record.get("predict_seconds"),
                    }
                    | paper
                )
            combined = result.scores("combined")
            d = result.difference
            rows.append(
                {
                    "suite": suite,
                    "variant": v.name,
                    "seed": "all",
                    "runs": len(result.records),
                    "froc": result.mean("combined"),
                    "froc_std": float(np.std(combined)) if combined else None,
                    "froc_min": min(combined) if combined else None,
                    "froc_max": max(combined) if combined else None,
                    "rpn_froc": result.mean("rpn"),
                    "fprn_froc": result.mean("fprn"),
                    "diff_vs_baseline": None if d is None else d.difference,
                    "diff_ci_lower": None if d is None else d.ci_lower,
                    "diff_ci_upper": None if d is None else d.ci_upper,
                    "train_seconds": result.seconds("train_seconds"),
                    "predict_seconds": result.seconds("predict_seconds"),
                }
                | paper
            )
    return rows


def csv_text(rows: Sequence[dict]) -> str:
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(
            [row.get(c) if isinstance(row.get(c), str) else _num(row.get(c)) for c in COLUMNS]
        )
    return buf.getvalue()


def _f(value, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def markdown(
    ablation: Ablation, results: Sequence[tuple[str, list[VariantResult]]], command: str = ""
) -> str:
    """The report as Markdown: one table per suite, and how the numbers were computed."""
    split = ablation.split()
    config = ablation.eval_config
    lines = ["# Ablation", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [
        f"Base config `{ablation.base_config or '(defaults)'}`; cache `{ablation.cache_dir}`: "
        f"{len(split['train'])} training scans, {len(split['test'])} held-out scans (subsets "
        f"{', '.join(map(str, ablation.test_subsets))}). FROC: mean sensitivity at "
        f"{', '.join(f'{r:g}' for r in config.fp_rates)} FPs per scan on the held-out scans.",
        "",
    ]
    for suite_name, variants in results:
        suite = variants[0].planned.suite
        lines += [f"## {suite.title} (`{suite_name}`, baseline `{suite.baseline}`)", ""]
        lines += [
            "| variant | FROC mean ± std [min, max] | Δ vs baseline [95% CI] | RPN FROC | "
            "FPRN FROC | seeds | paper FROC (RPN / FPRN) | paper row |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in variants:
            v, combined = r.planned.variant, r.scores("combined")
            spread = (
                f"{np.mean(combined):.3f} ± {np.std(combined):.3f} "
                f"[{min(combined):.3f}, {max(combined):.3f}]"
                if combined
                else "-"
            )
            d = r.difference
            diff = (
                "(baseline)"
                if v.name == suite.baseline
                else "-"
                if d is None
                else f"{_f(d.difference, True)} [{_f(d.ci_lower, True)}, {_f(d.ci_upper, True)}]"
            )
            shared = (
                ""
                if r.planned.runs_of == (suite_name, v.name)
                else f" (= {'/'.join(r.planned.runs_of)})"
            )
            paper = f"{_f(v.paper.combined)} ({_f(v.paper.rpn)} / {_f(v.paper.fprn)})"
            note = f"; {v.paper.note}" if v.paper.note else ""
            lines.append(
                f"| {v.label}{shared} | {spread} | {diff} | {_f(r.mean('rpn'))} | "
                f"{_f(r.mean('fprn'))} | {len(r.records)}/{len(r.planned.seeds)} | {paper} | "
                f"{v.paper.row}{note} |"
            )
        lines.append("")
    lines += [
        "How to read it: FROC mean ± std [min, max] is over the seeds (training noise). "
        "Δ is the seed-mean FROC minus the baseline's; its 95% CI is a paired bootstrap over "
        f"the held-out scans ({config.bootstrap} resamples; one resample of scans serves every "
        "run of both variants; in each resample the FROC of every run is recomputed, averaged "
        "over each variant's seeds, and differenced). The CI covers which scans were held out, "
        "not seed noise: read it together with the spread. RPN / FPRN FROC score the same "
        "findings by the RPN's and the FPRN's probability alone (FPRN '-': no FPRN). The "
        "paper's numbers are LUNA16 10-fold cross-validation (Tables II and III); they are "
        "there for the ordering, not to be matched on synthetic data.",
        "",
    ]
    return "\n".join(lines)


def plot_png(results: Sequence[tuple[str, list[VariantResult]]]) -> bytes:
    """Per suite: each variant's seed FROCs (dots), their mean with min-max bars, and the
    paper's number (x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(results), figsize=(4.5 * len(results), 4.2), squeeze=False, sharey=True
    )
    for ax, (suite, variants) in zip(axes[0], results, strict=True):
        for i, r in enumerate(variants):
            values = r.scores("combined")
            if values:
                mean = float(np.mean(values))
                ax.errorbar(
                    [i],
                    [mean],
                    yerr=[[mean - min(values)], [max(values) - mean]],
                    fmt="o",
                    color="C0",
                    capsize=4,
                    label="mean, min-max over seeds" if i == 0 else None,
                )
                ax.scatter([i] * len(values), values, s=10, color="C0", alpha=0.4)
            if r.planned.variant.paper.combined is not None:
                ax.scatter(
                    [i],
                    [r.planned.variant.paper.combined],
                    marker="x",
                    color="C3",
                    label="paper" if i == 0 else None,
                )
        ax.set_xlim(-0.5, len(variants) - 0.5)
        ax.set_xticks(range(len(variants)))
        ax.set_xticklabels([r.planned.variant.name for r in variants], rotation=30, ha="right")
        ax.set_title(suite)
        ax.set_ylim(0.0, 1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("held-out FROC")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(
    ablation: Ablation, annotations: str = "", excluded: str = "", command: str = ""
) -> dict:
    """Writes ``OUT/ablation.csv``, ``ablation.md`` and ``ablation.png``; returns their paths
    and the aggregate rows."""
    results = collect(ablation, annotations, excluded)
    rows = csv_rows(results)
    paths = {
        name: uio.join(ablation.out_dir, name) for name in (CSV_NAME, MARKDOWN_NAME, PLOT_NAME)
    }
    atomic_write_text(paths[CSV_NAME], csv_text(rows))
    atomic_write_text(paths[MARKDOWN_NAME], markdown(ablation, results, command))
    atomic_write_bytes(paths[PLOT_NAME], plot_png(results))
    return {"files": paths, "variants": [r for r in rows if r["seed"] == "all"]}
