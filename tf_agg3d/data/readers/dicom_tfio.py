"""Reads a CT DICOM series folder with tensorflow-io's DCMTK ops inside a `tf.data` pipeline.

A series folder holds one file per slice. :func:`slice_dataset` decodes every file in parallel
(`tfio.image.decode_dicom_data` for the header, `tfio.image.decode_dicom_image` for the pixels)
and turns the pixels into HU in the graph; :func:`read_dicom_series` then orders the slices by
Image Position (Patient) along the slice normal (the cross product of the Image Orientation row
and column cosines), never by file name, checks that none is missing, and returns the same
:class:`~tf_agg3d.data.scan.Scan` that SimpleITK's ImageSeriesReader gives for the folder:

* spacing x, y from Pixel Spacing (row spacing, column spacing) = (y, x);
* spacing z = |IPP(last) - IPP(first)| / (n - 1), as ITK computes it;
* origin = IPP of the first slice in that order; direction columns = row, column, normal.

Why HU need a small inversion: DCMTK's ``DicomImage`` applies the modality transform (Rescale
Slope/Intercept) and then, with no VOI window set, stretches the *possible* modality range
``[abs_min, abs_max]`` (from Bits Stored, Pixel Representation, slope and intercept) linearly
onto ``[0, 2**depth)``: ``out = floor((hu - abs_min) * 2**depth / (abs_max - abs_min + 1))``,
``depth`` being DCMTK's ``rangeToBits(abs_min, abs_max)``. That map has a gain >= 1, so each
output value holds exactly one integer HU, recovered here exactly. Integer slope and intercept
(what CT scanners write) give exact HU; with a fractional slope DCMTK itself rounds the modality
values to integers, so values can differ from SimpleITK's float ones by up to 1 HU.

Files whose name starts with "." and DICOMDIR index files are ignored; every other file in the
folder must be a decodable single-frame greyscale DICOM image. Files of other series (a scout,
a second reconstruction) are left out: the series with the most slices is read, as the
SimpleITK path does. tensorflow-io is imported lazily; without it the functions here raise an
ImportError that names the extra to install (``pip install tf_agg3d[io]``).

Paths may be local folders or `tf.io.gfile` URLs (``s3://``, ``gs://``): the bytes are read with
``tf.io.read_file`` inside the pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from tf_agg3d.data.errors import DataError
from tf_agg3d.data.readers.hu import to_int16
from tf_agg3d.data.scan import Scan
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.filesystems import ensure_filesystem, import_tensorflow_io

# (DICOM tag, name used below), in the order decode_dicom_data returns them.
_TAGS = (
    (0x0020000E, "series_uid"),  # Series Instance UID
    (0x00200032, "position"),  # Image Position (Patient)
    (0x00200037, "orientation"),  # Image Orientation (Patient)
    (0x00280030, "pixel_spacing"),  # Pixel Spacing: row spacing \ column spacing
    (0x00281053, "slope"),  # Rescale Slope
    (0x00281052, "intercept"),  # Rescale Intercept
    (0x00280101, "bits_stored"),
    (0x00280103, "pixel_representation"),  # 0 unsigned, 1 two's complement
    (0x00080060, "modality"),
)
_TAG_INDEX = {name: i for i, (_, name) in enumerate(_TAGS)}

# Relative deviation of one slice step from the median step that is still "uniform".
_STEP_TOLERANCE = 0.1


def _tfio():
    return import_tensorflow_io("reading DICOM series with tensorflow-io")


@functools.cache
def tfio_dicom_available() -> bool:
    """True when tensorflow-io imports and its DICOM ops load against this TensorFlow.

    Its shared library is loaded lazily, and on a TensorFlow newer than the one it was built for
    it fails with undefined symbols only then; touching the op here finds that out once.
    """
    try:
        from tensorflow_io.python.ops import core_ops

        _ = core_ops.io_decode_dicom_image
    except Exception:  # ImportError, NotImplementedError, tf.errors.NotFoundError (bad ABI)
        return False
    return True


def list_series_files(folder: str) -> list[str]:
    """Candidate slice files of a series folder: every plain file but hidden ones and DICOMDIR."""
    names = [
        n
        for n in uio.listdir(folder)
        if not n.startswith(".") and n.upper() != "DICOMDIR" and not n.endswith("/")
    ]
    files = [uio.join(folder, n) for n in sorted(names)]
    return [f for f in files if not uio.isdir(f)]


# --------------------------------------------------------------------------------------------
# The tf.data pipeline
# --------------------------------------------------------------------------------------------


def _number(tf, text, default: float):
    """First backslash-separated value of a DICOM string tag as float64 (default when empty)."""
    first = tf.strings.split(tf.strings.strip(text), "\\")[0]
    first = tf.strings.strip(first)
    return tf.cond(
        tf.strings.length(first) > 0,
        lambda: tf.strings.to_number(first, tf.float64),
        lambda: tf.constant(default, tf.float64),
    )


def _bits(tf, value, pos):
    """DCMTK's ``tobits(value, pos)``: bits needed for ``value - pos`` (at least 1), int64."""
    value = tf.where(value > 0, value - pos, value)
    bits = tf.zeros([], tf.int64)

    def body(v, b):
        return tf.bitwise.right_shift(v, 1), b + 1

    _, bits = tf.while_loop(lambda v, b: v > 0, body, (value, bits))
    return tf.maximum(bits, 1)


