"""Atomic writes, listing and local copies for local paths and `tf.io.gfile` URLs.

Every file the package writes goes through here: the bytes land in a temporary name beside the
target and are moved into place, so an interrupted run leaves either the old file or the new one,
never a torn one. What "moved into place" means depends on where the target lives:

* local paths: a temporary file in the same folder, fsync, ``os.replace`` (atomic on POSIX);
* ``s3://``: a temporary object ``<prefix>/.tmp-<uuid>-<name>``, then ``tf.io.gfile.rename``,
  which tensorflow-io's S3 filesystem implements as a server-side copy and a delete. S3 object
  writes are all-or-nothing (an object appears only when its upload completes), so readers see
  the old object or the whole new one; a crash between copy and delete leaves only a stray
  ``.tmp-`` object, which listings here skip;
* ``gs://``: the same temporary object and rename, which GCS also implements as copy + delete;
* ``hdfs://`` and other schemes: the temporary file and the filesystem's own rename (atomic on
  HDFS).

URLs need TensorFlow's filesystem plugins: ``s3://`` (and ``az://``) exist only once
``tensorflow_io`` is imported, which :func:`ensure_filesystem` does, with an error that names the
extra to install when it is missing. ``gs://`` and ``hdfs://`` are also built into TensorFlow;
tensorflow-io is imported for them when it is installed, and not required.

SimpleITK reads local files only: :func:`local_copy` copies an object (an ``.mhd`` together with
the ``.raw``/``.zraw`` it names, or a whole DICOM folder) to a temporary folder for it.

Folders on object stores are key prefixes, written the way users write them: a bucket root
(``s3://bucket``, ``gs://bucket``), with or without a trailing slash, with or without the
zero-byte "directory marker" objects some tools create. Every helper here accepts all of these
forms (:func:`fs_path` gives a bucket root the trailing slash `tf.io.gfile` needs), so callers
never special-case them.

A local write that fails (a full disk: ``ENOSPC``) raises :class:`WriteError` naming the file;
the temporary file is removed and the previous version of the target is left as it was.
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import functools
import io
import json
import math
import os
import posixpath
import shutil
import tempfile
import uuid

import numpy as np

IO_EXTRA_HINT = "pip install tf_agg3d[io]"
# Schemes that only tensorflow-io's plugins provide; the others TensorFlow also handles itself.
_TFIO_ONLY_SCHEMES = frozenset({"s3", "az"})
_TFIO_OPTIONAL_SCHEMES = frozenset({"gs", "hdfs", "viewfs", "har"})
_TMP_PREFIX = ".tmp-"


class MissingExtraError(ImportError):
    """A feature needs an optional package that is not installed; the message says what to do."""


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


def is_url(path: str) -> bool:
    """True for `scheme://...` paths handled by `tf.io.gfile` (s3, gs, hdfs, ...)."""
    return "://" in str(path)


def scheme(path: str) -> str:
    """The URL scheme in lower case (``"s3"``), or ``""`` for a local path."""
    path = str(path)
    return path.split("://", 1)[0].lower() if is_url(path) else ""


def import_tensorflow_io(feature: str):
    """Imports and returns ``tensorflow_io``.

    Args:
      feature: what needs it, for the error message.

    Raises:
      MissingExtraError: tensorflow-io is not installed or does not load against this TensorFlow.
    """
    try:
        import tensorflow_io
    except ImportError as err:
        raise MissingExtraError(
            f"{feature} needs tensorflow-io, which is not installed: {IO_EXTRA_HINT} "
            f"(tensorflow-io 0.37 loads with TensorFlow 2.16; see README) [{err}]"
        ) from None
    return tensorflow_io


@functools.cache
def tensorflow_io_available() -> bool:
    """True when ``import tensorflow_io`` succeeds."""
    try:
        import_tensorflow_io("probe")
    except ImportError:
        return False
    return True


@functools.cache
def _ensure_scheme(name: str) -> None:
    if name in _TFIO_ONLY_SCHEMES:
        # Importing tensorflow_io registers its filesystems (s3, az, ...) with tf.io.gfile.
        import_tensorflow_io(f"{name}:// paths")
    elif name in _TFIO_OPTIONAL_SCHEMES and tensorflow_io_available():
        import_tensorflow_io(f"{name}:// paths")


def ensure_filesystem(path: str) -> None:
    """Makes `tf.io.gfile` able to open `path` (imports tensorflow-io for s3/gs/hdfs URLs).

    Local paths need nothing. ``s3://`` and ``az://`` need tensorflow-io; ``gs://`` and
    ``hdfs://`` use tensorflow-io's plugins when it is installed and TensorFlow's own otherwise.

    Raises:
      MissingExtraError: the scheme needs tensorflow-io and it is not installed.
    """
    name = scheme(path)
    if name:
        _ensure_scheme(name)


def ensure_filesystems(*paths: str | None) -> None:
    """:func:`ensure_filesystem` for each path given; ``None`` and ``""`` (unset flags) are skipped.

    Entry points call it on every path flag before any work, so a missing tensorflow-io is
    reported once, up front, instead of after minutes of model loading.

    Raises:
      MissingExtraError: a path's scheme needs tensorflow-io and it is not installed.
    """
    for path in paths:
        if path:
            ensure_filesystem(str(path))


def _gfile(path: str):
    """`tf.io.gfile`, with the filesystem of `path` registered."""
    ensure_filesystem(path)
    import tensorflow as tf

    return tf.io.gfile


def is_bucket_root(path: str) -> bool:
    """True for a URL naming a whole bucket: ``s3://bucket`` or ``s3://bucket/``."""
    path = str(path)
    if not is_url(path):
        return False
    rest = path.split("://", 1)[1]
    return bool(rest.strip("/")) and "/" not in rest.strip("/")


