"""The ablation suites: paper Tables II and III as variants of one base config.

Each variant names only the settings its paper row varies -- the FPRN and its two options
(Diameter Alignment, Local Magnification), the phase-2 training (joint / alternating / none),
the RPN's classification loss, the training crop -- as ``key=value`` overrides applied on top of
the base config (``--base-config``, e.g. ``configs/bench_cpu.yaml``), which sets everything else:
network size, steps, augmentation, inference. The deltas mirror ``configs/luna16/*.yaml``:

==============  ============================================================================
variant         overrides on the base config (``configs/luna16`` file it mirrors)
==============  ============================================================================
rpn_only        FPRN off; no phase 2 (``rpn_only.yaml``: stages rpn[,abs,rpn])
3d_ag           FPRN on, DA on, LM off; phase 2 joint (``3d_ag.yaml``)
3d_ag_lm        FPRN on, DA on, LM on; joint (``3d_ag_lm.yaml``)
no_da           FPRN on, DA off, LM off; joint (``no_da.yaml``)
alternating     FPRN on, DA on, LM off; phase 2 alternating (``alternating.yaml``'s change)
crop96          as 3d_ag with a crop 3/4 of the base's (128 -> 96; ``crop96.yaml``)
rpn_only_steps  as rpn_only, trained as many steps in all as 3d_ag (ours: no paper row)
adaptive_focal  RPN only, ``loss.rpn_classification=adaptive_focal`` (``rpn_only_no_abs.yaml``)
focal           RPN only, ``focal`` (``focal.yaml``)
ohem            RPN only, ``ohem`` (``ohem.yaml``)
==============  ============================================================================

The stage list is derived from the base's ``train.stages`` (:func:`variant_stages`): a variant
keeps the base's Anchor Based Sampling choice and only swaps its phase-2 stage, so each
comparison changes one thing. Where the paper's row also differs in something else (its
alternating and crop-96 rows are crop-96 rows without ABS; Table II is without ABS), the paper
number beside it says which row it is and the matched row of the paper to compare with.
"""

from __future__ import annotations

import dataclasses

from tf_agg3d.config import ExperimentConfig
from tf_agg3d.experiments.plan import PHASE2, ExperimentError, parse_stages, stages_from_config


