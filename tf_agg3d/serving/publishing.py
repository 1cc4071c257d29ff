"""Publishing an export as a TF-Serving model version: numbered, atomic, never half there.

:func:`export_saved_model` writes an :class:`~tf_agg3d.serving.signatures.Agg3DExportModule`
as ``<base>/<model>/<version>/``, checks it for non-stock ops, adds ``assets.extra/`` (metadata,
config, anchors, optional warmup requests), and only then makes it appear under its version
number: by one directory rename on local paths and HDFS, or on object stores by an upload to a
hidden prefix and per-object moves with ``saved_model.pb`` last. An existing version is
replaced only with ``overwrite``; :func:`next_version` numbers new ones.
:func:`export_from_checkpoint` loads a trained detector and does all of it.

Why each step is ordered as it is, and what a polling server can observe in between, is in
``docs/serving.md`` ("Publishing a version atomically").
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence

import tensorflow as tf

from tf_agg3d.serving import contract
from tf_agg3d.serving.errors import ExportError
from tf_agg3d.serving.signatures import Agg3DExportModule, non_stock_op_types, saved_model_op_types
from tf_agg3d.utils import files as io_utils
from tf_agg3d.utils.filesystems import ensure_filesystem, ensure_filesystems, is_url, scheme

# Schemes whose filesystems rename a directory in one atomic step ("" is a local path); every
# other URL is an object store, where a version is published object by object (docs/serving.md).
_DIRECTORY_RENAME_SCHEMES = frozenset({"", "hdfs", "viewfs"})


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Where an export went.

    Attributes:
      path: the version directory, ``<base>/<model>/<version>``.
      version: the version number.
      model_base: ``<base>/<model>``, TF-Serving's ``base_path``.
    """

    path: str
    version: int
    model_base: str


def existing_versions(model_base: str) -> list[int]:
    """Version numbers present under a TF-Serving model base path, ascending.

    A version prefix still being filled on an object store counts: its number is taken.
    """
    ensure_filesystem(model_base)
    if not tf.io.gfile.isdir(model_base):
        return []
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(model_base)]
    return sorted(int(n) for n in names if contract.is_version_dir(n))


def next_version(model_base: str) -> int:
    """Highest existing version + 1, or 1 for an empty base."""
    versions = existing_versions(model_base)
    return versions[-1] + 1 if versions else 1


def _refuse_existing(model_base: str, version: int, overwrite: bool) -> None:
    """ExportError when `version` exists under `model_base` and `overwrite` is not set."""
    final = io_utils.join(model_base, str(version))
    if tf.io.gfile.exists(final) and not overwrite:
        raise ExportError(
            f"{final} already exists: pass --overwrite to replace version {version}, or omit "
            f"--version to write version {next_version(model_base)}"
        )


def _remove_tree(path: str) -> None:
    if is_url(path):
        if tf.io.gfile.exists(path):
            tf.io.gfile.rmtree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def write_warmup_requests(
    path: str,
    volume_shape: Sequence[int],
    fill_hu: int,
    model_name: str = contract.MODEL_NAME,
) -> None:
    """Writes TF-Serving warmup records: one ``detect`` request for a uniform volume.

    TF-Serving replays ``assets.extra/tf_serving_warmup_requests`` before it marks a version
    AVAILABLE, so the first real scan does not pay for graph optimisation and allocation.
    """
    import numpy as np

    # Imported here: exporting needs tensorflow-serving-api only for warmup requests.
    from tf_agg3d.serving import protos

    volume = np.full(tuple(int(n) for n in volume_shape), fill_hu, np.int16)
    request = protos.predict_request(
        {contract.VOLUME_INPUT: volume}, model_name, signature=contract.DETECT_SIGNATURE
    )
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(protos.warmup_record(request))


def _renames_directories(path: str) -> bool:
    """True when `path`'s filesystem renames a whole directory atomically (local, HDFS)."""
    return scheme(path) in _DIRECTORY_RENAME_SCHEMES