def fs_path(path: str) -> str:
    """`path` as `tf.io.gfile` wants it: a bucket root gets a trailing slash.

    tensorflow-io's S3 filesystem refuses ``s3://bucket`` ("S3 path doesn't contain a bucket
    name"; its listing finds nothing), while ``s3://bucket/`` is the bucket; other URLs and
    local paths are returned unchanged.
    """
    path = str(path)
    if is_bucket_root(path) and not path.endswith("/"):
        return path + "/"
    return path


def join(base: str, *parts: str) -> str:
    """`base` / `parts`; for URLs one slash between parts, whatever slashes they carry."""
    if is_url(base):
        pieces = [str(p).strip("/") for p in parts]
        return "/".join([str(base).rstrip("/"), *[p for p in pieces if p]])
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    path = str(path)
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def dirname(path: str) -> str:
    path = str(path)
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def makedirs(path: str) -> None:
    """Creates a local folder (and its parents); on object stores, where a folder is a key
    prefix, this only creates what the filesystem wants (nothing for a bucket root)."""
    if is_url(path):
        if not is_bucket_root(path):
            _gfile(path).makedirs(fs_path(path))
        else:
            ensure_filesystem(path)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    if is_url(path):
        return _gfile(path).exists(fs_path(path))
    return os.path.exists(path)


def isdir(path: str) -> bool:
    """True for a local folder, or a URL prefix (a bucket root too) with objects below it."""
    if is_url(path):
        return _gfile(path).isdir(fs_path(path))
    return os.path.isdir(path)


def isfile(path: str) -> bool:
    """True for a local file, or a URL naming an object (not a prefix)."""
    if is_url(path):
        if is_bucket_root(path) or path.endswith("/"):
            return False
        gfile = _gfile(path)
        return gfile.exists(path) and not gfile.isdir(path)
    return os.path.isfile(path)


def getsize(path: str) -> int:
    if is_url(path):
        return int(_gfile(path).stat(path).length)
    return os.path.getsize(path)


def listdir(path: str) -> list[str]:
    """Names directly below `path`, sorted, without trailing slashes and temporary ``.tmp-`` files.

    On object stores: a bucket root, a trailing slash and prefixes without directory-marker
    objects all list the same; a marker object of the prefix itself is no entry.

    Raises:
      FileNotFoundError / tf.errors.NotFoundError: `path` does not exist.
    """
    names = _gfile(path).listdir(fs_path(path)) if is_url(path) else os.listdir(path)
    return sorted({n.strip("/") for n in names if n.strip("/") and not n.startswith(_TMP_PREFIX)})


def find_files(root: str, suffix: str) -> list[str]:
    """Files below `root` (any depth) whose name ends with `suffix`, sorted; [] without `root`.

    URLs come back in one form whatever the root's spelling: ``s3://bucket``, ``s3://bucket/``
    and ``s3://bucket/prefix/`` give ``s3://bucket/...`` paths with single slashes.
    """
    root = str(root)
    if not isdir(root):
        return []
    found = []
    if is_url(root):
        for folder, _, files in _gfile(root).walk(fs_path(root)):
            found += [join(folder, f) for f in files if f.strip("/") and f.endswith(suffix)]
    else:
        for folder, _, files in os.walk(root):
            found += [os.path.join(folder, f) for f in files if f.endswith(suffix)]
    return sorted(f for f in found if not basename(f).startswith(_TMP_PREFIX))


def remove(path: str) -> None:
    if is_url(path):
        _gfile(path).remove(path)
    else:
        os.unlink(path)


def copy_file(src: str, dst: str, overwrite: bool = True) -> None:
    """Copies one file between any two places (local or URL) through `tf.io.gfile`."""
    if not is_url(src) and not is_url(dst):
        shutil.copyfile(src, dst)
        return
    ensure_filesystem(src)
    _gfile(dst).copy(src, dst, overwrite=overwrite)


def open_file(path: str, mode: str = "rb"):
    """``open`` for local paths, ``tf.io.gfile.GFile`` for URLs (a context manager either way)."""
    if is_url(path):
        return _gfile(path).GFile(path, mode)
    return open(path, mode)  # noqa: SIM115 -- returned to the caller, who closes it


