"""The preprocessed-scan cache: ``CACHE/<uid>.npy`` (int16 [D, H, W]) + ``CACHE/<uid>.json``.

The sidecar's keys are listed in README "Conventions"; its ``affine`` (4x4, row-major) maps a
cache voxel (z, y, x, 1) to world (x, y, z, 1) mm. Both files are written atomically and the JSON
last, so a sidecar whose volume is readable means a complete entry. Paths may be local or
`tf.io.gfile` URLs. A missing or corrupt file raises DataError naming it: a truncated ``.npy``,
a sidecar that is not JSON or lacks a key or holds a value of the wrong type, and a sidecar whose
``shape`` disagrees with its array (:func:`read_entry`). :func:`check_entry` says what is wrong
with an entry without raising, for the batch jobs that redo or skip such entries.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np

from tf_agg3d.data.errors import DataError
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_many
from tf_agg3d.utils.npy import load_npy, npy_header

META_KEYS = (
    "affine",
    "shape",
    "nodules",
    "excluded",
    "origin",
    "spacing",
    "direction",
    "seriesuid",
    "subset",
    "lung_mask",
    "hu_window",
    "fill_hu",
    "source",
)


def volume_path(cache_dir: str, uid: str) -> str:
    return uio.join(str(cache_dir), f"{uid}.npy")


def meta_path(cache_dir: str, uid: str) -> str:
    return uio.join(str(cache_dir), f"{uid}.json")


def _show(value, limit: int = 80) -> str:
    """`value`'s repr, cut to `limit` characters (a corrupt sidecar can hold huge values)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _finite(value) -> bool:
    """A JSON number that is finite as a float (a 400-digit integer is not)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _finite_numbers(path: str, meta: dict, key: str, count: int) -> None:
    values = meta[key]
    if not (
        isinstance(values, (list, tuple))
        and len(values) == count
        and all(_finite(v) for v in values)
    ):
        raise DataError(path, f"{_show(values)} must be {count} finite numbers", field=key)


def _check_meta(path: str, meta) -> dict:
    """Checks the sidecar's keys and the types of the values readers use; returns it."""
    if not isinstance(meta, dict):
        raise DataError(path, f"sidecar is not a JSON object but {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DataError(path, f"sidecar lacks key(s) {missing}")
    try:
        affine = np.asarray(meta["affine"], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        affine = None
    if affine is None or affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(
            path, f"affine {_show(meta['affine'])} must be a finite 4x4 matrix", field="affine"
        )
    shape = meta["shape"]
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**31 for n in shape)
    ):
        raise DataError(path, f"shape {_show(shape)} must be 3 positive integers", field="shape")
    for key in ("nodules", "excluded"):
        if not isinstance(meta[key], (list, tuple)):
            raise DataError(path, f"{_show(meta[key])} must be a list", field=key)
        for box in meta[key]:
            if not (isinstance(box, dict) and all(c in box and _finite(box[c]) for c in "zyxd")):
                raise DataError(
                    path, f"entry {_show(box)} must have finite numbers z, y, x, d", field=key
                )
    subset = meta["subset"]
    if subset is not None and not (
        isinstance(subset, (int, np.integer)) and not isinstance(subset, bool)
    ):
        raise DataError(path, f"{_show(subset)} must be an integer or null", field="subset")
    if not _finite(meta["fill_hu"]):
        raise DataError(path, f"{_show(meta['fill_hu'])} must be a finite number", field="fill_hu")
    _finite_numbers(path, meta, "hu_window", 2)
    if not isinstance(meta["seriesuid"], str):
        raise DataError(path, f"{_show(meta['seriesuid'])} must be a string", field="seriesuid")
    return meta


def write_entry(cache_dir: str, uid: str, volume: np.ndarray, meta: dict) -> None:
    """Writes one scan's volume and sidecar atomically, the sidecar last.

    Args:
      cache_dir: cache folder (created if needed).
      uid: seriesuid, the file stem.
      volume: int16 [D, H, W] (z, y, x).
      meta: the sidecar (README "Conventions"); ``meta["shape"]`` must equal volume.shape.
    """
    volume = np.asarray(volume)
    if volume.dtype != np.int16 or volume.ndim != 3:
        raise ValueError(f"cache volume must be int16 [D, H, W], got {volume.dtype} {volume.shape}")
    meta = dict(meta)
    meta["shape"] = [int(n) for n in meta.get("shape", volume.shape)]
    if tuple(meta["shape"]) != volume.shape:
        raise ValueError(f"meta shape {meta['shape']} != volume shape {list(volume.shape)}")
    _check_meta(meta_path(cache_dir, uid), meta)
    uio.makedirs(str(cache_dir))
    # Both files are written to temporaries first and moved into place only when both are
    # whole: a disk that fills up part-way (atomic_write.WriteError) leaves the previous entry as it was.
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(volume), allow_pickle=False)
    sidecar = (json.dumps(meta, indent=1) + "\n").encode("utf-8")
    atomic_write_many(
        [(volume_path(cache_dir, uid), buf.getvalue()), (meta_path(cache_dir, uid), sidecar)]
    )


def read_meta(cache_dir: str, uid: str) -> dict:
    """Reads and checks ``CACHE/<uid>.json``.

    Raises:
      DataError: missing, not JSON, or lacking the README keys.
    """
    path = meta_path(cache_dir, uid)
    if not uio.exists(path):
        raise DataError(path, "cache sidecar is missing")
    try:
        meta = uio.read_json(path)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, too deeply nested
        raise DataError(path, f"cache sidecar is not valid JSON ({_cut(err)})") from None
    except OSError as err:
        raise DataError(path, f"cannot read cache sidecar ({_cut(err)})") from None
    return _check_meta(path, meta)


