"""Where an experiment's ground truth comes from: the annotation CSVs of a preprocessed cache.

Looked for in order (:func:`annotation_files`): the files given; ``CACHE/annotations.csv`` (and
``annotations_excluded.csv``); the LUNA16 root the cache was made from (the sidecars' ``source``
is ``ROOT/subsetN/<uid>.mhd``; the CSVs where ``tf_agg3d.preprocess`` looks); else both are
written from the sidecars' nodules and excluded findings (world mm, through each entry's affine)
into ``OUT/evaluation/``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_text

EVALUATION_DIR = "evaluation"


def _first(root: str, locations: Sequence[str]) -> str:
    for rel in locations:
        path = uio.join(root, rel)
        if uio.isfile(path):
            return path
    return ""


def luna_root(cache_dir: str, uids: Sequence[str]) -> str:
    """The LUNA16 root of the cache's first scan (``ROOT/subsetN/<uid>.mhd``), or ""."""
    from tf_agg3d.data import cache as cache_lib

    if not uids:
        return ""
    source = str(cache_lib.read_meta(cache_dir, uids[0]).get("source") or "")
    parent = uio.dirname(source)
    if re.fullmatch(r"subset\d", uio.basename(parent) or ""):
        return uio.dirname(parent)
    return ""


def annotations_from_sidecars(
    cache_dir: str, uids: Sequence[str], out_dir: str, excluded: str = "", log=print
) -> dict:
    """Writes the sidecars' nodules and excluded findings of `uids` as LUNA16 CSVs (world mm)."""
    import numpy as np

    from tf_agg3d.data import cache as cache_lib

    header = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
    text = {"nodules": header, "excluded": header}
    for uid in uids:
        meta = cache_lib.read_meta(cache_dir, uid)
        for key in text:
            boxes = meta[key]
            if not boxes:
                continue
            zyx = np.asarray([[b["z"], b["y"], b["x"]] for b in boxes], np.float64)
            xyz = cache_lib.cache_voxel_to_world(meta, zyx)
            for (x, y, z), box in zip(xyz, boxes, strict=True):
                text[key] += f"{uid},{x!r},{y!r},{z!r},{float(box['d'])!r}\n"
    out = uio.join(out_dir, EVALUATION_DIR)
    uio.makedirs(out)
    paths = {
        "annotations": uio.join(out, "annotations_from_cache.csv"),
        "excluded": uio.join(out, "annotations_excluded_from_cache.csv"),
    }
    atomic_write_text(paths["annotations"], text["nodules"])
    atomic_write_text(paths["excluded"], text["excluded"])
    log(
        "no annotations.csv given or found beside the cache or its LUNA16 root: evaluating "
        f"against the cache sidecars' nodules, written to {paths['annotations']}"
    )
    return {
        "annotations": paths["annotations"],
        "excluded": excluded or paths["excluded"],
        "source": "cache sidecars",
    }


def annotation_files(
    cache_dir: str,
    uids: Sequence[str],
    out_dir: str,
    annotations: str = "",
    excluded: str = "",
    log: Callable[[str], None] = print,
) -> dict:
    """The annotation files of an evaluation: given, else what the cache provides.

    Args:
      cache_dir: the preprocessed cache.
      uids: its scans the evaluation covers (the sidecars of the last resort).
      out_dir: the experiment's output folder (``OUT/evaluation/`` for written CSVs).
      annotations, excluded: the files given ("" for none).
      log: line printer.

    Returns:
      ``{"annotations": path, "excluded": path or "", "source": how they were found}``.
    """
    if annotations:
        return {"annotations": annotations, "excluded": excluded or "", "source": "given"}
    from tf_agg3d.data.preprocessing.runner import ANNOTATION_LOCATIONS, EXCLUDED_LOCATIONS

    found = _first(cache_dir, ANNOTATION_LOCATIONS[:1])
    if found:
        excl = excluded or _first(cache_dir, EXCLUDED_LOCATIONS[:1])
        return {"annotations": found, "excluded": excl, "source": "cache"}
    root = luna_root(cache_dir, uids)
    if root:
        found = _first(root, ANNOTATION_LOCATIONS)
        if found:
            excl = excluded or _first(root, EXCLUDED_LOCATIONS)
            return {"annotations": found, "excluded": excl, "source": f"luna16 root {root}"}
    return annotations_from_sidecars(cache_dir, uids, out_dir, excluded, log)
