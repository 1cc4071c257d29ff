"""Local copies of remote scans, for readers that open local files only (SimpleITK).

An object is copied to a temporary folder together with what it needs beside it: an ``.mhd``
header with the ``.raw``/``.zraw`` data file it names, or a whole DICOM folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from tf_agg3d.utils.files import (
    basename,
    copy_file,
    dirname,
    exists,
    isdir,
    join,
    listdir,
    read_bytes,
)
from tf_agg3d.utils.filesystems import is_url


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