def _cut(err: BaseException, limit: int = 200) -> str:
    text = str(err)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_volume(cache_dir: str, uid: str, mmap: bool = False) -> np.ndarray:
    """Reads ``CACHE/<uid>.npy``.

    Args:
      mmap: memory-map instead of reading (local files only; read-only array).

    Returns:
      int16 [D, H, W] (z, y, x).

    Raises:
      DataError: missing, truncated/corrupt, pickled, or not an int16 3D array.
    """
    path = volume_path(cache_dir, uid)
    if not uio.exists(path):
        raise DataError(path, "cache volume is missing")
    try:
        volume = load_npy(path, mmap=mmap)
    except (ValueError, TypeError, OverflowError, OSError, EOFError, SyntaxError) as err:
        raise DataError(path, f"cache volume is truncated or corrupt ({_cut(err)})") from None
    if volume.dtype != np.int16 or volume.ndim != 3:
        raise DataError(
            path, f"expected an int16 [D, H, W] array, got {volume.dtype} {volume.shape}"
        )
    return volume


def read_entry(cache_dir: str, uid: str, mmap: bool = False) -> tuple[dict, np.ndarray]:
    """Reads one entry, sidecar and volume, and checks that they agree.

    Returns:
      (sidecar, int16 [D, H, W] volume).

    Raises:
      DataError: either file missing or corrupt (naming it), or the sidecar's ``shape`` is not
        the array's (naming the sidecar: the two are from different runs).
    """
    meta = read_meta(cache_dir, uid)
    volume = read_volume(cache_dir, uid, mmap=mmap)
    if list(volume.shape) != list(meta["shape"]):
        raise DataError(
            meta_path(cache_dir, uid),
            f"sidecar shape {meta['shape']} disagrees with its array {volume_path(cache_dir, uid)}"
            f" of shape {list(volume.shape)}",
            field="shape",
        )
    return meta, volume


def _npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a `.npy` header without reading the data; checks the file size."""
    size = uio.getsize(path)
    with uio.open_file(path, "rb") as f:
        shape, _, dtype, offset = npy_header(f)
    if size - offset != math.prod(int(n) for n in shape) * dtype.itemsize:
        raise ValueError(f"{size - offset} data bytes for shape {list(shape)} {dtype}")
    return shape, dtype


def check_entry(cache_dir: str, uid: str) -> str | None:
    """What is wrong with an entry: None when complete, ``"missing"`` when neither file exists,
    else a reason naming the file (truncated volume, corrupt sidecar, disagreeing shapes).

    Reads the sidecar and the `.npy` header only (the data size is checked against the header).
    """
    npy = volume_path(cache_dir, uid)
    try:
        if not uio.exists(meta_path(cache_dir, uid)) and not uio.exists(npy):
            return "missing"
        meta = read_meta(cache_dir, uid)
        if not uio.exists(npy):
            return f"{npy}: cache volume is missing"
        shape, dtype = _npy_header(npy)
    except DataError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - numpy's and the filesystems' own error types
        return f"{npy}: cache volume is truncated or corrupt ({_cut(err)})"
    if dtype != np.int16 or len(shape) != 3:
        return f"{npy}: expected an int16 [D, H, W] array, got {dtype} {list(shape)}"
    if list(shape) != list(meta["shape"]):
        return (
            f"{meta_path(cache_dir, uid)}: sidecar shape {meta['shape']} disagrees with its "
            f"array {npy} of shape {list(shape)}"
        )
    return None


def has_entry(cache_dir: str, uid: str) -> bool:
    """True when both files exist and are readable: sidecar valid, `.npy` header and size match."""
    return check_entry(cache_dir, uid) is None


def list_uids(cache_dir: str) -> list[str]:
    """Seriesuids with a sidecar and a volume in `cache_dir`, sorted ([] if it does not exist)."""
    cache_dir = str(cache_dir)
    if not uio.exists(cache_dir):
        return []
    names = set(uio.listdir(cache_dir))
    return sorted(
        n[: -len(".json")]
        for n in names
        if n.endswith(".json")
        and not n.startswith(".tmp-")
        and n[: -len(".json")] + ".npy" in names
    )


def _affine(meta: dict) -> np.ndarray:
    return np.asarray(meta["affine"], dtype=np.float64).reshape(4, 4)


def _as_points(values, what: str) -> tuple[np.ndarray, bool]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == 3:
        return arr[None], True
    if arr.ndim == 2 and arr.shape[1] == 3:
        return arr, False
    raise ValueError(f"{what}: expected shape [3] or [N, 3], got {list(arr.shape)}")


def cache_voxel_to_world(meta: dict, zyx) -> np.ndarray:
    """Cache voxel (z, y, x), [3] or [N, 3], -> world (x, y, z) mm of the same shape."""
    pts, single = _as_points(zyx, "zyx")
    a = _affine(meta)
    xyz = pts @ a[:3, :3].T + a[:3, 3]
    return xyz[0] if single else xyz


def world_to_cache_voxel(meta: dict, xyz) -> np.ndarray:
    """World (x, y, z) mm, [3] or [N, 3], -> continuous cache voxel (z, y, x) of the same shape."""
    pts, single = _as_points(xyz, "xyz")
    a = _affine(meta)
    zyx = np.linalg.solve(a[:3, :3], (pts - a[:3, 3]).T).T
    return zyx[0] if single else zyx