@dataclasses.dataclass(frozen=True)
class PaperNumber:
    """The paper's FROC of a row (None: not reported), and which row it is."""

    combined: float | None
    rpn: float | None
    fprn: float | None
    row: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of a suite.

    Attributes:
      name: its id (run folders, ``--variants``, the CSV).
      label: its name in the report.
      settings: ``key=value`` overrides fixed by the row.
      phase2: the phase-2 stage (``joint``, ``alternating``), None for an RPN-only model.
      paper: the paper's numbers.
      crop_scale: the training crop relative to the base config's (the crop row).
      matched_steps: train as many steps in all as the suite's joint-trained variants do
        (an RPN-only model has fewer training phases; :func:`matched_steps`).
      optional: run only when ``--variants`` names it (more training than the budget may allow).
    """

    name: str
    label: str
    settings: tuple[str, ...]
    phase2: str | None
    paper: PaperNumber
    crop_scale: float = 1.0
    matched_steps: bool = False
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Suite:
    """A set of variants compared with one of them (the baseline), over `seeds` seeds."""

    name: str
    title: str
    baseline: str
    variants: tuple[Variant, ...]
    seeds: int = 3
    overrides: tuple[str, ...] = ()

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ExperimentError(f"suite {self.name} has no variant {name!r}")


FPRN = ("model.fpr.enabled=true",)
NO_FPRN = ("model.fpr.enabled=false",)

RPN_ONLY = Variant(
    "rpn_only",
    "RPN only",
    NO_FPRN,
    None,
    PaperNumber(0.917, 0.917, None, "Table II f (RPN, anchor1, ABS)", "the RPN 3D-AG improves on"),
)


def _fprn(
    name: str,
    label: str,
    paper: PaperNumber,
    phase2: str = "joint",
    *,
    diameter_alignment: bool = True,
    local_magnification: bool = False,
    **options,
) -> Variant:
    """A row with the FPRN branch: Diameter Alignment on and Local Magnification off unless
    the row changes them."""
    settings = (
        *FPRN,
        f"model.fpr.diameter_alignment={str(diameter_alignment).lower()}",
        f"model.fpr.local_magnification={str(local_magnification).lower()}",
    )
    return Variant(name, label, settings, phase2, paper, **options)


AG = _fprn(
    "3d_ag",
    "3D-AG (DA, joint)",
    PaperNumber(0.939, 0.930, 0.908, "Table III: Crop 128 ABS, DA, Joint"),
)
AG_LM = _fprn(
    "3d_ag_lm",
    "3D-AG-LM (DA, LM, joint)",
    PaperNumber(0.935, 0.928, 0.914, "Table III: Crop 128 ABS, DA, Magnify, Joint"),
    local_magnification=True,
)
NO_DA = _fprn(
    "no_da",
    "without Diameter Alignment",
    PaperNumber(0.926, 0.920, 0.895, "Table III: Crop 128 ABS, Joint"),
    diameter_alignment=False,
)
ALTERNATING = _fprn(
    "alternating",
    "alternating instead of joint",
    PaperNumber(
        0.912, 0.908, 0.894, "Table III: Crop 96, DA, Magnify, Alternating", "joint: 0.919"
    ),
    phase2="alternating",
)
CROP = _fprn(
    "crop96",
    "crop 3/4 (96 vs 128)",
    PaperNumber(0.917, 0.911, 0.889, "Table III: Crop 96, DA, Joint", "crop 128: 0.926"),
    crop_scale=0.75,
    optional=True,
)

# ours: the paper's RPN-only row trains fewer steps than 3D-AG (no phase 2), so "RPN only" vs
# "3D-AG" mixes the FPRN's effect with training length; this row takes the length away.
RPN_ONLY_STEPS = dataclasses.replace(
    RPN_ONLY,
    name="rpn_only_steps",
    label="RPN only, as many steps as 3D-AG",
    matched_steps=True,
    optional=True,
)


def _loss(name: str, label: str, paper: PaperNumber) -> Variant:
    return Variant(name, label, (*NO_FPRN, f"loss.rpn_classification={name}"), None, paper)


SUITES = {
    "table3": Suite(
        "table3",
        "Table III: the FPRN branch",
        "3d_ag",
        (RPN_ONLY, AG, AG_LM, NO_DA, ALTERNATING, CROP, RPN_ONLY_STEPS),
    ),
    "table2": Suite(
        "table2",
        "Table II: the RPN's classification loss (RPN only)",
        "adaptive_focal",
        (
            _loss(
                "adaptive_focal",
                "adaptive focal loss (Eq. 3)",
                PaperNumber(0.910, 0.910, None, "Table II d (anchor1, multi-scale, focal)"),
            ),
            _loss(
                "focal",
                "focal loss (Eqs. 1-2)",
                PaperNumber(None, None, None, "not reported", "'it simply does not work'"),
            ),
            _loss(
                "ohem",
                "OHEM",
                PaperNumber(0.898, 0.898, None, "Table II c (anchor1, multi-scale, OHEM)"),
            ),
        ),
    ),
    "smoke": Suite(
        "smoke",
        "smoke: the command end to end, a few steps",
        "3d_ag",
        (AG, RPN_ONLY),
        seeds=1,
        overrides=("train.stages=[rpn,joint]", "train.max_steps=4"),
    ),
}


def get_suite(name: str) -> Suite:
    """The suite called `name`.

    Raises:
      ExperimentError: an unknown name (listing the known ones).
    """
    if name not in SUITES:
        raise ExperimentError(f"unknown suite {name!r} (known: {', '.join(SUITES)})")
    return SUITES[name]


def variant_stages(base_stages, phase2: str | None) -> tuple[str, ...]:
    """The base's stage list with its phase 2 replaced by `phase2` (None: removed).

    The base's Anchor Based Sampling round is kept: ``rpn,joint,abs,joint`` becomes
    ``rpn,alternating,abs,alternating`` for ``alternating`` and ``rpn,abs,rpn`` for an RPN-only
    model; a base without phase 2 (``rpn``) gets one (``rpn,joint``).
    """
    stages = list(parse_stages(base_stages))
    has_abs = "abs" in stages
    if phase2 is None:
        return ("rpn", "abs", "rpn") if has_abs else ("rpn",)
    if phase2 not in PHASE2:
        raise ExperimentError(f"phase 2 must be one of {', '.join(PHASE2)}, got {phase2!r}")
    out = [phase2 if s in PHASE2 else s for s in stages]
    if phase2 not in out:  # an RPN-only base
        out = ["rpn", phase2, *(["abs", phase2] if has_abs else [])]
    return tuple(out)


def scaled_crop(config: ExperimentConfig, scale: float) -> tuple[int, int, int]:
    """The base's training crop times `scale`, each side a multiple of the coarsest stride."""
    stride = max(int(s) for s in config.model.anchors.strides)
    return tuple(
        max(stride, int(round(int(n) * scale / stride)) * stride) for n in config.data.crop_size
    )


def _training_phases(stages) -> int:
    return sum(s != "abs" for s in stages)


def matched_steps(config: ExperimentConfig, stages) -> str:
    """The override that gives a run of `stages` as many training steps in all as a
    joint-trained variant of `config` gets: ``train.max_steps`` (``train.epochs`` when it is 0;
    both are per phase) times the ratio of their training phases, e.g. 700 -> 1400 for an
    RPN-only run (``rpn``) beside ``rpn,joint``."""
    full = _training_phases(variant_stages(stages_from_config(config), "joint"))
    ratio = full / _training_phases(stages)
    if config.train.max_steps:
        return f"train.max_steps={round(config.train.max_steps * ratio)}"
    return f"train.epochs={round(config.train.epochs * ratio)}"


def variant_overrides(variant: Variant, base: ExperimentConfig) -> list[str]:
    """The ``key=value`` overrides that make the `base` config into `variant`."""
    out = list(variant.settings)
    stages = variant_stages(stages_from_config(base), variant.phase2)
    out.append(f"train.stages=[{','.join(stages)}]")
    if variant.crop_scale != 1.0:
        crop = scaled_crop(base, variant.crop_scale)
        out.append(f"data.crop_size=[{','.join(map(str, crop))}]")
    if variant.matched_steps:
        out.append(matched_steps(base, stages))
    return out
