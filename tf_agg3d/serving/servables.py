"""The development server's servables: one model's versions under a TF-Serving base path.

:class:`ModelManager` does what TF-Serving's source and manager do for one model: it lists the
numbered versions under ``BASE/<model>/``, applies the version policy (the newest, or exactly
the versions asked for), loads new versions (replaying their warmup requests before marking
them AVAILABLE), unloads the others, and keeps a version that failed to load in state END with
its error. :meth:`ModelManager.refresh` is what the server's polling thread calls.
:meth:`ModelManager.resolve` and :meth:`ModelManager.statuses` answer which version a request
means, raising :class:`~tf_agg3d.serving.errors.RpcError` with TF-Serving's messages.

On object stores a version prefix counts only once its ``saved_model.pb`` exists: exports move
that file in last (``docs/serving.md``, "Publishing a version atomically"), so a version still
being moved in is not loaded. The gRPC services on top are :mod:`tf_agg3d.serving.dev_server`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import tensorflow as tf
from absl import logging

from tf_agg3d.serving import contract, protos
from tf_agg3d.serving.errors import RpcError
from tf_agg3d.utils import io as io_utils

_State = protos.VersionState


@dataclasses.dataclass
class ServedVersion:
    """One version of the model and its loading state."""

    version: int
    path: str
    state: int = _State.START
    error: str = ""
    loaded: Any = None
    signature_defs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _read_signature_defs(path: str) -> dict[str, Any]:
    """The SignatureDefs of a SavedModel's `serve` meta graph, as TF-Serving reports them."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(io_utils.read_bytes(io_utils.join(path, contract.SAVED_MODEL_PB)))
    for meta_graph in proto.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise RpcError(grpc.StatusCode.NOT_FOUND, f"{path}: no meta graph with the 'serve' tag")


