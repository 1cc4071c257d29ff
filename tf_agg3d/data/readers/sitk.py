"""Reading CT scans and lung masks with SimpleITK: LUNA16 `.mhd/.raw` and anything it reads.

Every problem with an input file raises :class:`~tf_agg3d.data.errors.DataError` naming it;
`.mhd` headers are checked against their data files first (:func:`_check_mhd`). The result is a
:class:`~tf_agg3d.data.scan.Scan` (geometry conventions: :mod:`tf_agg3d.data.scan`).

Paths may be `tf.io.gfile` URLs (``s3://``, ``gs://``; README "Object storage"): SimpleITK
reads a local temporary copy (:func:`local_copy`). A DICOM series folder is read through
tensorflow-io's in-graph decoder when it is installed
(:mod:`tf_agg3d.data.readers.dicom_tfio`), through SimpleITK otherwise; both give the same Scan.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import SimpleITK as sitk

from tf_agg3d.data.errors import DataError
from tf_agg3d.data.readers.hu import to_int16
from tf_agg3d.data.scan import Scan
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.filesystems import is_url
from tf_agg3d.utils.local_copy import local_copy

# Labels of the left and right lung in the official `seg-lungs-LUNA16` masks (5 is the trachea).
LUNA16_LUNG_LABELS = (3, 4)
SCAN_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd", ".nhdr")
# read_scan's choices for a DICOM folder: tensorflow-io when it loads, else SimpleITK; or forced.
DICOM_BACKENDS = ("auto", "sitk", "tfio")

# Bytes per element of the MetaIO element types, to check `.raw` sizes before SimpleITK reads.
_MET_ELEMENT_BYTES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 4,
    "MET_ULONG": 4,
    "MET_LONG_LONG": 8,
    "MET_ULONG_LONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def _sitk_message(err: Exception) -> str:
    """The useful part of a SimpleITK exception (its text starts with C++ source locations)."""
    text = str(err)
    if "sitk::ERROR:" in text:
        text = text.split("sitk::ERROR:", 1)[1]
    return " ".join(text.split())[:400]


def _read_mhd_header(path: str) -> dict[str, str]:
    header: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * 1024)
    except OSError as err:
        raise DataError(path, f"cannot read header ({err.strerror})") from None
    for line in raw.split(b"\n"):
        text = line.decode("latin-1").strip()
        if "=" not in text:
            continue
        key, value = text.split("=", 1)
        header[key.strip()] = value.strip()
        # Everything after ElementDataFile is pixel data (LOCAL) or nothing.
        if key.strip() == "ElementDataFile":
            break
    return header


def _numbers(path: str, header: dict[str, str], key: str, cast=float) -> list:
    try:
        return [cast(v) for v in header[key].split()]
    except ValueError:
        raise DataError(path, f"header field {key} = '{header[key]}' is not numeric") from None


def _check_mhd(path: str) -> None:
    """Checks a MetaImage header against its data file before SimpleITK reads it.

    SimpleITK reads the first prod(DimSize) elements of an over-long `.raw` without complaint,
    so a header whose dims disagree with the data would go unnoticed without this check.
    """
    header = _read_mhd_header(path)
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in header:
            raise DataError(path, f"MetaImage header lacks {key}")
    ndims = _numbers(path, header, "NDims", int)[0]
    dims = _numbers(path, header, "DimSize", int)
    if ndims != 3:
        raise DataError(path, f"expected a 3D image, header says NDims = {ndims}")
    if len(dims) != ndims or any(d <= 0 for d in dims):
        raise DataError(path, f"DimSize = {dims} does not describe a 3D grid")
    for key in ("ElementSpacing", "ElementSize"):
        if key in header:
            spacing = _numbers(path, header, key)
            if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
                raise DataError(path, f"{key} = {spacing}: spacing must be 3 values > 0")
            break
    channels = int(header.get("ElementNumberOfChannels", "1"))
    if channels != 1:
        raise DataError(path, f"expected a scalar image, got {channels} channels per voxel")
    data_file = header["ElementDataFile"]
    compressed = header.get("CompressedData", "False").lower() == "true"
    element = _MET_ELEMENT_BYTES.get(header["ElementType"])
    if data_file == "LOCAL" or data_file.startswith("LIST") or "%" in data_file:
        return  # data inside the header file or spread over many files: SimpleITK checks it
    data_path = os.path.join(os.path.dirname(path), data_file)
    if not os.path.isfile(data_path):
        raise DataError(path, f"data file '{data_path}' named by ElementDataFile is missing")
    if compressed or element is None:
        return
    expected = int(np.prod(dims)) * element * channels
    offset = int(header.get("HeaderSize", "0"))
    actual = os.path.getsize(data_path)
    if offset < 0:  # -1: the data are the last `expected` bytes of the file
        offset = max(actual - expected, 0)
    if actual - offset < expected:
        raise DataError(
            data_path,
            f"truncated: DimSize {dims} x {header['ElementType']} needs {expected} bytes, "
            f"the file holds {actual - offset} (header {path})",
        )
    if actual - offset > expected:
        raise DataError(
            path,
            f"header DimSize {dims} x {header['ElementType']} ({expected} bytes) disagrees with "
            f"the data file '{data_path}' ({actual - offset} bytes)",
        )


def _read_dicom_series(folder: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(folder)
    except RuntimeError as err:
        raise DataError(folder, f"cannot list DICOM series ({_sitk_message(err)})") from None
    if not series:
        raise DataError(folder, "no DICOM series in this folder")
    # Several series (scout, reconstructions): the one with the most slices is the CT volume.
    files = max((reader.GetGDCMSeriesFileNames(folder, s) for s in series), key=len)
    if len(files) < 2:
        raise DataError(folder, f"the DICOM series has {len(files)} slice(s); need a 3D volume")
    reader.SetFileNames(files)
    return reader.Execute()


def _read_image(path: str) -> sitk.Image:
    if os.path.isdir(path):
        try:
            return _read_dicom_series(path)
        except RuntimeError as err:
            raise DataError(path, f"cannot read DICOM series ({_sitk_message(err)})") from None
    if not os.path.isfile(path):
        raise DataError(path, "no such file")
    lower = path.lower()
    if lower.endswith(".mhd"):
        _check_mhd(path)
    try:
        return sitk.ReadImage(path)
    except RuntimeError as err:
        raise DataError(path, f"SimpleITK cannot read it ({_sitk_message(err)})") from None


def _validate_geometry(path: str, image: sitk.Image) -> None:
    dim = image.GetDimension()
    if dim != 3:
        raise DataError(path, f"expected a 3D image, got a {dim}D one of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(path, "expected a scalar image, got a multi-component (vector) one")
    size = image.GetSize()
    if min(size) < 2:
        raise DataError(path, f"size {size} (x, y, z) is not a volume: every axis needs >= 2")
    spacing = np.asarray(image.GetSpacing())
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise DataError(path, f"spacing {tuple(spacing)} must be finite and > 0")
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise DataError(path, f"direction {tuple(direction.ravel())} is not invertible")
    if not np.all(np.isfinite(image.GetOrigin())):
        raise DataError(path, f"origin {image.GetOrigin()} is not finite")


def _scan_from_image(path: str, image: sitk.Image, array: np.ndarray) -> Scan:
    return Scan(
        array=array,
        origin=np.asarray(image.GetOrigin(), dtype=np.float64),
        spacing=np.asarray(image.GetSpacing(), dtype=np.float64),
        direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        path=str(path),
    )


@contextlib.contextmanager
def _local(path: str):
    """Yields a local copy of a URL (the path itself when local); DataErrors name the URL."""
    if not is_url(path):
        yield path
        return
    try:
        with local_copy(path) as local:
            try:
                yield local
            except DataError as err:
                # Messages name the temporary copy; give the user the object they passed.
                where = os.path.dirname(local)
                message = str(err).replace(local, path).replace(where, uio.dirname(path))
                raise DataError(path, message.split(": ", 1)[-1]) from None
    except FileNotFoundError:
        raise DataError(path, "no such file or folder") from None


def _dicom_via_tfio(path: str, dicom_backend: str) -> bool:
    if dicom_backend not in DICOM_BACKENDS:
        raise ValueError(f"dicom_backend must be one of {DICOM_BACKENDS}, got {dicom_backend!r}")
    if dicom_backend == "sitk" or not uio.isdir(path):
        return False
    if dicom_backend == "tfio":
        return True
    from tf_agg3d.data.readers import dicom_tfio

    return dicom_tfio.tfio_dicom_available()


def read_scan(path: str, dicom_backend: str = "auto") -> Scan:
    """Reads and validates a CT scan.

    Args:
      path: a `.mhd` (with its `.raw`/`.zraw`), `.mha`, `.nii`, `.nii.gz`, `.nrrd` file, or a
        folder holding a DICOM series (the series with the most slices is read); local or a
        `tf.io.gfile` URL.
      dicom_backend: for a DICOM folder: "auto" (tensorflow-io's decoder when it is installed
        and loads, else SimpleITK), "sitk", or "tfio" (an ImportError naming the extra to
        install when tensorflow-io is missing).

    Returns:
      A :class:`Scan` whose array is int16 HU [D, H, W] (z, y, x). Float images are rounded;
      values outside the int16 range are clipped.

    Raises:
      DataError: naming the file, for a missing/truncated data file, header dims that disagree
        with the data, an image that is not 3D or not scalar, non-positive spacing, a singular
        direction, NaN/inf voxels, or anything SimpleITK (or the DICOM decoder) cannot read.
    """
    path = str(path)
    if _dicom_via_tfio(path, dicom_backend):
        from tf_agg3d.data.readers import dicom_tfio

        return dicom_tfio.read_dicom_series(path)
    with _local(path) as local:
        image = _read_image(local)
        _validate_geometry(local, image)
        array = to_int16(local, sitk.GetArrayFromImage(image))
    return _scan_from_image(path, image, array)


def read_lung_mask(path: str) -> Scan:
    """Reads a lung mask (LUNA16 `seg-lungs-LUNA16/<uid>.mhd` or any binary mask).

    In the official masks labels 3 and 4 are the left and right lung and 5 the trachea; when
    either lung label is present only those count, otherwise every non-zero voxel is lung.

    Returns:
      A :class:`Scan` whose array is uint8 0/1 [D, H, W] (z, y, x), with the mask's own geometry.

    Raises:
      DataError: as :func:`read_scan`, and for a mask with no lung voxel.
    """
    path = str(path)
    with _local(path) as local:
        image = _read_image(local)
        _validate_geometry(local, image)
    labels = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(labels.dtype, np.floating) and not np.isfinite(labels).all():
        raise DataError(path, "lung mask holds NaN or infinite values")
    lungs = np.isin(labels, LUNA16_LUNG_LABELS)
    if not lungs.any():
        lungs = labels != 0
    if not lungs.any():
        raise DataError(path, "lung mask is empty (no voxel labelled lung)")
    return _scan_from_image(path, image, lungs.astype(np.uint8))
