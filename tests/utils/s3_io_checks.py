"""Runs in a subprocess with the S3 environment: exercises tf_agg3d.utils (files, atomic writes,
``.npy``, local copies) and the readers on ``s3://``, prints one JSON object of results, then
leaves through ``exit_now``.

    python tests/utils/s3_io_checks.py BUCKET LOCAL_MHD LOCAL_DICOM_DIR
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main(bucket: str, local_mhd: str, local_dicom: str) -> dict:
    from tf_agg3d.data.errors import DataError
    from tf_agg3d.data.readers import sitk as luna16
    from tf_agg3d.utils import files as uio
    from tf_agg3d.utils.atomic_write import atomic_write_json
    from tf_agg3d.utils.filesystems import is_url
    from tf_agg3d.utils.local_copy import local_copy
    from tf_agg3d.utils.npy import atomic_save_npy, load_npy

    out: dict = {}
    base = f"s3://{bucket}/checks"
    # Atomic writes: the object appears whole, no temporary object is left beside it.
    target = uio.join(base, "deep", "a.json")
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})  # overwrite
    out["json"] = uio.read_json(target)
    out["listing"] = uio.listdir(uio.join(base, "deep"))
    atomic_save_npy(uio.join(base, "v.npy"), np.arange(6, dtype=np.int16).reshape(2, 3))
    out["npy"] = load_npy(uio.join(base, "v.npy")).tolist()
    out["isdir"] = [uio.isdir(base), uio.isdir(target), uio.isfile(target), uio.isfile(base)]
    out["find_files"] = uio.find_files(base, ".json")
    out["getsize"] = uio.getsize(target)

    # An .mhd and its .raw on S3: local_copy brings both, so SimpleITK reads it.
    mhd_name = os.path.basename(local_mhd)
    raw_name = mhd_name[: -len(".mhd")] + ".raw"
    for name in (mhd_name, raw_name):
        uio.copy_file(os.path.join(os.path.dirname(local_mhd), name), uio.join(base, "img", name))
    url = uio.join(base, "img", mhd_name)
    with local_copy(url) as local:
        out["local_copy"] = sorted(os.listdir(os.path.dirname(local)))
        out["local_copy_is_local"] = not is_url(local) and os.path.isfile(local)
    out["local_copy_cleaned"] = not os.path.exists(local)
    remote, ref = luna16.read_scan(url), luna16.read_scan(local_mhd)
    out["mhd_equal"] = bool(
        np.array_equal(remote.array, ref.array)
        and np.allclose(remote.origin, ref.origin)
        and np.allclose(remote.spacing, ref.spacing)
        and np.allclose(remote.direction, ref.direction)
    )
    out["mhd_path"] = remote.path
    # Without its .raw the header check must name the object, not the temporary copy.
    uio.remove(uio.join(base, "img", raw_name))
    try:
        luna16.read_scan(url)
        out["missing_raw"] = "no error"
    except DataError as err:
        out["missing_raw"] = str(err)
    try:
        luna16.read_scan(uio.join(base, "nothing.mhd"))
        out["missing_object"] = "no error"
    except DataError as err:
        out["missing_object"] = str(err)

    # A DICOM folder on S3: the tensorflow-io decoder reads the objects in tf.data directly,
    # SimpleITK through a local copy of the folder; both equal the local read.
    dicom_url = uio.join(base, "dicom")
    for name in os.listdir(local_dicom):
        uio.copy_file(os.path.join(local_dicom, name), uio.join(dicom_url, name))
    local_scan = luna16.read_scan(local_dicom, dicom_backend="sitk")
    for backend in ("tfio", "sitk"):
        scan = luna16.read_scan(dicom_url, dicom_backend=backend)
        out[f"dicom_{backend}_equal"] = bool(
            np.array_equal(scan.array, local_scan.array)
            and np.allclose(scan.origin, local_scan.origin, atol=1e-4)
            and np.allclose(scan.spacing, local_scan.spacing, atol=1e-4)
            and np.allclose(scan.direction, local_scan.direction, atol=1e-6)
        )
    return out


if __name__ == "__main__":
    from tf_agg3d.utils.process import exit_now

    result = main(*sys.argv[1:4])
    print("RESULT " + json.dumps(result), flush=True)
    exit_now(0)
