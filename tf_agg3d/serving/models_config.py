"""TF-Serving's ``models.config`` (``--model_config_file``): which models and versions it serves.

:class:`ServedModel` is one ``model_config_list`` entry (name, base path, version policy,
labels); :func:`models_config_text` validates entries against TF-Serving's own proto and
:func:`write_models_config` writes the file atomically. ``docs/serving.md`` ("models.config")
says how the policies serve pinning and rollbacks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tf_agg3d.serving import contract
from tf_agg3d.serving.errors import ExportError
from tf_agg3d.utils.atomic_write import atomic_write_text


@dataclasses.dataclass
class ServedModel:
    """One entry of a TF-Serving ``model_config_list``.

    Attributes:
      name: the model name clients put in ``model_spec.name``.
      base_path: the directory holding the numbered versions, as the server sees it.
      version_policy: ``latest`` (the newest `num_versions`), ``all``, or ``specific``
        (exactly `versions`; how to pin or roll back).
      num_versions: for ``latest``.
      versions: for ``specific``.
      version_labels: label -> version (e.g. ``{"stable": 3, "canary": 4}``); labels must point
        at versions the policy loads.
    """

    name: str = contract.MODEL_NAME
    base_path: str = "/models/agg3d"
    version_policy: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()
    version_labels: dict[str, int] = dataclasses.field(default_factory=dict)


def models_config_text(models: Sequence[ServedModel]) -> str:
    """The ``--model_config_file`` text for `models`, validated against TF-Serving's proto."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    for model in models:
        entry = config.model_config_list.config.add()
        entry.name = model.name
        entry.base_path = model.base_path
        entry.model_platform = "tensorflow"
        policy = entry.model_version_policy
        if model.version_policy == "latest":
            if model.num_versions < 1:
                raise ExportError(f"num_versions: expected >= 1, got {model.num_versions}")
            policy.latest.num_versions = model.num_versions
        elif model.version_policy == "all":
            policy.all.SetInParent()
        elif model.version_policy == "specific":
            if not model.versions:
                raise ExportError("versions: the 'specific' version policy needs at least one")
            policy.specific.versions.extend(int(v) for v in model.versions)
        else:
            raise ExportError(
                f"version_policy: expected latest, all or specific, got {model.version_policy!r}"
            )
        if model.version_labels and model.version_policy == "specific":
            missing = sorted(set(model.version_labels.values()) - set(model.versions))
            if missing:
                raise ExportError(
                    f"version_labels: versions {missing} are not in the specific policy's "
                    f"versions {list(model.versions)}"
                )
        for label, version in sorted(model.version_labels.items()):
            entry.version_labels[label] = int(version)
    return text_format.MessageToString(config)


def write_models_config(path: str, models: Sequence[ServedModel]) -> str:
    """Writes a TF-Serving ``models.config`` atomically; returns its text."""
    text = models_config_text(models)
    atomic_write_text(path, text)
    return text
