"""Preprocessing throughput: seconds per 512x512x300 scan through the full preprocess.

Builds a synthetic int16 chest CT (0.7 x 0.7 x 1.25 mm, non-zero origin): air, a body ellipse,
two lung ellipsoids with vessel-like tubes and nodules, and the matching `seg-lungs-LUNA16` mask
(labels 3/4), writes them in the LUNA16 layout, then times read -> preprocess -> cache write for
one scan with its LUNA16 mask and once more with the threshold fallback. Prints one JSON object
with wall seconds per scan (best of the repeats) and the CPU seconds of each run.

    .venv/bin/python bench/preprocess.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import SimpleITK as sitk

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.data import cache
from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
from tf_agg3d.data.preprocessing.runner import ScanJob, preprocess_one
from tf_agg3d.data.readers import sitk as sitk_reader

SHAPE_ZYX = (300, 512, 512)
SPACING_XYZ = (0.7, 0.7, 1.25)
ORIGIN_XYZ = (-179.3, -160.8, -340.5)
UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.000000000000000000000000001"


def synthetic_chest(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """(int16 HU [D, H, W], uint8 labels [D, H, W], nodules [(x, y, z, d) world mm])."""
    rng = np.random.default_rng(seed)
    d, h, w = SHAPE_ZYX
    sx, sy, sz = SPACING_XYZ
    # World-free physical coordinates (mm from the volume centre) per axis, broadcastable.
    z = ((np.arange(d) - d / 2) * sz)[:, None, None]
    y = ((np.arange(h) - h / 2) * sy)[None, :, None]
    x = ((np.arange(w) - w / 2) * sx)[None, None, :]
    body = (x / 165.0) ** 2 + (y / 120.0) ** 2 <= 1.0
    image = np.where(body, np.int16(40), np.int16(-1000)).astype(np.int16)
    image = np.broadcast_to(image, SHAPE_ZYX).copy()
    labels = np.zeros(SHAPE_ZYX, np.uint8)
    lungs_centres = ((-75.0, 3), (75.0, 4))
    for cx, label in lungs_centres:
        lung = ((x - cx) / 60.0) ** 2 + ((y + 5.0) / 85.0) ** 2 + ((z - 10.0) / 150.0) ** 2 <= 1.0
        labels[lung] = label
    image[labels > 0] = -850
    # Vessel-like tubes: bright cylinders along z inside each lung.
    for cx, _ in lungs_centres:
        for _ in range(6):
            vx, vy = cx + rng.uniform(-35, 35), rng.uniform(-50, 40)
            tube = ((x - vx) ** 2 + (y - vy) ** 2 <= 2.0**2) & (np.abs(z - 10.0) < 100.0)
            image[tube & (labels > 0)] = 30
    nodules = []
    for cx, _ in lungs_centres:
        for dz, diameter in ((-60.0, 6.0), (40.0, 14.0)):
            px, py, pz = cx + 10.0, 15.0, 10.0 + dz
            sphere = (x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2 <= (diameter / 2) ** 2
            image[sphere] = 60
            nodules.append(
                (
                    px + w / 2 * sx + ORIGIN_XYZ[0],
                    py + h / 2 * sy + ORIGIN_XYZ[1],
                    pz + d / 2 * sz + ORIGIN_XYZ[2],
                    diameter,
                )
            )
    image += rng.normal(0, 20, SHAPE_ZYX).astype(np.int16)
    return image, labels, nodules


def _write(array: np.ndarray, path: str, compress: bool) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING_XYZ)
    img.SetOrigin(ORIGIN_XYZ)
    sitk.WriteImage(img, path, useCompression=compress)


def _stages(job: ScanJob, cache_dir: str, config: PreprocessConfig) -> dict:
    times = {}
    t = time.perf_counter()
    scan = sitk_reader.read_scan(job.scan_path)
    times["read_scan"] = time.perf_counter() - t
    t = time.perf_counter()
    mask = sitk_reader.read_lung_mask(job.mask_path) if job.mask_path else None
    times["read_lung_mask"] = time.perf_counter() - t
    t = time.perf_counter()
    volume, meta = preprocess_scan(scan, mask, config, job.nodules, seriesuid=job.uid)
    times["preprocess_scan"] = time.perf_counter() - t
    t = time.perf_counter()
    cache.write_entry(cache_dir, job.uid + "-stages", volume, meta)
    times["write_entry"] = time.perf_counter() - t
    times["cache_shape"] = list(volume.shape)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = PreprocessConfig()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        image, labels, nodules = synthetic_chest()
        os.makedirs(os.path.join(tmp, "subset0"))
        os.makedirs(os.path.join(tmp, "seg-lungs-LUNA16"))
        scan_path = os.path.join(tmp, "subset0", f"{UID}.mhd")
        mask_path = os.path.join(tmp, "seg-lungs-LUNA16", f"{UID}.mhd")
        _write(image, scan_path, compress=False)
        _write(labels, mask_path, compress=True)
        del image, labels
        setup_s = time.perf_counter() - t
        cache_dir = os.path.join(tmp, "cache")
        result = {
            "scan_shape_zyx": list(SHAPE_ZYX),
            "spacing_xyz_mm": list(SPACING_XYZ),
            "setup_seconds": round(setup_s, 2),
            "cpu_count": os.cpu_count(),
            "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
            "python": platform.python_version(),
        }
        for name, mask in (("luna16_mask", mask_path), ("threshold_fallback", None)):
            job = ScanJob(UID, scan_path, 0, mask, tuple(nodules))
            runs, cpu = [], []
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                res = preprocess_one(job, cache_dir, config)
                runs.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
                if not res.ok:
                    raise SystemExit(f"preprocess failed: {res.message}")
            result[name] = {
                "seconds_per_scan": round(min(runs), 2),
                "runs": [round(r, 2) for r in runs],
                # CPU seconds of all threads: on a shared machine wall time also counts waiting.
                "cpu_seconds": [round(c, 2) for c in cpu],
                "stages": {
                    k: (round(v, 2) if isinstance(v, float) else v)
                    for k, v in _stages(job, cache_dir, config).items()
                },
                "nodules_in_sidecar": len(cache.read_meta(cache_dir, UID)["nodules"]),
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
