"""File writers both synthetic generators share: atomic, and no-ops when nothing would change;
and the checks of a generator's arguments made before anything is written.

A file is written to a temporary name and renamed into place, so a reader never sees half a
file; a file whose bytes would not change is left untouched, so re-running a generator with the
same arguments changes nothing on disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from tf_agg3d.utils.atomic_write import atomic_write_bytes
from tf_agg3d.utils.filesystems import is_url


def check_generator_arguments(out_dir: str, count_name: str, count: int, seed: int) -> None:
    """Raises ValueError unless `out_dir` is a local folder (the writers here write local files
    only), `count` (the argument `count_name`: scans, series) is >= 1 and `seed` is >= 0."""
    if is_url(out_dir):
        raise ValueError(f"the synthetic generator writes local folders only, got {out_dir}")
    if count < 1:
        raise ValueError(f"{count_name} must be >= 1, got {count}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _same_bytes(a: str, b: str) -> bool:
    if not (os.path.exists(a) and os.path.exists(b)) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 22), fb.read(1 << 22)
            if ca != cb:
                return False
            if not ca:
                return True


def write_metaimage(
    path: str,
    array: np.ndarray,
    origin: Sequence[float],
    spacing: Sequence[float],
    direction: Sequence[float],
    compress: bool = False,
) -> None:
    """Writes a `.mhd` + `.raw` (or `.zraw` when `compress`) pair with SimpleITK, atomically.

    SimpleITK writes the pair into a private temporary folder beside `path` under the final
    names; the data file is renamed into place first and the header last, so a `.mhd` is never
    visible without its complete data file. Files whose bytes would not change are left alone.

    Args:
        path: local target path ending in `.mhd`.
        array: `[D, H, W]` (z, y, x).
        origin: (x, y, z) mm.
        spacing: (x, y, z) mm.
        direction: 9 floats, row-major.
        compress: zlib-compress the data (`.zraw`, like the LUNA16 masks).
    """
    if is_url(path) or not path.endswith(".mhd"):
        raise ValueError(f"write_metaimage needs a local .mhd path, got {path}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction))
    name = os.path.basename(path)
    data_name = name[: -len(".mhd")] + (".zraw" if compress else ".raw")
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=folder)
    try:
        sitk.WriteImage(image, os.path.join(tmp, name), useCompression=compress)
        for part in (data_name, name):  # data first, header last
            src, dst = os.path.join(tmp, part), os.path.join(folder, part)
            if not _same_bytes(src, dst):
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_if_changed(path: str, data: bytes) -> None:
    """Writes `data` to local `path` atomically, leaving a file that already holds it alone."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    atomic_write_bytes(path, data)


def write_text_if_changed(path: str, text: str) -> None:
    """:func:`write_if_changed` for UTF-8 text."""
    write_if_changed(path, text.encode("utf-8"))