def _range_to_bits(tf, abs_min, abs_max):
    """DCMTK's ``DicomImageClass::rangeToBits`` for the modality range (float64 in, int64 out)."""
    neg = tf.cast(tf.abs(abs_min), tf.int64)
    pos = tf.cast(tf.abs(abs_max), tf.int64)
    signed_min = _bits(tf, neg, 1) + 1
    signed_max = _bits(tf, pos, 0) + 1
    unsigned = _bits(tf, tf.cast(abs_max, tf.int64), 0)
    return tf.where(
        abs_min < 0,
        tf.where(tf.abs(abs_min) > tf.abs(abs_max), signed_min, signed_max),
        unsigned,
    )


def _to_hu(tf, out, tags):
    """Inverts DCMTK's rendering of the modality values (module docstring) to HU, float64."""
    slope = _number(tf, tags[_TAG_INDEX["slope"]], 1.0)
    intercept = _number(tf, tags[_TAG_INDEX["intercept"]], 0.0)
    bits_stored = _number(tf, tags[_TAG_INDEX["bits_stored"]], 16.0)
    signed = _number(tf, tags[_TAG_INDEX["pixel_representation"]], 0.0) > 0
    two = tf.constant(2.0, tf.float64)
    stored_min = tf.where(signed, -tf.pow(two, bits_stored - 1), tf.zeros([], tf.float64))
    stored_max = tf.where(signed, tf.pow(two, bits_stored - 1) - 1, tf.pow(two, bits_stored) - 1)
    a, b = stored_min * slope + intercept, stored_max * slope + intercept
    abs_min, abs_max = tf.minimum(a, b), tf.maximum(a, b)
    depth = _range_to_bits(tf, abs_min, abs_max)
    scale = (abs_max - abs_min + 1) / tf.pow(two, tf.cast(depth, tf.float64))
    # out = floor((hu - abs_min) / scale) with scale <= 1: hu is the one integer in
    # [abs_min + out * scale, abs_min + (out + 1) * scale); the epsilon absorbs rounding.
    return tf.math.ceil(abs_min + out * scale - 1e-6)


def _decode(tf, tfio, path):
    contents = tf.io.read_file(path)
    tag_ids = tf.constant([t for t, _ in _TAGS], tf.uint32)
    tags = tfio.image.decode_dicom_data(contents, tag_ids)
    # float64 + "preserve" keeps DCMTK's output integers exactly (up to 2**53); "skip" turns an
    # undecodable file into an empty tensor so the caller can name the file.
    raw = tfio.image.decode_dicom_image(
        contents, on_error="skip", scale="preserve", dtype=tf.float64
    )
    # The op declares a 4-D result but returns [0] for a file it cannot read, so the shape is
    # only taken when there are pixels (a zero shape stands for "nothing decoded").
    decoded = tf.size(raw) > 0
    shape = tf.cond(
        decoded,
        lambda: tf.shape(raw, out_type=tf.int64),
        lambda: tf.zeros([4], tf.int64),
    )
    ok = tf.logical_and(decoded, tf.logical_and(shape[0] == 1, shape[3] == 1))
    hu = tf.cond(
        ok,
        lambda: _to_hu(tf, tf.reshape(raw, shape[1:3]), tags),
        lambda: tf.zeros([0, 0], tf.float64),
    )
    return {"path": path, "tags": tags, "hu": hu, "ok": ok, "decoded_shape": shape}