class ModelManager:
    """Loads and tracks the versions of one model under a TF-Serving base path.

    Args:
      model_base: the TF-Serving base path (holding `<model_name>/<version>/`).
      model_name: the model's name (and directory).
      versions: serve exactly these versions (TF-Serving's ``specific`` policy); None serves
        the newest one (``latest { num_versions: 1 }``).
      version_labels: label -> version, for requests naming a ``version_label``.
    """

    def __init__(
        self,
        model_base: str,
        model_name: str = contract.MODEL_NAME,
        versions: Sequence[int] | None = None,
        version_labels: Mapping[str, int] | None = None,
    ):
        # s3:// exists for tf.io.gfile only once tensorflow-io is loaded (MissingExtraError).
        io_utils.ensure_filesystem(model_base)
        self.model_base = model_base
        self.model_name = model_name
        self.model_dir = io_utils.join(model_base, model_name)
        self.policy_versions = tuple(int(v) for v in versions) if versions else None
        self.version_labels = {str(k): int(v) for k, v in (version_labels or {}).items()}
        self._versions: dict[int, ServedVersion] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.predict_fn = None  # set by the servicer, used to replay warmup requests

    # -- discovery and loading -----------------------------------------------------------------

    def _on_disk(self) -> list[int]:
        if not tf.io.gfile.isdir(self.model_dir):
            return []
        names = [n.rstrip("/") for n in tf.io.gfile.listdir(self.model_dir)]
        versions = sorted(int(n) for n in names if contract.is_version_dir(n))
        if io_utils.is_url(self.model_dir):
            # Object stores: an export moves saved_model.pb in last (publishing), so a
            # version without it is still being published and must not be loaded yet.
            versions = [
                v
                for v in versions
                if tf.io.gfile.exists(
                    io_utils.join(self.model_dir, str(v), contract.SAVED_MODEL_PB)
                )
            ]
        return versions

    def _wanted(self, on_disk: list[int]) -> list[int]:
        if self.policy_versions is None:
            return on_disk[-1:]
        return [v for v in self.policy_versions if v in on_disk]

    def refresh(self) -> None:
        """Applies the version policy to what is on disk: loads new versions, unloads others.

        A version that fails to load is kept in state END with its error, as TF-Serving reports
        it in GetModelStatus.
        """
        with self._load_lock:
            on_disk = self._on_disk()
            wanted = self._wanted(on_disk)
            if self.policy_versions is not None:
                for v in sorted(set(self.policy_versions) - set(on_disk)):
                    logging.warning("%s: version %d is not on disk", self.model_dir, v)
            with self._lock:
                for version, entry in self._versions.items():
                    if version not in wanted and entry.state == _State.AVAILABLE:
                        # Kept in state END, as TF-Serving's state monitor reports it.
                        entry.state, entry.loaded = _State.END, None
                        logging.info("unloaded %s version %d", self.model_name, version)
                for version in wanted:
                    entry = self._versions.get(version)
                    # New versions, and unloaded ones a policy change brings back (rollback);
                    # not ones that failed to load, until they change on disk.
                    if entry is None or (entry.state == _State.END and not entry.error):
                        path = io_utils.join(self.model_dir, str(version))
                        self._versions[version] = ServedVersion(version, path, _State.LOADING)
            for version in wanted:
                entry = self._versions.get(version)
                if entry is not None and entry.state == _State.LOADING:
                    self._load(entry)

    def _load(self, entry: ServedVersion) -> None:
        start = time.monotonic()
        try:
            entry.signature_defs = _read_signature_defs(entry.path)
            entry.loaded = tf.saved_model.load(entry.path, tags=["serve"])
            self._warm_up(entry)
        except Exception as err:  # noqa: BLE001 - any load failure is reported, not raised
            entry.state = _State.END
            entry.error = f"{entry.path}: failed to load: {err}"
            logging.error("%s", entry.error)
            return
        entry.state = _State.AVAILABLE
        logging.info(
            "serving %s version %d from %s (%.1f s)",
            self.model_name,
            entry.version,
            entry.path,
            time.monotonic() - start,
        )

    def _warm_up(self, entry: ServedVersion) -> None:
        path = io_utils.join(entry.path, contract.ASSETS_EXTRA, contract.WARMUP_FILE)
        if self.predict_fn is None or not tf.io.gfile.exists(path):
            return
        for request in protos.warmup_requests(path):
            self.predict_fn(entry, request)

    # -- lookups -------------------------------------------------------------------------------

    def resolve(self, model_spec) -> ServedVersion:
        """The AVAILABLE version a request's ModelSpec names, or the TF-Serving error."""
        name = model_spec.name
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version":
            request = f"Specific({name}, {model_spec.version.value})"
        elif choice == "version_label":
            request = f"Specific({name}, {model_spec.version_label})"
        else:
            request = f"Latest({name})"
        if name != self.model_name:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")
        if choice == "version_label":
            version = self.labelled_version(model_spec.version_label)
        elif choice == "version":
            version = int(model_spec.version.value)
        else:
            with self._lock:
                available = [v for v, e in self._versions.items() if e.state == _State.AVAILABLE]
            if not available:
                raise RpcError(
                    grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}"
                )
            version = max(available)
        with self._lock:
            entry = self._versions.get(version)
        if entry is None or entry.state != _State.AVAILABLE:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")
        return entry

    def labelled_version(self, label: str) -> int:
        """The version a label points at; INVALID_ARGUMENT for an unknown label."""
        if label not in self.version_labels:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}"
            )
        return self.version_labels[label]

    def statuses(self, name: str, version: int | None) -> list[ServedVersion]:
        """Versions for GetModelStatus, with TF-Serving's NOT_FOUND messages."""
        with self._lock:
            entries = dict(self._versions) if name == self.model_name else {}
        if not entries:
            raise RpcError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}"
            )
        if version is not None:
            if version not in entries:
                raise RpcError(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {version} of model {name}",
                )
            return [entries[version]]
        return [entries[v] for v in sorted(entries)]
