"""A small trained detector, shared by the tests that compare whole-scan paths and precisions.

Helpers reach tests through fixtures, never ``from conftest import``.
"""

from __future__ import annotations

import os
import types

import pytest
from support import tiny_config, write_cache


@pytest.fixture(scope="session")
def trained_detector(tmp_path_factory):
    """The tiny detector (three levels, FPRN with Local Magnification) trained on toy scans.

    300 RPN steps then 300 joint steps on 32^3 crops of eight 48^3 scans of -700 HU lungs with
    two bright 5-10 mm spheres each (``support.write_cache``): enough for it to find such
    spheres with scores near 1 and to leave a few weaker marks elsewhere, like a real model.
    About a minute on two CPU cores.

    Returns:
      namespace of ``detector`` (pure-TF RoI Align, as exported) and ``config``.
    """
    from tf_agg3d.models.loading import load_detector
    from tf_agg3d.ops.roi_align import roi_align_3d
    from tf_agg3d.training.trainer import train

    root = tmp_path_factory.mktemp("trained")
    cache = write_cache(root / "cache", n_scans=8, shape=(48, 48, 48), seed=1)
    model_dir = os.path.join(str(root), "model")
    common = [
        "train.max_steps=300",
        "train.checkpoint_every_steps=1000",
        "train.log_every_steps=1000",
    ]
    for phase in ("rpn", "joint"):
        train(
            tiny_config(root, cache, [*common, f"train.phase={phase}"]),
            model_dir,
            log=lambda *a: None,
        )
    detector, config = load_detector(model_dir)
    detector.roi_align_fn = roi_align_3d
    return types.SimpleNamespace(detector=detector, config=config)