def _write_version(
    module: Agg3DExportModule,
    directory: str,
    model_name: str,
    warmup_shape: Sequence[int] | None,
) -> None:
    """Saves `module` to the new `directory`, checks its ops and adds ``assets.extra/``."""
    tf.saved_model.save(module, directory, signatures=module.signatures())
    bad = non_stock_op_types(saved_model_op_types(directory))
    if bad:
        raise ExportError(
            f"the exported graph uses op types stock TF-Serving cannot run: {bad}; set "
            f"detector.roi_align_fn to tf_agg3d.ops.roi_align.roi_align_3d before export"
        )
    extra = io_utils.join(directory, contract.ASSETS_EXTRA)
    tf.io.gfile.makedirs(extra)
    meta = module.metadata_dict
    with tf.io.gfile.GFile(io_utils.join(extra, "metadata.json"), "w") as f:
        f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    with tf.io.gfile.GFile(io_utils.join(extra, "config.yaml"), "w") as f:
        f.write(meta["config_yaml"])
    with tf.io.gfile.GFile(io_utils.join(extra, "anchors.json"), "w") as f:
        f.write(json.dumps(meta["anchors"], indent=1) + "\n")
    if warmup_shape is not None:
        write_warmup_requests(
            io_utils.join(extra, contract.WARMUP_FILE),
            warmup_shape,
            int(meta["preprocess"]["fill_hu"]),
            model_name,
        )


def _rename_directory_into_place(tmp: str, final: str, model_base: str, version: int) -> None:
    """Local / HDFS: the finished `tmp` directory becomes `final` by directory renames."""
    if tf.io.gfile.exists(final):
        # Move the old version aside first: a directory rename cannot replace a non-empty
        # target, and this keeps the window without a version as short as two renames.
        old = io_utils.join(model_base, f".old-{version}-{uuid.uuid4().hex[:12]}")
        tf.io.gfile.rename(final, old)
        tf.io.gfile.rename(tmp, final)
        _remove_tree(old)
    else:
        tf.io.gfile.rename(tmp, final)


def _local_files(directory: str) -> list[str]:
    """Paths of the files below a local `directory`, relative to it, with '/' separators."""
    found = []
    for folder, _, files in os.walk(directory):
        for name in files:
            found.append(
                os.path.relpath(os.path.join(folder, name), directory).replace(os.sep, "/")
            )
    return sorted(found)


def _publish_to_object_store(local: str, final: str, model_base: str, version: int) -> None:
    """Object stores: uploads `local` beside the version, then moves it in, saved_model.pb last.

    See ``docs/serving.md`` ("Publishing a version atomically") for why (no directory rename
    on object stores) and what a reader can observe at each step.
    """
    files = _local_files(local)
    if contract.SAVED_MODEL_PB not in files:
        raise ExportError(f"{local}: the SavedModel has no {contract.SAVED_MODEL_PB}")
    staging = io_utils.join(model_base, f".tmp-{version}-{uuid.uuid4().hex[:12]}")
    try:
        # The slow, failure-prone part (uploads) fills a prefix no loader looks at.
        for rel in files:
            io_utils.copy_file(os.path.join(local, *rel.split("/")), io_utils.join(staging, rel))
        if tf.io.gfile.exists(final):
            # saved_model.pb first: what remains of the old version is no longer loadable, so
            # no reader ever pairs an old graph with new variables or the other way round.
            old_pb = io_utils.join(final, contract.SAVED_MODEL_PB)
            if tf.io.gfile.exists(old_pb):
                tf.io.gfile.remove(old_pb)
            _remove_tree(final)
        # Server-side copies only from here on; saved_model.pb last, once all it refers to is in
        # place, since loaders (TF-Serving's included) start from it.
        for rel in [*(f for f in files if f != contract.SAVED_MODEL_PB), contract.SAVED_MODEL_PB]:
            tf.io.gfile.rename(
                io_utils.join(staging, rel), io_utils.join(final, rel), overwrite=True
            )
    finally:
        _remove_tree(staging)


