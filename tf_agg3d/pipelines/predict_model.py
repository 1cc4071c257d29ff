"""The model of a Beam prediction run: an export found, or a training run exported first.

``--export`` names a SavedModel version folder or its model base (:func:`resolve_export`),
whose own config (:func:`export_config`) gives the preprocessing; ``--model-dir`` exports a
training run with the run's settings (:func:`export_model_dir`, the export library of
:mod:`tf_agg3d.serving.publishing`) to a folder every worker can read
(:func:`temporary_export_base` when none is given).
"""

from __future__ import annotations

import os
import tempfile
import uuid

from tf_agg3d.config import ExperimentConfig
from tf_agg3d.pipelines.common import RunnerInfo
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.filesystems import is_url

# The pipeline's own exports accept larger volumes than a served model (contract.py's 512^3
# bounds gRPC requests, not a batch job); `predict` itself has no limit.
EXPORT_MAX_VOLUME_SHAPE = (1024, 1024, 1024)


def resolve_export(export: str) -> str:
    """The SavedModel version folder of ``--export``: the folder itself, or the newest version
    when it is a model base (``BASE/agg3d``).

    Raises:
      FileNotFoundError: neither a version (no ``saved_model.pb``) nor a base with versions.
    """
    from tf_agg3d.serving import contract
    from tf_agg3d.serving.publishing import existing_versions

    export = str(export).rstrip("/") if is_url(export) else str(export)
    if uio.isfile(uio.join(export, contract.SAVED_MODEL_PB)):
        return export
    for version in reversed(existing_versions(export) if uio.isdir(export) else []):
        candidate = uio.join(export, str(version))
        if uio.isfile(uio.join(candidate, contract.SAVED_MODEL_PB)):
            return candidate
    raise FileNotFoundError(
        f"{export}: no {contract.SAVED_MODEL_PB}: expected an export version folder "
        "(EXPORT_BASE/agg3d/VERSION, python -m tf_agg3d.export) or its model base"
    )


def export_config(export_dir: str) -> ExperimentConfig:
    """The experiment config an export was made with (``assets.extra/config.yaml``).

    Raises:
      FileNotFoundError: the export has no config (not made by this project's exporter).
    """
    from tf_agg3d.config import load_config
    from tf_agg3d.serving import contract

    path = uio.join(export_dir, contract.ASSETS_EXTRA, "config.yaml")
    if not uio.isfile(path):
        raise FileNotFoundError(f"{path}: missing; export the model with python -m tf_agg3d.export")
    return load_config(path)


def export_model_dir(
    model_dir: str,
    config: ExperimentConfig,
    export_base: str,
    checkpoint: str | None = None,
) -> str:
    """Exports a training run with `config` (its inference settings included) as the next
    version under ``export_base/agg3d`` with the export library; returns the version folder.

    The steps of :func:`tf_agg3d.serving.publishing.export_from_checkpoint`, with `config` in
    place of the run's own config.yaml (so ``--threshold`` and the like reach the graph).
    """
    from tf_agg3d.models.checkpoints import find_checkpoint
    from tf_agg3d.models.loading import load_detector
    from tf_agg3d.models.whole_scan import WholeScanDetector
    from tf_agg3d.ops.roi_align import roi_align_3d
    from tf_agg3d.serving import contract
    from tf_agg3d.serving.publishing import export_saved_model, next_version
    from tf_agg3d.serving.signatures import Agg3DExportModule

    detector, config = load_detector(model_dir, config=config, checkpoint=checkpoint)
    detector.roi_align_fn = roi_align_3d  # the export's contract: stock ops only
    whole_scan = WholeScanDetector(detector, config.inference, fill_hu=config.preprocess.fill_hu)
    module = Agg3DExportModule(
        whole_scan,
        config,
        version=next_version(uio.join(export_base, contract.MODEL_NAME)),
        max_volume_shape=EXPORT_MAX_VOLUME_SHAPE,
        extra_metadata={"checkpoint": os.fspath(find_checkpoint(model_dir, checkpoint))},
    )
    return export_saved_model(module, export_base).path


def temporary_export_base(options, runner: RunnerInfo) -> str:
    """A fresh folder for a ``--model-dir`` export that every worker can read."""
    if runner.local:
        return tempfile.mkdtemp(prefix="tf_agg3d-beam-export-")
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    temp_location = options.view_as(GoogleCloudOptions).temp_location
    if not temp_location or not is_url(temp_location):
        raise ValueError(
            f"{runner.name} workers cannot read a local export: give --export-base (a gs:// or "
            "s3:// URL) or --temp_location, or export first (python -m tf_agg3d.export) and "
            "pass --export"
        )
    return uio.join(temp_location, f"tf_agg3d-beam-export-{uuid.uuid4().hex[:12]}")
