"""Path operations, listing and reading that work alike on local paths and `tf.io.gfile` URLs.

Folders on object stores are key prefixes, written the way users write them: a bucket root
(``s3://bucket``, ``gs://bucket``), with or without a trailing slash, with or without the
zero-byte "directory marker" objects some tools create. Every helper here accepts all of these
forms (:func:`fs_path` gives a bucket root the trailing slash `tf.io.gfile` needs), so callers
never special-case them. Listings skip the temporary ``.tmp-`` names that
:mod:`tf_agg3d.utils.atomic_write` stages files under.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil

from tf_agg3d.utils.filesystems import ensure_filesystem, gfile, is_url

# Prefix of the temporary files and objects an atomic write stages its bytes under.
TMP_PREFIX = ".tmp-"


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
            gfile(path).makedirs(fs_path(path))
        else:
            ensure_filesystem(path)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    if is_url(path):
        return gfile(path).exists(fs_path(path))
    return os.path.exists(path)


def isdir(path: str) -> bool:
    """True for a local folder, or a URL prefix (a bucket root too) with objects below it."""
    if is_url(path):
        return gfile(path).isdir(fs_path(path))
    return os.path.isdir(path)


def isfile(path: str) -> bool:
    """True for a local file, or a URL naming an object (not a prefix)."""
    if is_url(path):
        if is_bucket_root(path) or path.endswith("/"):
            return False
        fs = gfile(path)
        return fs.exists(path) and not fs.isdir(path)
    return os.path.isfile(path)


def getsize(path: str) -> int:
    if is_url(path):
        return int(gfile(path).stat(path).length)
    return os.path.getsize(path)


def listdir(path: str) -> list[str]:
    """Names directly below `path`, sorted, without trailing slashes and temporary ``.tmp-`` files.

    On object stores: a bucket root, a trailing slash and prefixes without directory-marker
    objects all list the same; a marker object of the prefix itself is no entry.

    Raises:
      FileNotFoundError / tf.errors.NotFoundError: `path` does not exist.
    """
    names = gfile(path).listdir(fs_path(path)) if is_url(path) else os.listdir(path)
    return sorted({n.strip("/") for n in names if n.strip("/") and not n.startswith(TMP_PREFIX)})


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
        for folder, _, files in gfile(root).walk(fs_path(root)):
            found += [join(folder, f) for f in files if f.strip("/") and f.endswith(suffix)]
    else:
        for folder, _, files in os.walk(root):
            found += [os.path.join(folder, f) for f in files if f.endswith(suffix)]
    return sorted(f for f in found if not basename(f).startswith(TMP_PREFIX))


def remove(path: str) -> None:
    if is_url(path):
        gfile(path).remove(path)
    else:
        os.unlink(path)


def copy_file(src: str, dst: str, overwrite: bool = True) -> None:
    """Copies one file between any two places (local or URL) through `tf.io.gfile`."""
    if not is_url(src) and not is_url(dst):
        shutil.copyfile(src, dst)
        return
    ensure_filesystem(src)
    gfile(dst).copy(src, dst, overwrite=overwrite)


def open_file(path: str, mode: str = "rb"):
    """``open`` for local paths, ``tf.io.gfile.GFile`` for URLs (a context manager either way)."""
    if is_url(path):
        return gfile(path).GFile(path, mode)
    return open(path, mode)  # noqa: SIM115 -- returned to the caller, who closes it


def read_bytes(path: str) -> bytes:
    if is_url(path):
        with gfile(path).GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


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