def export_saved_model(
    module: Agg3DExportModule,
    export_base: str,
    *,
    model_name: str = contract.MODEL_NAME,
    overwrite: bool = False,
    warmup_shape: Sequence[int] | None = None,
) -> ExportResult:
    """Saves `module` as ``<export_base>/<model_name>/<version>/``; a version appears whole.

    The SavedModel is written under a temporary name (a hidden directory beside the version for
    local and HDFS bases, a local temporary directory for object stores), checked for
    non-stock ops, completed with ``assets.extra/``, and only then moved to the version number:
    by one directory rename, or on object stores by an upload to a hidden prefix and per-object
    moves with ``saved_model.pb`` last (``docs/serving.md``). A polling server never loads a
    half-written version.

    Args:
      module: the module to save; its ``metadata_dict["version"]`` is the version written.
      export_base: the TF-Serving model root (local path or `tf.io.gfile` URL).
      model_name: the model's directory under `export_base`.
      overwrite: replace an existing version directory; without it an existing version is an
        error.
      warmup_shape: when given, also write a warmup request for a volume of this shape.

    Returns:
      The :class:`ExportResult`.

    Raises:
      ExportError: the version exists (without `overwrite`), or the graph has non-stock ops.
      MissingExtraError: an ``s3://`` base without tensorflow-io.
    """
    version = int(module.metadata_dict["version"])
    if version < 1:
        raise ExportError(f"version: expected a positive integer, got {version}")
    ensure_filesystem(export_base)
    model_base = io_utils.join(export_base, model_name)
    final = io_utils.join(model_base, str(version))
    _refuse_existing(model_base, version, overwrite)
    tf.io.gfile.makedirs(model_base)
    if _renames_directories(model_base):
        tmp = io_utils.join(model_base, f".tmp-{version}-{uuid.uuid4().hex[:12]}")
        try:
            _write_version(module, tmp, model_name, warmup_shape)
            _rename_directory_into_place(tmp, final, model_base, version)
        finally:
            _remove_tree(tmp)
    else:
        local = tempfile.mkdtemp(prefix="tf_agg3d-export-")
        try:
            version_dir = os.path.join(local, str(version))
            _write_version(module, version_dir, model_name, warmup_shape)
            _publish_to_object_store(version_dir, final, model_base, version)
        finally:
            shutil.rmtree(local, ignore_errors=True)
    return ExportResult(path=final, version=version, model_base=model_base)


def export_from_checkpoint(
    model_dir: str,
    export_base: str,
    *,
    version: int | None = None,
    checkpoint: str | None = None,
    overwrite: bool = False,
    model_name: str = contract.MODEL_NAME,
    max_volume_shape: Sequence[int] = contract.MAX_VOLUME_SHAPE,
    warmup: bool = False,
) -> ExportResult:
    """Loads a trained detector and exports it for TF-Serving with the pure-TF RoI Align.

    Args:
      model_dir: the training run directory (config and checkpoints).
      export_base: the TF-Serving model root; the export lands in
        ``<export_base>/<model_name>/<version>``.
      version: the version to write; None for the highest existing + 1.
      checkpoint: a checkpoint prefix; None for the latest in `model_dir`.
      overwrite: replace an existing version.
      model_name: the TF-Serving model name.
      max_volume_shape: largest (D, H, W) the ``detect`` signature accepts.
      warmup: also write a TF-Serving warmup request (one inference window of `fill_hu`).

    Returns:
      The :class:`ExportResult`.
    """
    from tf_agg3d.models.checkpoints import find_checkpoint
    from tf_agg3d.models.loading import load_detector
    from tf_agg3d.models.whole_scan import WholeScanDetector
    from tf_agg3d.ops.roi_align import roi_align_3d

    ensure_filesystems(model_dir, export_base)
    model_base = io_utils.join(export_base, model_name)
    if version is None:
        version = next_version(model_base)
    else:
        _refuse_existing(model_base, version, overwrite)  # before the (slow) model load
    detector, config = load_detector(model_dir, checkpoint=checkpoint)
    # Stock TF-Serving cannot load the compiled RoiAlign3D op; the pure-TF one is the contract.
    detector.roi_align_fn = roi_align_3d
    whole_scan = WholeScanDetector(detector, config.inference, fill_hu=config.preprocess.fill_hu)
    # The prefix actually restored (the trainer's pointer lives in checkpoints/, not model_dir).
    source = find_checkpoint(model_dir, checkpoint)
    module = Agg3DExportModule(
        whole_scan,
        config,
        version=version,
        model_name=model_name,
        max_volume_shape=max_volume_shape,
        extra_metadata={"checkpoint": os.fspath(source)},
    )
    return export_saved_model(
        module,
        export_base,
        model_name=model_name,
        overwrite=overwrite,
        warmup_shape=config.inference.window_size if warmup else None,
    )