def slice_dataset(files, parallel_calls: int | None = None):
    """A `tf.data.Dataset` of decoded slices, one element per file, in the order of `files`.

    Args:
      files: paths (local or `tf.io.gfile` URLs) of DICOM files.
      parallel_calls: decode parallelism (default ``tf.data.AUTOTUNE``).

    Returns:
      A dataset of dicts: ``path`` (string), ``tags`` (string [9]: Series Instance UID, Image
      Position, Image Orientation, Pixel Spacing, Rescale Slope, Rescale Intercept, Bits
      Stored, Pixel Representation, Modality, as written), ``hu`` (float64 [rows, cols], HU with
      the rescale applied; [0, 0] when ``ok`` is false), ``ok`` (bool: the file decoded to one
      greyscale frame) and ``decoded_shape`` (int64, the decoder's [frames, rows, cols,
      samples], or zeros when it could not read the file).

    Raises:
      ImportError: tensorflow-io is missing (the message names the extra to install).
    """
    tfio = _tfio()
    import tensorflow as tf

    for f in files:
        ensure_filesystem(f)
    calls = tf.data.AUTOTUNE if parallel_calls is None else parallel_calls
    data = tf.data.Dataset.from_tensor_slices(tf.constant(list(files), tf.string))
    return data.map(
        lambda p: _decode(tf, tfio, p), num_parallel_calls=calls, deterministic=True
    ).prefetch(1)


# --------------------------------------------------------------------------------------------
# Assembling the volume
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Slice:
    path: str
    series_uid: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    hu: np.ndarray


def _floats(path: str, text: str, name: str, count: int) -> np.ndarray:
    parts = [p.strip() for p in text.split("\\") if p.strip()]
    try:
        values = np.asarray([float(p) for p in parts], dtype=np.float64)
    except ValueError:
        raise DataError(path, f"{name} = '{text}' is not numeric") from None
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise DataError(path, f"{name} = '{text}': expected {count} finite numbers")
    return values


def _slice_from(element: dict) -> _Slice:
    path = element["path"].decode("utf-8", "replace")
    if not element["ok"]:
        shape = [int(n) for n in element["decoded_shape"]]
        if shape[0] > 1:
            problem = f"a multi-frame image ({shape[0]} frames); expected one slice per file"
        elif shape[3] > 1:
            problem = f"a colour image ({shape[3]} samples per pixel); expected greyscale CT"
        else:
            problem = (
                "tensorflow-io cannot decode an image from it (not a DICOM image, no pixel "
                "data, or a transfer syntax its DCMTK lacks); SimpleITK may read the series: "
                "dicom_backend='sitk'"
            )
        raise DataError(path, problem)
    tags = [t.decode("utf-8", "replace").strip() for t in element["tags"]]

    def tag(name):
        return tags[_TAG_INDEX[name]]

    for name, label in (
        ("position", "Image Position (Patient) (0020,0032)"),
        ("orientation", "Image Orientation (Patient) (0020,0037)"),
        ("pixel_spacing", "Pixel Spacing (0028,0030)"),
    ):
        if not tag(name):
            raise DataError(path, f"lacks {label}; cannot place the slice in the world")
    return _Slice(
        path=path,
        series_uid=tag("series_uid"),
        position=_floats(path, tag("position"), "Image Position (Patient)", 3),
        orientation=_floats(path, tag("orientation"), "Image Orientation (Patient)", 6),
        pixel_spacing=_floats(path, tag("pixel_spacing"), "Pixel Spacing", 2),
        hu=element["hu"],
    )


