"""The development server's servables: one model's versions under a TF-Serving base path.

:class:`ModelManager` does what TF-Serving's source and manager do for one model: it lists the
numbered versions in the model's base path, applies the version policy (the newest, or exactly
the versions asked for), loads new versions (replaying their warmup requests before marking
them AVAILABLE), unloads the others once a wanted version is AVAILABLE, and keeps a version that
failed to load in state END with its error. :meth:`ModelManager.refresh` is what the server
runs at start-up and on every poll; it returns (and logs) one line saying which versions were
found and loaded, or why the base path holds no loadable version.

The base path is given either as TF-Serving's ``--model_base_path`` (the folder that holds the
version folders, ``/models/agg3d``) or as the folder above it (``model_base`` + ``model_name``,
``BASE/agg3d``). A version folder counts only once its ``saved_model.pb`` exists: exports move
that file in last on object stores and rename whole folders locally (``docs/serving.md``,
"Publishing a version atomically"), so a version still being published is not loaded.

Requests hold a version through :meth:`ModelManager.lease`: a version that is no longer wanted
goes to UNLOADING and is released only when the last request on it finishes, so a request in
flight when a new version is published finishes on the old one, as TF-Serving's servable
handles do. :meth:`ModelManager.resolve` and :meth:`ModelManager.statuses` answer which version
a request means, raising :class:`~tf_agg3d.serving.errors.RpcError` with TF-Serving's messages.
The gRPC services on top are :mod:`tf_agg3d.serving.dev_server`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import tensorflow as tf
from absl import logging

from tf_agg3d.serving import contract, protos
from tf_agg3d.serving.errors import RpcError
from tf_agg3d.utils import files as io_utils
from tf_agg3d.utils.filesystems import ensure_filesystem

_State = protos.VersionState


@dataclasses.dataclass
class ServedVersion:
    """One version of the model and its loading state.

    ``leases`` counts the requests running on it; an unwanted version waits in UNLOADING until
    they are done.
    """

    version: int
    path: str
    state: int = _State.START
    error: str = ""
    loaded: Any = None
    signature_defs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    leases: int = 0


@dataclasses.dataclass
class BasePathScan:
    """What one look at a model's base path found.

    Attributes:
      exists: the base path is a folder.
      loadable: numeric version folders holding a ``saved_model.pb``, ascending.
      incomplete: numeric version folders without ``saved_model.pb`` (not loaded).
      other: entries that are no version folder (not numeric), a few for the log line.
      error: the listing failed (storage error), its message.
    """

    exists: bool = False
    loadable: list[int] = dataclasses.field(default_factory=list)
    incomplete: list[int] = dataclasses.field(default_factory=list)
    other: list[str] = dataclasses.field(default_factory=list)
    error: str = ""


def _read_signature_defs(path: str) -> dict[str, Any]:
    """The SignatureDefs of a SavedModel's `serve` meta graph, as TF-Serving reports them."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(io_utils.read_bytes(io_utils.join(path, contract.SAVED_MODEL_PB)))
    for meta_graph in proto.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise RpcError(grpc.StatusCode.NOT_FOUND, f"{path}: no meta graph with the 'serve' tag")


def _listing(values: Sequence[Any], most: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:most])
    return shown + (f", ... ({len(values)} in all)" if len(values) > most else "")


