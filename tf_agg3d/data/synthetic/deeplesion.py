r"""Synthetic DeepLesion: CT slabs with lesions of eight organ types, in the exact DeepLesion layout.

Real DeepLesion (~220 GB) is not on every machine; this writes a stand-in that the reader, the
tests and `make demo-deeplesion` use as if it were real::

    OUT/Images_png/<patient>_<study>_<series>/<NNN>.png   uint16, value = HU + 32768
    OUT/DL_info.csv                                        the official 18 columns

Each series is a body cross-section (fat rim, soft tissue, spine) of one region: chest (lungs,
mediastinal fat), abdomen (liver, kidneys, mesenteric fat) or pelvis (pelvic fat, bladder, iliac
bones), with -1000 HU air around it and -2048 HU outside a circular field of view (the "black
borders" Section V clips). Lesions are soft-edged ellipsoids whose contrast depends on the organ
they sit in (types: 1 bone lytic, 2 abdomen, 3 mediastinum, 4 liver hypodense, 5 lung,
6 kidney cyst, 7 soft tissue, 8 pelvis; about 10 % of the rows say -1, unknown). Long diameters
run from 4 mm to 60 mm, some >= 48 mm ("large"); some lesions are annotated twice (a second
RECIST measurement, possibly on the neighbouring slice and sometimes flagged Possibly_noisy).
Pixels are 0.6..0.9 mm, slice intervals 1..5 mm. Like the real data only a slab of about
+-30 mm around each key slice is written (``Slice_range``), so two lesions far apart in z leave
a gap of slice numbers in the folder.

Every row is exact: the lesion's centre lies on its key slice plane at the centre of its
bounding box, the measurement coordinates are the ends of the ellipse's long and short axes on
that slice, the box is their extent padded by 5 pixels (as DeepLesion's boxes are), and
``Lesion_diameters_Pixel_`` are the axis lengths in pixels. Pixel coordinates are (x = column,
y = row), 0-based, pixel centres at integers.

Deterministic per seed: series i draws from ``SeedSequence(seed).spawn(n)[i]``; the same
arguments give the same bytes. Files are written atomically, PNGs whose bytes would not change
are left alone, ``<NNN>.png`` files of a written series folder that the new series does not
contain are removed, and DL_info.csv is written last.

Usage (flags: :mod:`tf_agg3d.cli.synthetic`):
  python -m tf_agg3d.data.synthetic_deeplesion --out DIR --n-series N --seed S [--size 128]
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time

import numpy as np
from PIL import Image

from tf_agg3d.data.deeplesion.dl_info import DL_INFO, DL_INFO_COLUMNS, format_numbers
from tf_agg3d.data.deeplesion.slices import IMAGES_DIR, PNG_OFFSET, SLICE_RE
from tf_agg3d.data.synthetic import anatomy as anat
from tf_agg3d.data.synthetic.writers import check_generator_arguments, write_if_changed

SLICE_INTERVALS = (1.0, 1.25, 2.0, 2.5, 3.0, 5.0)
REGIONS = ("chest", "abdomen", "pelvis")
# Split of patient p (1-based) is SPLIT_CYCLE[(p - 1) % 4]: every four patients give two
# training patients, one validation and one test patient.
SPLIT_CYCLE = (1, 3, 1, 2)
HALF_SLAB_MM = 30.0
BOX_PAD_PX = 5.0
NOISE_HU = 10.0
AIR_HU, FOV_PAD_HU = -1000.0, -2048.0
WINDOWS = {5: (-1350.0, 150.0), 1: (-450.0, 1050.0)}
DEFAULT_WINDOW = (-175.0, 275.0)

# Host organs: (centre x, centre y, semi-axis x, semi-axis y) as fractions of the field of
# view, and their HU. Cylinders along z.
ORGANS = {
    "chest": {
        "lung_r": ((0.33, 0.47, 0.13, 0.19), -850.0),
        "lung_l": ((0.67, 0.47, 0.13, 0.19), -850.0),
        "mediastinum": ((0.50, 0.45, 0.05, 0.12), -90.0),
    },
    "abdomen": {
        "liver": ((0.36, 0.46, 0.16, 0.15), 60.0),
        "kidney_r": ((0.35, 0.65, 0.05, 0.07), 150.0),
        "kidney_l": ((0.65, 0.65, 0.05, 0.07), 150.0),
        "mesentery": ((0.63, 0.44, 0.12, 0.10), -80.0),
    },
    "pelvis": {
        "pelvic_fat": ((0.50, 0.50, 0.24, 0.16), -90.0),
        "bladder": ((0.50, 0.44, 0.08, 0.06), 10.0),
        "ilium_r": ((0.27, 0.56, 0.04, 0.09), 450.0),
        "ilium_l": ((0.73, 0.56, 0.04, 0.09), 450.0),
    },
}
SPINE = ((0.50, 0.72, 0.065, 0.065), 350.0)
BODY = ((0.50, 0.52, 0.42, 0.34), -100.0)  # subcutaneous fat; soft tissue inside
SOFT_TISSUE = ((0.50, 0.52, 0.385, 0.305), 40.0)
# Lesion type -> (host organs, lesion HU, largest long diameter in mm the host allows).
LESION_KINDS = {
    "chest": {
        5: (("lung_r", "lung_l"), 30.0, 60.0),
        3: (("mediastinum",), 50.0, 20.0),
        1: (("spine",), 60.0, 10.0),
        7: (("body",), 45.0, 20.0),
    },
    "abdomen": {
        4: (("liver",), 0.0, 60.0),
        6: (("kidney_r", "kidney_l"), 0.0, 14.0),
        2: (("mesentery",), 45.0, 30.0),
        1: (("spine",), 60.0, 10.0),
    },
    "pelvis": {
        8: (("pelvic_fat",), 45.0, 60.0),
        1: (("ilium_r", "ilium_l"), 60.0, 14.0),
        7: (("body",), 45.0, 20.0),
    },
}
LARGE_HOSTS = {"chest": 5, "abdomen": 4, "pelvis": 8}


@dataclasses.dataclass(frozen=True)
class TrueLesion:
    """A drawn lesion in its series frame (x = column * px, y = row * px, z from the first slice).

    Attributes:
      xyz: centre (x, y, z) mm.
      long_mm, short_mm: in-plane axis lengths on the key slice (the RECIST diameters).
      lesion_type: 1..8 (the type drawn; a row may still say -1).
      key_slice: slice number of its key slice.
      rows: DL_info.csv rows written for it (2 for a multi-annotated lesion).
    """

    xyz: tuple[float, float, float]
    long_mm: float
    short_mm: float
    lesion_type: int
    key_slice: int
    rows: int


@dataclasses.dataclass(frozen=True)
class SyntheticSeries:
    """One generated series: its folder name, slices (number -> uint16 [H, W]), rows, truth."""

    uid: str
    slices: dict[int, np.ndarray]
    rows: list[dict]
    lesions: list[TrueLesion]
    split: int
    region: str


def _ellipse_mask(shape_hw, px: float, spec, fov: float) -> np.ndarray:
    (cx, cy, ax, ay), _ = spec
    h, w = shape_hw
    y = (np.arange(h) * px)[:, None]
    x = (np.arange(w) * px)[None, :]
    return ((x - cx * fov) / (ax * fov)) ** 2 + ((y - cy * fov) / (ay * fov)) ** 2 <= 1.0


def _host_spec(region: str, host: str):
    if host == "spine":
        return SPINE
    if host == "body":
        return BODY
    return ORGANS[region][host]


def _sample_in_host(rng, region: str, host: str, fov: float, radius: float) -> np.ndarray | None:
    (cx, cy, ax, ay), _ = _host_spec(region, host)
    if host == "body":
        # The fat rim between the body outline and the soft tissue (soft-tissue lesions).
        angle = rng.uniform(0, 2 * np.pi)
        rx = 0.5 * (BODY[0][2] + SOFT_TISSUE[0][2]) * fov
        ry = 0.5 * (BODY[0][3] + SOFT_TISSUE[0][3]) * fov
        return np.array([cx * fov + rx * np.cos(angle), cy * fov + ry * np.sin(angle)])
    # Inside the host, the lesion's radius away from its edge when the host is large enough.
    sx = max(ax * fov - radius, 0.3 * ax * fov)
    sy = max(ay * fov - radius, 0.3 * ay * fov)
    r, t = np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    return np.array([cx * fov + sx * r * np.cos(t), cy * fov + sy * r * np.sin(t)])


def _draw_background(shape, px: float, fov: float, region: str) -> np.ndarray:
    d, h, w = shape
    plane = np.full((h, w), AIR_HU, np.float32)
    plane[_ellipse_mask((h, w), px, BODY, fov)] = BODY[1]
    plane[_ellipse_mask((h, w), px, SOFT_TISSUE, fov)] = SOFT_TISSUE[1]
    for spec in ORGANS[region].values():
        plane[_ellipse_mask((h, w), px, spec, fov)] = spec[1]
    plane[_ellipse_mask((h, w), px, SPINE, fov)] = SPINE[1]
    y = (np.arange(h) * px)[:, None] - 0.5 * (h - 1) * px
    x = (np.arange(w) * px)[None, :] - 0.5 * (w - 1) * px
    plane[x**2 + y**2 > (0.5 * fov * 0.97) ** 2] = FOV_PAD_HU
    return np.repeat(plane[None], d, axis=0)


def _recist_row(
    centre_px, long_px, short_px, angle, rng=None, jitter_px: float = 0.0
) -> tuple[list[float], list[float], list[float]]:
    """Measurement coordinates (8), box (4, padded) and diameters (2) of an in-plane ellipse."""
    u = np.array([np.cos(angle), np.sin(angle)])
    v = np.array([-np.sin(angle), np.cos(angle)])
    ends = [
        centre_px - 0.5 * long_px * u,
        centre_px + 0.5 * long_px * u,
        centre_px - 0.5 * short_px * v,
        centre_px + 0.5 * short_px * v,
    ]
    if jitter_px and rng is not None:
        ends = [e + rng.uniform(-jitter_px, jitter_px, 2) for e in ends]
    pts = np.asarray(ends)
    measurement = [round(float(c), 4) for e in ends for c in e]
    long_len = float(np.linalg.norm(pts[1] - pts[0]))
    short_len = float(np.linalg.norm(pts[3] - pts[2]))
    # The box is symmetric about the true centre so that its centre is the lesion's centre.
    half = np.abs(pts - centre_px).max(axis=0) + BOX_PAD_PX
    box = [centre_px[0] - half[0], centre_px[1] - half[1]]
    box += [centre_px[0] + half[0], centre_px[1] + half[1]]
    box = [round(float(c), 4) for c in box]
    return measurement, box, [round(long_len, 4), round(short_len, 4)]


def make_series(rng: np.random.Generator, index: int, patient: int, study: int, size: int):
    """Draws series `index` (its region cycles chest/abdomen/pelvis).

    Returns:
      A :class:`SyntheticSeries`.
    """
    region = REGIONS[index % len(REGIONS)]
    split = SPLIT_CYCLE[(patient - 1) % len(SPLIT_CYCLE)]
    px = round(float(rng.uniform(0.6, 0.9)), 6)
    dz = float(SLICE_INTERVALS[int(rng.integers(len(SLICE_INTERVALS)))])
    fov = size * px
    half = int(round(HALF_SLAB_MM / dz))
    kinds = LESION_KINDS[region]
    n_lesions = int(rng.integers(1, 4))
    # Plan lesions: type, size, in-plane centre, z offset (mm from the first key slice).
    plans = []
    for j in range(n_lesions):
        if j == 0 and index % 4 == 2:
            ltype = LARGE_HOSTS[region]
            long_mm = float(rng.uniform(50.0, 56.0))
        else:
            ltype = int(rng.choice(sorted(kinds)))
            u = rng.uniform()
            long_mm = float(rng.uniform(4.0, 9.5) if u < 0.3 else rng.uniform(10.0, 40.0))
            if j == 0 and index % 4 == 1:
                # This lesion is read twice (below): big enough for the second reading.
                long_mm = max(long_mm, 12.0)
        hosts, lesion_hu, max_mm = kinds[ltype]
        long_mm = min(long_mm, max_mm) if long_mm < 48.0 else long_mm
        short_mm = long_mm * float(rng.uniform(0.6, 0.9))
        host = hosts[int(rng.integers(len(hosts)))]
        for _ in range(50):
            centre = _sample_in_host(rng, region, host, fov, 0.5 * long_mm)
            zoff = float(rng.uniform(0.0, 60.0)) if j else 0.0
            zoff = round(zoff / dz) * dz
            ok = all(
                np.linalg.norm([*(centre - q["centre"]), zoff - q["zoff"]])
                > 0.5 * (long_mm + q["long_mm"]) + 3.0
                for q in plans
            )
            if ok:
                break
        else:
            continue
        plans.append(
            dict(
                ltype=ltype,
                long_mm=long_mm,
                short_mm=short_mm,
                centre=centre,
                zoff=zoff,
                hu=lesion_hu,
                angle=float(rng.uniform(0, np.pi)),
            )
        )
    base = half + int(rng.integers(2, 40))
    keys = [base + int(round(p["zoff"] / dz)) for p in plans]
    # Readings per lesion: (key slice, endpoint jitter px, Possibly_noisy). A second reading
    # has jittered endpoints and, when slices are thin, the neighbouring key slice (the centre
    # then moves by one interval, well inside a lesion of >= 8 mm); about half are flagged noisy.
    readings = []
    for j, (p, key) in enumerate(zip(plans, keys, strict=True)):
        reads = [(key, 0.0, 0)]
        if p["long_mm"] >= 8.0 and (rng.uniform() < 0.3 or (j == 0 and index % 4 == 1)):
            shift = int(rng.choice([-1, 1])) if dz <= 2.5 else 0
            reads.append((key + shift, 0.6, int(rng.uniform() < 0.5)))
        readings.append(reads)
    needed = sorted(
        {n for reads in readings for k, _, _ in reads for n in range(k - half, k + half + 1)}
    )
    first, last = needed[0], needed[-1]
    shape = (last - first + 1, size, size)
    hu = _draw_background(shape, px, fov, region)
    spacing = (px, px, dz)
    lesions = []
    for p, key in zip(plans, keys, strict=True):
        a, b = 0.5 * p["long_mm"], 0.5 * p["short_mm"]
        c = float(rng.uniform(b, a))
        angle = p["angle"]
        rotation = np.array(
            [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1]]
        )
        xyz = np.array([p["centre"][0], p["centre"][1], (key - first) * dz])
        anat.paint_ellipsoid(hu, spacing, xyz, (a, b, c), rotation, p["hu"], edge_mm=1.0)
        lesions.append((p, key, xyz))
    hu += rng.normal(0.0, NOISE_HU, hu.shape).astype(np.float32)
    values = np.clip(np.rint(hu) + PNG_OFFSET, 0, 65535).astype(np.uint16)
    slices = {n: values[n - first] for n in needed}

    uid = f"{patient:06d}_{study:02d}_01"
    gender = "MF"[int(rng.integers(2))]
    age = int(rng.integers(20, 86))
    zn_base = {"chest": 0.3, "abdomen": 0.55, "pelvis": 0.8}[region]
    rows, truth = [], []
    for (p, key, xyz), reads in zip(lesions, readings, strict=True):
        centre_px = xyz[:2] / px
        for k_slice, jitter, noisy in reads:
            measurement, box, diam = _recist_row(
                centre_px, p["long_mm"] / px, p["short_mm"] / px, p["angle"], rng, jitter
            )
            ltype = -1 if rng.uniform() < 0.1 else p["ltype"]
            window = WINDOWS.get(p["ltype"], DEFAULT_WINDOW)
            location = [
                round(float(xyz[0] / fov), 6),
                round(float(xyz[1] / fov), 6),
                round(zn_base + 0.002 * (k_slice - first) * dz, 6),
            ]
            rows.append(
                {
                    "File_name": f"{uid}_{k_slice:03d}.png",
                    "Patient_index": patient,
                    "Study_index": study,
                    "Series_ID": 1,
                    "Key_slice_index": k_slice,
                    "Measurement_coordinates": format_numbers(measurement),
                    "Bounding_boxes": format_numbers(box),
                    "Lesion_diameters_Pixel_": format_numbers(diam),
                    "Normalized_lesion_location": format_numbers(location),
                    "Coarse_lesion_type": ltype,
                    "Possibly_noisy": noisy,
                    "Slice_range": f"{k_slice - half}, {k_slice + half}",
                    "Spacing_mm_px_": format_numbers([px, px, dz]),
                    "Image_size": f"{size}, {size}",
                    "DICOM_windows": format_numbers(window),
                    "Patient_gender": gender,
                    "Patient_age": age,
                    "Train_Val_Test": split,
                }
            )
        truth.append(
            TrueLesion(
                xyz=tuple(float(v) for v in xyz),
                long_mm=float(p["long_mm"]),
                short_mm=float(p["short_mm"]),
                lesion_type=int(p["ltype"]),
                key_slice=int(key),
                rows=len(reads),
            )
        )
    return SyntheticSeries(uid, slices, rows, truth, split, region)


def _png_bytes(plane: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(plane, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def generate_dataset(
    out_dir: str, n_series: int, seed: int = 0, size: int = 128, verbose: bool = False
) -> dict:
    """Writes `n_series` synthetic DeepLesion series under `out_dir`.

    Args:
      out_dir: local output folder (Images_png/ and DL_info.csv are created in it).
      n_series: number of series folders (>= 1). Every fifth series is a second study of the
        previous patient (same split, as the official splits are per patient).
      seed: >= 0.
      size: pixels per slice side (real DeepLesion: 512).
      verbose: print one line per series.

    Returns:
      A summary dict: ``out_dir``, ``uids``, ``splits`` (uid -> 1/2/3), ``rows``, ``lesions``
      (uid -> list of :class:`TrueLesion`), ``large`` (lesions >= 48 mm), ``duplicated``
      (lesions with two rows), ``seconds``.
    """
    check_generator_arguments(out_dir, "n_series", n_series, seed)
    if size < 64:
        raise ValueError(f"size must be >= 64 pixels, got {size}")
    start = time.time()
    children = np.random.SeedSequence(seed).spawn(n_series)
    all_rows, lesions, splits = [], {}, {}
    patient, study = 0, 1
    for i in range(n_series):
        if i % 5 == 4:
            study += 1
        else:
            patient, study = patient + 1, 1
        series = make_series(np.random.default_rng(children[i]), i, patient, study, size)
        folder = os.path.join(out_dir, IMAGES_DIR, series.uid)
        os.makedirs(folder, exist_ok=True)
        wanted = {f"{n:03d}.png" for n in series.slices}
        for name in os.listdir(folder):
            if SLICE_RE.match(name) and name not in wanted:
                os.unlink(os.path.join(folder, name))
        for number, plane in series.slices.items():
            write_if_changed(os.path.join(folder, f"{number:03d}.png"), _png_bytes(plane))
        all_rows.extend(series.rows)
        lesions[series.uid] = series.lesions
        splits[series.uid] = series.split
        if verbose:
            print(
                f"[{i + 1}/{n_series}] {series.uid} {series.region} split={series.split} "
                f"slices={len(series.slices)} lesions={len(series.lesions)} rows={len(series.rows)}",
                flush=True,
            )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(DL_INFO_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(all_rows)
    write_if_changed(os.path.join(out_dir, DL_INFO), buf.getvalue().encode("utf-8"))
    flat = [les for items in lesions.values() for les in items]
    return {
        "out_dir": out_dir,
        "uids": list(lesions),
        "splits": splits,
        "rows": len(all_rows),
        "lesions": lesions,
        "large": sum(les.long_mm >= 48.0 for les in flat),
        "duplicated": sum(les.rows > 1 for les in flat),
        "seconds": time.time() - start,
    }
