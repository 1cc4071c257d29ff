"""Atomic writes to local paths and `tf.io.gfile` URLs, and the errors of a full disk.

Every file the package writes goes through here: the bytes land in a temporary name beside the
target and are moved into place, so an interrupted run leaves either the old file or the new one,
never a torn one. What "moved into place" means depends on where the target lives:

* local paths: a temporary file in the same folder, fsync, ``os.replace`` (atomic on POSIX);
* ``s3://``: a temporary object ``<prefix>/.tmp-<uuid>-<name>``, then ``tf.io.gfile.rename``,
  which tensorflow-io's S3 filesystem implements as a server-side copy and a delete. S3 object
  writes are all-or-nothing (an object appears only when its upload completes), so readers see
  the old object or the whole new one; a crash between copy and delete leaves only a stray
  ``.tmp-`` object, which the listings of :mod:`tf_agg3d.utils.files` skip;
* ``gs://``: the same temporary object and rename, which GCS also implements as copy + delete;
* ``hdfs://`` and other schemes: the temporary file and the filesystem's own rename (atomic on
  HDFS).

A local write that fails (a full disk: ``ENOSPC``) raises :class:`WriteError` naming the file;
the temporary file is removed and the previous version of the target is left as it was.
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import json
import os
import tempfile
import uuid

from tf_agg3d.utils.files import TMP_PREFIX, basename, dirname, join
from tf_agg3d.utils.filesystems import gfile, is_url

# errno values that mean "the storage is full": the disk (ENOSPC) or the user's quota (EDQUOT).
_FULL_ERRNOS = frozenset(
    e for e in (errno_lib.ENOSPC, getattr(errno_lib, "EDQUOT", None)) if e is not None
)


class WriteError(OSError):
    """A write that failed part-way (e.g. a full disk); the target keeps its previous content.

    Attributes:
      path: the file that could not be written.
      errno, strerror: those of the underlying OSError.
    """

    def __init__(self, path: str, cause: BaseException):
        code = getattr(cause, "errno", None)
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        super().__init__(code, reason)
        self.path = str(path)
        self.filename = self.path

    def __str__(self) -> str:
        return f"{self.path}: cannot write ({self.strerror}); its previous version is unchanged"


def is_storage_full(err: BaseException | None) -> bool:
    """True when `err` (or an error it was raised from) says the disk or the quota is full.

    Knows OSErrors (``ENOSPC``, ``EDQUOT``) and TensorFlow's file errors, whose message then says
    "No space left on device" (the checkpoint writer's C++ code raises ResourceExhaustedError).
    """
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def _write_all(f, data: bytes, path: str) -> None:
    """Writes `data` to the open temporary file `f` that will become `path` (the one place local
    bytes are written: tests replace it to simulate a disk that fills up part-way)."""
    del path
    f.write(data)


def _stage_url(path: str, data: bytes) -> str:
    """Writes `data` to a temporary object beside `path`; returns its URL."""
    fs = gfile(path)
    # A sibling temporary object (module docstring: rename is copy + delete on S3 and GCS).
    tmp = join(dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{basename(path)}")
    try:
        with fs.GFile(tmp, "wb") as f:
            f.write(data)
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def _stage_local(path: str, data: bytes) -> str:
    """Writes `data` to a synced temporary file beside `path`; returns its path.

    Raises:
      WriteError: the write failed (the temporary file is removed).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.basename(path), dir=directory)
    except OSError as err:
        raise WriteError(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data, path)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        _discard(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err) from err
        raise
    return tmp


def _discard(tmp: str) -> None:
    """Removes a temporary file or object; errors are ignored (it is only litter)."""
    with contextlib.suppress(Exception):
        if is_url(tmp):
            fs = gfile(tmp)
            if fs.exists(tmp):
                fs.remove(tmp)
        elif os.path.exists(tmp):
            os.unlink(tmp)


def _move_into_place(tmp: str, path: str) -> None:
    if is_url(path):
        gfile(path).rename(tmp, path, overwrite=True)
        return
    try:
        os.replace(tmp, path)
    except OSError as err:
        raise WriteError(path, err) from err


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary sibling and a rename (module docstring).

    Raises:
      WriteError: a local write failed (e.g. ``ENOSPC``); `path` keeps its previous content.
    """
    atomic_write_many([(str(path), data)])


def atomic_write_many(items) -> None:
    """Writes several files, each atomically, moving them into place only once all are written.

    A failure while writing any of them (a full disk) leaves every target as it was, so files
    that describe each other (a cache volume and its sidecar) never mix versions because of a
    failed write. The moves run in the order given.

    Args:
      items: ``[(path, bytes)]``.

    Raises:
      WriteError: a local write failed; nothing was moved into place.
    """
    staged: list[tuple[str, str]] = []
    try:
        for path, data in items:
            path = str(path)
            stage = _stage_url if is_url(path) else _stage_local
            staged.append((stage(path, data), path))
        while staged:
            tmp, path = staged[0]
            _move_into_place(tmp, path)
            staged.pop(0)
    finally:
        for tmp, _ in staged:
            _discard(tmp)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