def read_bytes(path: str) -> bytes:
    if is_url(path):
        with _gfile(path).GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def _mhd_data_files(header_path: str) -> list[str]:
    """Names of the data files an `.mhd` header points at, relative to its folder."""
    names = []
    for line in read_bytes(header_path)[: 64 * 1024].split(b"\n"):
        text = line.decode("latin-1").strip()
        if "=" not in text:
            continue
        key, value = (t.strip() for t in text.split("=", 1))
        if key == "ElementDataFile":
            # LOCAL: the data follow the header; LIST and %-patterns name many files, which
            # LUNA16 never uses: copying the header alone then makes SimpleITK report them.
            if value != "LOCAL" and not value.startswith("LIST") and "%" not in value:
                names.append(value)
            break
    return names


@contextlib.contextmanager
def local_copy(path: str):
    """Yields a local path with the content of `path`, for readers that open local files only.

    A local `path` is yielded as it is. A URL is copied into a temporary folder, removed on exit:
    a file together with the data file its `.mhd` header names (``.raw``/``.zraw``); a folder
    (a DICOM series) with every file directly in it. The copy keeps the base name, so readers
    that look at extensions behave as on the original.

    Raises:
      FileNotFoundError: `path` is a URL that names nothing.
    """
    path = str(path)
    if not is_url(path):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="tf_agg3d-")
    try:
        target = os.path.join(tmp, basename(path) or "object")
        if isdir(path):
            os.makedirs(target)
            for name in listdir(path):
                src = join(path, name)
                if not isdir(src):
                    copy_file(src, os.path.join(target, name))
        elif exists(path):
            copy_file(path, target)
            if path.lower().endswith(".mhd"):
                for name in _mhd_data_files(path):
                    src = join(dirname(path), name)
                    if exists(src):  # a missing one: the header check names it
                        os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
                        copy_file(src, os.path.join(tmp, name))
        else:
            raise FileNotFoundError(f"{path}: no such object or prefix")
        yield target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_all(f, data: bytes, path: str) -> None:
    """Writes `data` to the open temporary file `f` that will become `path` (the one place local
    bytes are written: tests replace it to simulate a disk that fills up part-way)."""
    del path
    f.write(data)


def _stage_url(path: str, data: bytes) -> str:
    """Writes `data` to a temporary object beside `path`; returns its URL."""
    gfile = _gfile(path)
    # A sibling temporary object (module docstring: rename is copy + delete on S3 and GCS).
    tmp = join(dirname(path), f"{_TMP_PREFIX}{uuid.uuid4().hex}-{basename(path)}")
    try:
        with gfile.GFile(tmp, "wb") as f:
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
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=os.path.basename(path), dir=directory)
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
            gfile = _gfile(tmp)
            if gfile.exists(tmp):
                gfile.remove(tmp)
        elif os.path.exists(tmp):
            os.unlink(tmp)


def _move_into_place(tmp: str, path: str) -> None:
    if is_url(path):
        _gfile(path).rename(tmp, path, overwrite=True)
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


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """Saves an array in `.npy` format (never pickled) atomically."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of the `.npy` header at the start of `f`.

    Raises:
      ValueError: not a `.npy` header (bad magic, unparsable, pickled objects).
    """
    version = np.lib.format.read_magic(f)
    try:
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - numpy's header parser lets tokenizer errors out
        raise ValueError(f"cannot parse the .npy header ({type(err).__name__}: {err})") from None
    if dtype.hasobject:
        raise ValueError("a pickled object array")
    return shape, fortran, dtype, f.tell()


def _check_npy_size(shape, dtype, data_bytes: int) -> None:
    expected = math.prod(int(n) for n in shape) * dtype.itemsize
    if data_bytes != expected:
        raise ValueError(
            f"{data_bytes} data bytes, the header's shape {list(shape)} {dtype} needs "
            f"{expected} (truncated?)"
        )


def load_npy(path: str, mmap: bool = False) -> np.ndarray:
    """Loads a `.npy` written by :func:`atomic_save_npy`; `mmap` only for local files.

    The header is checked against the data before anything is allocated, so a truncated file
    or a damaged header (a shape of 10^12 voxels) is a ValueError, never a huge allocation.

    Raises:
      ValueError: not a `.npy` file, or its data size is not the one its header gives.
    """
    if mmap and not is_url(path):
        with open(path, "rb") as f:
            shape, fortran, dtype, offset = npy_header(f)
        _check_npy_size(shape, dtype, os.path.getsize(path) - offset)
        order = "F" if fortran else "C"
        return np.memmap(
            path, dtype=dtype, mode="r", shape=tuple(shape), order=order, offset=offset
        )
    data = read_bytes(path)
    buf = io.BytesIO(data)
    shape, _, dtype, offset = npy_header(buf)
    _check_npy_size(shape, dtype, len(data) - offset)
    buf.seek(0)
    return np.load(buf, allow_pickle=False)


def read_json(path: str):
    """Parses a UTF-8 JSON file.

    Raises:
      ValueError: not UTF-8 (UnicodeDecodeError), not JSON (JSONDecodeError), or nested too
        deeply to parse (the RecursionError of a corrupt file, turned into a ValueError).
    """
    text = read_bytes(path).decode("utf-8")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
