"""Checks of a whole config that no single section can make: the training recipe, and settings
two sections hold that must agree."""

from __future__ import annotations

from tf_agg3d.config.errors import ConfigError
from tf_agg3d.config.schema import ExperimentConfig

# Phases a recipe (train.stages) may name; `train --phase` takes the same names.
STAGES = ("rpn", "joint", "alternating", "abs")


def check_stages(stages: tuple[str, ...]) -> None:
    """Refuses a recipe that cannot run: empty, an unknown phase, or ``abs`` first (Anchor
    Based Sampling mines the hard negatives of a trained model).

    Raises:
      ConfigError: naming ``train.stages``.
    """
    if not stages:
        raise ConfigError("train.stages: empty (the recipe needs at least one phase)")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"train.stages: unknown phase(s) {unknown} (known: {', '.join(STAGES)})")
    if stages[0] == "abs":
        raise ConfigError("train.stages: 'abs' cannot come first (it needs a trained model)")


# Settings two sections hold that must agree: (key, key, getter of each, why).
_MUST_AGREE = (
    (
        "preprocess.hu_window",
        "model.backbone.hu_window",
        lambda c: tuple(c.preprocess.hu_window),
        lambda c: tuple(c.model.backbone.hu_window),
        "the model normalises the window its cache was clipped to",
    ),
)


def check_consistency(config: ExperimentConfig) -> None:
    """Refuses a config whose paired settings disagree.

    ``preprocess.hu_window`` (the HU the cache is clipped to) and ``model.backbone.hu_window``
    (the HU the network maps to [0, 1]) describe one window: a model whose window differs from
    its cache's sees a range no voxel has, or never sees part of it.

    Raises:
      ConfigError: naming both keys and their values.
    """
    for key_a, key_b, get_a, get_b, why in _MUST_AGREE:
        a, b = get_a(config), get_b(config)
        if a != b:
            raise ConfigError(
                f"{key_a} {list(a)} and {key_b} {list(b)} must be equal ({why}): set both"
            )