def _one_line(text: str, most: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= most else text[: most - 3] + "..."


class ModelManager:
    """Loads and tracks the versions of one model under a TF-Serving base path.

    Give the model's folder either as `model_base_path` (TF-Serving's ``--model_base_path``:
    the folder holding ``<version>/``; the model name defaults to its basename) or as
    `model_base` (the folder above ``<model_name>/``; the name defaults to ``agg3d``).

    Args:
      model_base: the folder holding ``<model_name>/<version>/``.
      model_name: the model's name (and, with `model_base`, its folder).
      versions: serve exactly these versions (TF-Serving's ``specific`` policy); None serves
        the newest one (``latest { num_versions: 1 }``).
      version_labels: label -> version, for requests naming a ``version_label``.
      model_base_path: the folder holding ``<version>/`` (instead of `model_base`).
      log: called with the one-line report of each :meth:`refresh` (default: absl INFO, or
        WARNING when nothing is loadable).

    Raises:
      ValueError: both or neither of `model_base` and `model_base_path`.
    """

    def __init__(
        self,
        model_base: str | None = None,
        model_name: str | None = None,
        versions: Sequence[int] | None = None,
        version_labels: Mapping[str, int] | None = None,
        *,
        model_base_path: str | None = None,
        log: Callable[[str], None] | None = None,
    ):
        if bool(model_base) == bool(model_base_path):
            raise ValueError(
                "give the model's folder once: model_base_path (TF-Serving's --model_base_path,"
                " the folder holding the version folders) or model_base (the folder above "
                "<model_name>/), not both"
                if model_base
                else "give model_base_path (the folder holding the version folders) or "
                "model_base (the folder above <model_name>/)"
            )
        base = str(model_base_path or model_base)
        # s3:// exists for tf.io.gfile only once tensorflow-io is loaded (MissingExtraError).
        ensure_filesystem(base)
        if model_base_path:
            self.model_dir = base.rstrip("/") or base
            self.model_name = model_name or io_utils.basename(self.model_dir)
            self.model_base = io_utils.dirname(self.model_dir)
            if not self.model_name:
                raise ValueError(f"model_base_path {base!r}: give a model name")
        else:
            self.model_base = base
            self.model_name = model_name or contract.MODEL_NAME
            self.model_dir = io_utils.join(base, self.model_name)
        self.policy_versions = tuple(int(v) for v in versions) if versions else None
        self.version_labels = {str(k): int(v) for k, v in (version_labels or {}).items()}
        self._versions: dict[int, ServedVersion] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._log = log
        self.last_report = ""
        self.predict_fn = None  # set by the servicer, used to replay warmup requests

    # -- discovery and loading -----------------------------------------------------------------

    def scan(self) -> BasePathScan:
        """Lists the base path: loadable, incomplete and foreign entries."""
        found = BasePathScan()
        try:
            if not tf.io.gfile.isdir(self.model_dir):
                return found
            found.exists = True
            names = io_utils.listdir(self.model_dir)
        except (OSError, tf.errors.OpError) as err:
            found.error = _one_line(getattr(err, "message", None) or err)
            return found
        numbers = sorted(int(n) for n in names if contract.is_version_dir(n))
        found.other = [n for n in names if not contract.is_version_dir(n)]
        for version in numbers:
            pb = io_utils.join(self.model_dir, str(version), contract.SAVED_MODEL_PB)
            try:
                complete = tf.io.gfile.exists(pb)
            except tf.errors.OpError:
                complete = False
            (found.loadable if complete else found.incomplete).append(version)
        return found

    def _on_disk(self) -> list[int]:
        """The loadable versions (numeric folders with a ``saved_model.pb``), ascending."""
        return self.scan().loadable

    def _wanted(self, on_disk: list[int]) -> list[int]:
        if self.policy_versions is None:
            return on_disk[-1:]
        return [v for v in self.policy_versions if v in on_disk]

    def refresh(self) -> str:
        """Applies the version policy to what is on disk; returns (and logs) a one-line report.

        New wanted versions are loaded first; versions no longer wanted are unloaded only once a
        wanted version is AVAILABLE (so a version that fails to load leaves the old one
        serving), and a version still answering requests goes to UNLOADING until they finish.
        A version that fails to load is kept in state END with its error, as TF-Serving reports
        it in GetModelStatus, and is not retried.
        """
        with self._load_lock:
            found = self.scan()
            wanted = self._wanted(found.loadable)
            loading = []
            with self._lock:
                for version in wanted:
                    entry = self._versions.get(version)
                    # New versions, and unloaded ones a policy change brings back (rollback);
                    # not ones that failed to load.
                    if entry is None or (entry.state == _State.END and not entry.error):
                        path = io_utils.join(self.model_dir, str(version))
                        entry = ServedVersion(version, path, _State.LOADING)
                        self._versions[version] = entry
                        loading.append(entry)
                    elif entry.state == _State.UNLOADING:
                        entry.state = _State.AVAILABLE  # wanted again before its requests ended
            seconds = {}
            for entry in loading:
                start = time.monotonic()
                self._load(entry)
                seconds[entry.version] = time.monotonic() - start
            unloaded = []
            with self._lock:
                if any(self._versions[v].state == _State.AVAILABLE for v in wanted):
                    for version, entry in sorted(self._versions.items()):
                        if version not in wanted and entry.state == _State.AVAILABLE:
                            self._unload(entry)
                            unloaded.append(version)
                serving = sorted(
                    v for v, e in self._versions.items() if e.state == _State.AVAILABLE
                )
            report = self._report(found, wanted, loading, seconds, unloaded, serving)
        self.last_report = report
        if self._log is not None:
            self._log(report)
        elif serving:
            logging.info("%s", report)
        else:
            logging.warning("%s", report)
        return report

    def _report(self, found, wanted, loading, seconds, unloaded, serving) -> str:
        """The refresh's one line: found, loaded, unloaded, serving, or why nothing is."""
        head = f"model '{self.model_name}' at {self.model_dir}:"
        parts = []
        if found.error:
            parts.append(f"cannot list the base path ({found.error})")
        elif not found.exists:
            parts.append("the base path does not exist or is not a folder")
        else:
            parts.append(f"found versions [{_listing(found.loadable)}]")
            if found.incomplete:
                parts.append(
                    f"skipped version folders without {contract.SAVED_MODEL_PB} "
                    f"[{_listing(found.incomplete)}] (not loadable yet)"
                )
            if not found.loadable and not found.incomplete:
                others = f" (found: {_listing(found.other)})" if found.other else " (empty)"
                parts.append(f"no numeric version folder{others}")
        if self.policy_versions is not None:
            missing = sorted(set(self.policy_versions) - set(found.loadable))
            if missing:
                parts.append(f"versions asked for but not loadable: [{_listing(missing)}]")
        for entry in loading:
            if entry.state == _State.AVAILABLE:
                parts.append(f"loaded version {entry.version} ({seconds[entry.version]:.1f} s)")
            else:
                parts.append(f"version {entry.version} failed to load: {_one_line(entry.error)}")
        if unloaded:
            parts.append(f"unloading [{_listing(unloaded)}]")
        if serving:
            parts.append(f"serving [{_listing(serving)}]")
        else:
            parts.append("no loadable version: requests get NOT_FOUND")
        return head + " " + "; ".join(parts)

    def _load(self, entry: ServedVersion) -> None:
        start = time.monotonic()
        try:
            entry.signature_defs = _read_signature_defs(entry.path)
            entry.loaded = tf.saved_model.load(entry.path, tags=["serve"])
            self._warm_up(entry)
        except Exception as err:  # noqa: BLE001 - any load failure is reported, not raised
            message = getattr(err, "message", None) or str(err) or type(err).__name__
            entry.state, entry.loaded = _State.END, None
            entry.error = f"{entry.path}: failed to load: {_one_line(message, 2000)}"
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

    def _unload(self, entry: ServedVersion) -> None:
        """Unloads now, or once the requests on it finish (UNLOADING). Holds ``_lock``."""
        if entry.leases > 0:
            entry.state = _State.UNLOADING
        else:
            # Kept in state END, as TF-Serving's state monitor reports it.
            entry.state, entry.loaded = _State.END, None
            logging.info("unloaded %s version %d", self.model_name, entry.version)

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

    @contextlib.contextmanager
    def lease(self, model_spec) -> Iterator[ServedVersion]:
        """The version a request means, held until the block ends (it is not unloaded before).

        Raises:
          RpcError: as :meth:`resolve`.
        """
        while True:
            entry = self.resolve(model_spec)
            with self._lock:
                # A refresh may have unloaded it between resolve and here: resolve again.
                if entry.state == _State.AVAILABLE:
                    entry.leases += 1
                    break
        try:
            yield entry
        finally:
            with self._lock:
                entry.leases -= 1
                if entry.state == _State.UNLOADING and entry.leases == 0:
                    self._unload(entry)

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
