"""DeepLesion rows -> 3D lesions: the series frame, the small-lesion rule, merging, "large".

The conventions are in docs/deeplesion.md ("Lesions", "Merging", "Large", "Frame").
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from tf_agg3d.data.deeplesion.dl_info import DLRow
from tf_agg3d.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class DeepLesionOptions:
    """The conversion's own settings (the resampling ones are PreprocessConfig's).

    Attributes:
      large_mm: diameter from which a lesion is flagged large (paper: 48 mm).
      small_lesion_mm: long diameter below which the small-lesion rule applies.
      merge: merge multi-annotated lesions.
      merge_size_ratio: smallest diameter ratio of two annotations of one lesion.
      keep_noisy: keep rows with Possibly_noisy = 1.
      body_hu: voxels above this are "not black" for the border clipping.
      border_min_voxels: a row/column counts as non-black with at least this many such voxels.
    """

    large_mm: float = 48.0
    small_lesion_mm: float = 10.0
    merge: bool = True
    merge_size_ratio: float = 0.5
    keep_noisy: bool = False
    body_hu: float = -500.0
    border_min_voxels: int = 10


@dataclasses.dataclass(frozen=True)
class Lesion:
    """One 3D lesion in its series frame.

    Attributes:
      xyz: (x, y, z) mm in the series frame (docs/deeplesion.md "Frame").
      diameter_mm: the training/evaluation diameter (small-lesion rule applied, merged).
      long_diameter_mm: RECIST long diameter (mean over merged rows).
      box_long_side_mm: long side of the bounding box (mean over merged rows).
      lesion_type: 1..8 or -1.
      large: diameter_mm >= large_mm.
      lines: DL_info.csv lines of the rows merged into it.
      key_slices: their key slices.
    """

    xyz: tuple[float, float, float]
    diameter_mm: float
    long_diameter_mm: float
    box_long_side_mm: float
    lesion_type: int
    large: bool
    lines: tuple[int, ...]
    key_slices: tuple[int, ...]


def series_spacing(rows: Sequence[DLRow]) -> tuple[float, float, float]:
    """(pixel x, pixel y, slice interval) mm shared by the rows of one series.

    Raises:
      DataError: two rows disagree (naming the later row's line).
    """
    first = rows[0]
    ref = (*first.pixel_spacing, first.slice_interval)
    for row in rows[1:]:
        values = (*row.pixel_spacing, row.slice_interval)
        if not np.allclose(values, ref, rtol=1e-4, atol=1e-6):
            raise DataError(
                row.path,
                f"series {row.series_uid}: spacing {list(values)} differs from {list(ref)} on "
                f"line {first.line}",
                line=row.line,
                field="Spacing_mm_px_",
            )
    return ref


def series_split(rows: Sequence[DLRow]) -> int:
    """The split (1/2/3) of a series; DataError when its rows disagree."""
    for row in rows[1:]:
        if row.split != rows[0].split:
            raise DataError(
                row.path,
                f"series {row.series_uid}: split {row.split} differs from {rows[0].split} on "
                f"line {rows[0].line}",
                line=row.line,
                field="Train_Val_Test",
            )
    return rows[0].split


def row_lesion(row: DLRow, first_slice: int, options: DeepLesionOptions, spacing=None) -> Lesion:
    """The 3D lesion of one row (before merging), in the frame of a folder starting at
    `first_slice`.

    Args:
      row: the DL_info.csv row.
      first_slice: the lowest slice number present in the series folder.
      options: small-lesion and large thresholds.
      spacing: (pixel x, pixel y, interval) mm; default the row's own.
    """
    px, py, dz = spacing or (*row.pixel_spacing, row.slice_interval)
    x1, y1, x2, y2 = row.bbox
    xyz = (0.5 * (x1 + x2) * px, 0.5 * (y1 + y2) * py, (row.key_slice - first_slice) * dz)
    long_mm = row.diameters_px[0] * px
    box_mm = max((x2 - x1) * px, (y2 - y1) * py)
    diameter = _adjusted(long_mm, box_mm, options)
    return Lesion(
        xyz=tuple(float(v) for v in xyz),
        diameter_mm=diameter,
        long_diameter_mm=float(long_mm),
        box_long_side_mm=float(box_mm),
        lesion_type=row.lesion_type,
        large=diameter >= options.large_mm,
        lines=(row.line,),
        key_slices=(row.key_slice,),
    )


def _adjusted(long_mm: float, box_mm: float, options: DeepLesionOptions) -> float:
    if long_mm < options.small_lesion_mm:
        return float(min(long_mm, box_mm))
    return float(long_mm)


def _same_lesion(a: Lesion, b: Lesion, options: DeepLesionOptions) -> bool:
    dist = math.dist(a.xyz, b.xyz)
    lo, hi = sorted((a.diameter_mm, b.diameter_mm))
    return dist < 0.5 * hi and lo >= options.merge_size_ratio * hi


def merge_lesions(lesions: Sequence[Lesion], options: DeepLesionOptions) -> list[Lesion]:
    """Merges annotations of the same lesion (docs/deeplesion.md "Merging"); keeps row order.

    Groups are the connected components of the "same lesion" relation (union-find), so three
    annotations in a chain become one lesion.
    """
    n = len(lesions)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if _same_lesion(lesions[i], lesions[j], options):
                parent[root(j)] = root(i)
    groups: dict[int, list[Lesion]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(lesions[i])
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append(members[0])
            continue
        counts = collections.Counter(m.lesion_type for m in members)
        best = max(counts.values())
        lesion_type = next(m.lesion_type for m in members if counts[m.lesion_type] == best)
        diameter = float(np.mean([m.diameter_mm for m in members]))
        out.append(
            Lesion(
                xyz=tuple(float(v) for v in np.mean([m.xyz for m in members], axis=0)),
                diameter_mm=diameter,
                long_diameter_mm=float(np.mean([m.long_diameter_mm for m in members])),
                box_long_side_mm=float(np.mean([m.box_long_side_mm for m in members])),
                lesion_type=lesion_type,
                large=diameter >= options.large_mm,
                lines=tuple(line for m in members for line in m.lines),
                key_slices=tuple(k for m in members for k in m.key_slices),
            )
        )
    return out


def series_lesions(
    rows: Sequence[DLRow], first_slice: int, options: DeepLesionOptions
) -> list[Lesion]:
    """The 3D lesions of one series: noisy rows dropped (unless kept), converted, merged.

    Raises:
      DataError: rows disagree on the spacing.
    """
    spacing = series_spacing(rows)
    kept = [r for r in rows if options.keep_noisy or not r.noisy]
    lesions = [row_lesion(r, first_slice, options, spacing) for r in kept]
    return merge_lesions(lesions, options) if options.merge else lesions
