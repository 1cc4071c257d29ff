"""The LUNA16 folder layout: ``subset<k>/<seriesuid>.mhd`` scans and ``seg-lungs-LUNA16`` masks.

Paths may be `tf.io.gfile` URLs (``s3://``, ``gs://``; README "Object storage"): listings go
through `tf.io.gfile`. Reading the files found is :mod:`tf_agg3d.data.readers.sitk`'s job.
"""

from __future__ import annotations

import re

from tf_agg3d.data.errors import DataError
from tf_agg3d.utils import files as uio

LUNA16_MASK_DIR = "seg-lungs-LUNA16"

_SUBSET_RE = re.compile(r"^subset(\d+)$")


def find_luna16_scans(root: str, subsets=None) -> dict[str, tuple[str, int]]:
    """Finds the scans of a LUNA16 folder: ``root/subset<k>/<seriesuid>.mhd``.

    Args:
      root: the LUNA16 folder (local or a `tf.io.gfile` URL).
      subsets: iterable of subset numbers to keep, or None for all ``subset*`` folders.

    Returns:
      seriesuid -> (path of the `.mhd`, subset number), sorted by seriesuid.

    Raises:
      DataError: `root` is not a folder, or one seriesuid appears in two places.
    """
    root = str(root)
    if not uio.isdir(root):
        raise DataError(root, "LUNA16 root is not a folder")
    wanted = None if subsets is None else {int(s) for s in subsets}
    found: dict[str, tuple[str, int]] = {}
    for name in uio.listdir(root):
        match = _SUBSET_RE.match(name)
        if not match or not uio.isdir(uio.join(root, name)):
            continue
        subset = int(match.group(1))
        if wanted is not None and subset not in wanted:
            continue
        # The official zips unpack either flat or into subsetK/subsetK/: search below the folder.
        for mhd in uio.find_files(uio.join(root, name), ".mhd"):
            uid = uio.basename(mhd)[: -len(".mhd")]
            if uid in found:
                raise DataError(mhd, f"seriesuid {uid} also found at {found[uid][0]}")
            found[uid] = (mhd, subset)
    return dict(sorted(found.items()))


def find_lung_mask(root: str, uid: str) -> str | None:
    """Path of ``root/seg-lungs-LUNA16/<uid>.mhd`` (also one folder deeper), or None."""
    for candidate in (
        uio.join(root, LUNA16_MASK_DIR, f"{uid}.mhd"),
        uio.join(root, LUNA16_MASK_DIR, LUNA16_MASK_DIR, f"{uid}.mhd"),
    ):
        if uio.isfile(candidate):
            return candidate
    return None