def _check_steps(folder: str, ordered: list[_Slice], along: np.ndarray) -> None:
    steps = np.diff(along)
    for k, step in enumerate(steps):
        if step < 1e-4:
            raise DataError(
                folder,
                f"two slices at the same position {along[k]:.4f} mm along the normal: "
                f"{ordered[k].path} and {ordered[k + 1].path}",
            )
    median = float(np.median(steps))
    for k, step in enumerate(steps):
        if abs(step - median) <= _STEP_TOLERANCE * median + 1e-3:
            continue
        missing = int(round(step / median)) - 1
        what = (
            f"{missing} slice(s) missing"
            if missing >= 1 and abs(step - (missing + 1) * median) <= _STEP_TOLERANCE * median
            else "non-uniform slice spacing"
        )
        raise DataError(
            folder,
            f"{what}: a gap of {step:.3f} mm along the slice normal between "
            f"{os.path.basename(ordered[k].path)} (at {along[k]:.3f} mm) and "
            f"{os.path.basename(ordered[k + 1].path)} (at {along[k + 1]:.3f} mm); the other "
            f"slices are {median:.3f} mm apart",
        )


def read_dicom_series(folder: str, parallel_calls: int | None = None):
    """Reads a CT DICOM series folder through tensorflow-io (module docstring).

    Args:
      folder: local folder or `tf.io.gfile` URL holding one file per slice.
      parallel_calls: decode parallelism of the pipeline (default AUTOTUNE).

    Returns:
      A :class:`~tf_agg3d.data.scan.Scan`: int16 HU [D, H, W] (z, y, x) with origin, spacing
      and direction as SimpleITK's ImageSeriesReader reports them for the same folder.

    Raises:
      DataError: naming the file or the folder, for a file the decoder cannot read, a
        multi-frame or colour image, missing or non-numeric geometry tags, slices of different
        size or orientation, two slices at one position, a missing slice (naming the gap), or
        fewer than two slices.
      ImportError: tensorflow-io is missing (the message names the extra to install).
    """
    folder = str(folder)
    if not uio.isdir(folder):
        raise DataError(folder, "not a folder (a DICOM series is read from its folder)")
    files = list_series_files(folder)
    if not files:
        raise DataError(folder, "no DICOM series in this folder (no files)")
    slices = [_slice_from(e) for e in slice_dataset(files, parallel_calls).as_numpy_iterator()]
    by_series: dict[str, list[_Slice]] = {}
    for s in slices:
        by_series.setdefault(s.series_uid, []).append(s)
    # Several series (scout, reconstructions): the one with the most slices is the CT volume.
    series = max(by_series.values(), key=len)
    if len(series) < 2:
        raise DataError(folder, f"the DICOM series has {len(series)} slice(s); need a 3D volume")
    first = series[0]
    for s in series[1:]:
        if np.abs(s.orientation - first.orientation).max() > 1e-4:
            raise DataError(
                s.path,
                f"Image Orientation {tuple(s.orientation)} differs from {tuple(first.orientation)}"
                f" in {first.path}; one series must share one orientation",
            )
        if s.hu.shape != first.hu.shape:
            raise DataError(
                s.path, f"slice size {s.hu.shape} differs from {first.hu.shape} in {first.path}"
            )
        if np.abs(s.pixel_spacing - first.pixel_spacing).max() > 1e-4:
            raise DataError(
                s.path,
                f"Pixel Spacing {tuple(s.pixel_spacing)} differs from "
                f"{tuple(first.pixel_spacing)} in {first.path}",
            )
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 1e-3:
        raise DataError(first.path, f"Image Orientation {tuple(first.orientation)} is degenerate")
    along = np.asarray([s.position @ normal for s in series])
    order = np.argsort(along, kind="stable")
    ordered = [series[i] for i in order]
    _check_steps(folder, ordered, along[order])
    # ITK's ImageSeriesReader: inter-slice spacing = first-to-last distance / (n - 1).
    extent = float(np.linalg.norm(ordered[-1].position - ordered[0].position))
    spacing = np.asarray(
        [first.pixel_spacing[1], first.pixel_spacing[0], extent / (len(ordered) - 1)]
    )
    if not np.all(spacing > 0):
        raise DataError(folder, f"spacing {tuple(spacing)} must be > 0")
    volume = np.stack([s.hu for s in ordered])
    return Scan(
        array=to_int16(folder, volume),
        origin=ordered[0].position.copy(),
        spacing=spacing,
        direction=np.stack([row, col, normal], axis=1),
        path=folder,
    )
