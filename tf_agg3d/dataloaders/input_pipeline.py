"""The training input pipeline: random 3D crops from the cache, augmentation, anchor targets.

Element ``g`` of the stream (``g = 0, 1, 2, ...``) is a pure function of ``(data.seed, g)``:
a NumPy generator seeded with both draws the crop's kind, scan, centre and augmentation. Hence

- the stream is deterministic for a seed, whatever the number of parallel map calls (the map
  keeps order);
- resuming needs no iterator state: a run that stopped after ``n`` steps of global batch ``B``
  restarts the stream at element ``n * B`` (:func:`make_dataset`'s `start`), which is what the
  checkpoint's step gives;
- under tf.distribute each input pipeline ``p`` of ``P`` takes the elements ``g = i * P + p``,
  so the union over workers is the same stream as on one machine.

Crop kinds (shares from :class:`tf_agg3d.config.DataConfig`): ``positive_fraction`` of crops
are centred on a random nodule of a random training scan, jittered by up to ``jitter_mm`` per
axis (less when the crop is small, so the nodule stays inside with a margin);
``abs_fraction`` (only when an Anchor Based Sampling file is given) are centred on a stored hard
false positive, jittered the same way; the rest are centred uniformly over a random scan.
Voxels outside the scan are padded with the scan's ``fill_hu`` (sidecar), the value the
preprocessing already wrote outside the lungs, so padding looks like the rest of the
background. Anchor targets per level are computed in the pipeline with
:func:`tf_agg3d.ops.targets.assign_anchor_targets`.

Dataset elements (per replica batch ``b``):

- ``volume``: float32 [b, D, H, W, 1] HU;
- ``gt_boxes``: float32 [b, max_boxes, 4] (z, y, x, d) crop voxels, rows with d = 0 are padding;
- ``labels_<s>``: int32 [b, d, h, w, A] in {1, 0, -1} and ``deltas_<s>``: float32
  [b, d, h, w, A, 4] per stride ``s``;
- ``kind`` int32 [b] (0 random, 1 nodule, 2 hard negative), ``scan`` int32 [b] (index into the
  scan list) and ``centre`` float32 [b, 3] (cache voxels) describe the sample.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tf_agg3d.config import AnchorConfig, DataConfig
from tf_agg3d.data import cache as cache_lib
from tf_agg3d.data.errors import DataError
from tf_agg3d.data.luna16.csv_io import read_seriesuids
from tf_agg3d.dataloaders import augment
from tf_agg3d.ops.anchors import multilevel_anchors
from tf_agg3d.ops.targets import assign_anchor_targets
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.filesystems import is_url

log = logging.getLogger(__name__)

KIND_RANDOM, KIND_NODULE, KIND_HARD_NEGATIVE = 0, 1, 2
# Version tag of the Anchor Based Sampling file (written by tf_agg3d.training.abs).
ABS_FORMAT = "tf_agg3d.abs.v1"


@dataclasses.dataclass(frozen=True)
class CachedScan:
    """One cache entry as the pipeline needs it.

    Attributes:
      uid: seriesuid.
      shape: cache volume shape (D, H, W).
      subset: LUNA16 subset (0..9), -1 when the sidecar has none.
      fill_hu: padding value for out-of-volume voxels.
      nodules: float32 [N, 4] (z, y, x, d) cache voxels / mm.
      excluded: float32 [M, 4] findings that are neither nodules nor false positives.
    """

    uid: str
    shape: tuple[int, int, int]
    subset: int
    fill_hu: float
    nodules: np.ndarray
    excluded: np.ndarray


def _boxes(entries) -> np.ndarray:
    arr = np.asarray([[b["z"], b["y"], b["x"], b["d"]] for b in entries], np.float32)
    return arr.reshape(-1, 4)


def load_scans(cache_dir: str, uids: Sequence[str] | None = None) -> list[CachedScan]:
    """Reads the sidecars of `uids` (default: every entry of the cache).

    An entry whose volume is truncated or corrupt, or whose sidecar disagrees with its array,
    is left out with a warning naming the file: one damaged scan must not stop a run over
    hundreds (rerunning ``preprocess`` redoes it).

    Raises:
      DataError: a missing entry, or a malformed sidecar.
    """
    if uids is None:
        uids = cache_lib.list_uids(cache_dir)
    scans = []
    for uid in uids:
        problem = cache_lib.check_entry(cache_dir, uid)
        meta = cache_lib.read_meta(cache_dir, uid)  # a missing or malformed sidecar raises
        if problem is not None:
            log.warning("skipping cache entry %s: %s", uid, problem)
            continue
        subset = meta.get("subset")
        scans.append(
            CachedScan(
                uid=uid,
                shape=tuple(int(n) for n in meta["shape"]),
                subset=int(subset) if subset is not None else -1,
                fill_hu=float(meta["fill_hu"]),
                nodules=_boxes(meta["nodules"]),
                excluded=_boxes(meta.get("excluded", [])),
            )
        )
    return scans


def fold_split(scans: Sequence[CachedScan], fold: int) -> tuple[list[CachedScan], list[CachedScan]]:
    """LUNA16 10-fold cross-validation: fold k holds out the scans of subset k.

    Args:
      scans: every scan.
      fold: 0..9, or -1 to train on everything.

    Returns:
      (training scans, held-out scans), each in the order given.
    """
    if fold < 0:
        return list(scans), []
    return [s for s in scans if s.subset != fold], [s for s in scans if s.subset == fold]


def select_scans(
    data: DataConfig, cache_dir: str | None = None
) -> tuple[list[CachedScan], list[CachedScan]]:
    """Training and validation scans of a data config.

    Training: the cache minus the held-out fold, restricted to ``train_seriesuids`` when given.
    Validation: ``val_seriesuids`` when given, else the held-out fold. Both lists are read by
    :func:`tf_agg3d.data.luna16.csv_io.read_seriesuids` (its header rule: a first line
    ``seriesuid`` is a header).

    Raises:
      DataError: unreadable cache entries or uid lists, or no training scan left.
    """
    cache_dir = cache_dir or data.cache_dir
    scans = load_scans(cache_dir)
    train, held_out = fold_split(scans, data.fold)
    if data.train_seriesuids:
        wanted = set(read_seriesuids(data.train_seriesuids))
        train = [s for s in train if s.uid in wanted]
    if data.val_seriesuids:
        wanted = set(read_seriesuids(data.val_seriesuids))
        held_out = [s for s in scans if s.uid in wanted]
    if not train:
        raise DataError(
            cache_dir, f"no training scans left (fold {data.fold}, list {data.train_seriesuids!r})"
        )
    return train, held_out


def read_hard_negatives(path: str, uids: Sequence[str] | None = None) -> list[dict]:
    """Entries ``{"seriesuid", "z", "y", "x", "d", "score"}`` of an ABS file.

    Args:
      path: the JSON file written by ``--phase abs``.
      uids: keep only entries of these scans (None: all).

    Raises:
      DataError: missing file or wrong format.
    """
    try:
        obj = uio.read_json(path)
    except (OSError, ValueError, tf.errors.OpError) as err:
        raise DataError(path, f"cannot read the Anchor Based Sampling file ({err})") from None
    if not isinstance(obj, dict) or obj.get("format") != ABS_FORMAT:
        raise DataError(path, f"not an Anchor Based Sampling file (format != {ABS_FORMAT})")
    keep = set(uids) if uids is not None else None
    entries = []
    for i, e in enumerate(obj.get("hard_negatives", [])):
        if not all(k in e for k in ("seriesuid", "z", "y", "x", "d")):
            raise DataError(path, f"entry {i} lacks seriesuid/z/y/x/d", field="hard_negatives")
        if keep is None or e["seriesuid"] in keep:
            entries.append(e)
    return entries


class _Volumes:
    """Thread-safe lazy access to the volumes of the training scans.

    Local caches are memory-mapped: the OS page cache does the caching. Remote (`tf.io.gfile`
    URL) caches are read whole and kept in memory up to `budget_bytes`: when every training
    volume fits (their sizes are known from the sidecars), none is ever dropped, so each is
    downloaded once per run however often it is drawn; otherwise the least recently drawn ones
    are dropped to stay within the budget. A volume drawn by several map calls at once is
    downloaded once, by the first.

    Args:
      cache_dir: the cache folder.
      scans: the scans that will be drawn (for the total size).
      budget_bytes: bytes of remote volumes to keep (``data.remote_cache_bytes``).
      remote: force the remote (in-memory) behaviour; None decides by `cache_dir`.
    """

    def __init__(
        self,
        cache_dir: str,
        scans: Sequence[CachedScan],
        budget_bytes: int,
        remote: bool | None = None,
    ):
        self._dir = cache_dir
        self.remote = is_url(cache_dir) if remote is None else bool(remote)
        self.budget_bytes = int(budget_bytes)
        # Cache volumes are int16 (cache.write_entry refuses anything else).
        self.total_bytes = sum(2 * int(np.prod(s.shape)) for s in scans)
        self.fits = self.total_bytes <= self.budget_bytes
        self.downloads = 0
        self._items: dict[str, np.ndarray] = {}  # insertion order = least recently drawn first
        self._bytes = 0
        self._lock = threading.Lock()
        self._uid_locks: dict[str, threading.Lock] = {}

    def get(self, uid: str) -> np.ndarray:
        if not self.remote:
            return cache_lib.read_volume(self._dir, uid, mmap=True)
        with self._lock:
            vol = self._hit(uid)
            if vol is not None:
                return vol
            uid_lock = self._uid_locks.setdefault(uid, threading.Lock())
        with uid_lock:
            with self._lock:
                # Another map call may have downloaded it while this one waited.
                vol = self._hit(uid)
                if vol is not None:
                    return vol
            vol = cache_lib.read_volume(self._dir, uid)
            with self._lock:
                self.downloads += 1
                self._keep(uid, vol)
        return vol

    def _hit(self, uid: str) -> np.ndarray | None:
        vol = self._items.pop(uid, None)
        if vol is not None:
            self._items[uid] = vol  # now the most recently drawn
        return vol

    def _keep(self, uid: str, vol: np.ndarray) -> None:
        if vol.nbytes > self.budget_bytes:
            return  # never kept: it alone would exceed the budget
        self._items[uid] = vol
        self._bytes += vol.nbytes
        while self._bytes > self.budget_bytes:
            self._bytes -= self._items.pop(next(iter(self._items))).nbytes


class CropSampler:
    """Draws element ``g`` of the crop stream in NumPy (the body of the tf.data map).

    Args:
      data: the data config (crop size, shares, jitter, augmentation, seed).
      scans: training scans.
      cache_dir: the cache folder (default ``data.cache_dir``).
      hard_negatives: ABS entries (:func:`read_hard_negatives`); empty disables that kind.
      augment_data: False for plain crops (scale 1, no flips, no rotation).
    """

    def __init__(
        self,
        data: DataConfig,
        scans: Sequence[CachedScan],
        cache_dir: str | None = None,
        hard_negatives: Sequence[dict] = (),
        augment_data: bool = True,
    ):
        if not scans:
            raise ValueError("CropSampler needs at least one scan")
        self.data = data
        self.scans = list(scans)
        self.crop_size = tuple(int(n) for n in data.crop_size)
        self.augment = augment_data
        self._volumes = _Volumes(cache_dir or data.cache_dir, self.scans, data.remote_cache_bytes)
        index = {s.uid: i for i, s in enumerate(self.scans)}
        self._train_boxes = [self._trainable(s.nodules) for s in self.scans]
        self._nodules = [
            (i, j) for i, boxes in enumerate(self._train_boxes) for j in range(len(boxes))
        ]
        self._hard = [
            (index[e["seriesuid"]], np.asarray([e["z"], e["y"], e["x"], e["d"]], np.float64))
            for e in hard_negatives
            if e["seriesuid"] in index
        ]

    def _trainable(self, boxes: np.ndarray) -> np.ndarray:
        return boxes[boxes[:, 3] < self.data.max_train_diameter_mm]

    def volume_cache_summary(self) -> str | None:
        """One line on how a remote cache's volumes are kept (None for a local cache)."""
        vols = self._volumes
        if not vols.remote:
            return None
        gib = vols.total_bytes / 2**30
        if vols.fits:
            return (
                f"remote cache: the {len(self.scans)} training volumes ({gib:.2f} GiB) fit in "
                f"data.remote_cache_bytes; each is downloaded once"
            )
        return (
            f"remote cache: the {len(self.scans)} training volumes ({gib:.2f} GiB) exceed "
            f"data.remote_cache_bytes ({vols.budget_bytes / 2**30:.2f} GiB); the least recently "
            f"drawn are dropped and downloaded again when drawn"
        )

    @property
    def num_hard_negatives(self) -> int:
        return len(self._hard)

    def _jittered(self, rng: np.random.Generator, centre, diameter: float, scale: float):
        # Largest jitter (cache voxels) that keeps the box inside the crop with a 2-voxel margin.
        room = (min(self.crop_size) / 2.0 - 2.0) / scale - diameter / 2.0
        limit = float(np.clip(room, 0.0, self.data.jitter_mm))
        return np.asarray(centre, np.float64) + rng.uniform(-limit, limit, 3)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray]:
        """Element `index` of the stream.

        Returns:
          (float32 [D, H, W] HU crop, float32 [max_boxes, 4] boxes, kind, scan index,
          float64 [3] cache-voxel centre).
        """
        d = self.data
        rng = np.random.default_rng([int(d.seed) & 0xFFFFFFFF, int(index)])
        u = rng.random()
        if self.augment:
            transform = augment.sample_transform(rng, d.flip, d.rotate90, d.scale_range)
        else:
            transform = augment.IDENTITY
        abs_share = d.abs_fraction if self._hard else 0.0
        pos_share = d.positive_fraction if self._nodules else 0.0
        if u < abs_share:
            kind = KIND_HARD_NEGATIVE
            scan_idx, box = self._hard[int(rng.integers(len(self._hard)))]
            centre = self._jittered(rng, box[:3], float(box[3]), transform.scale)
        elif u < abs_share + pos_share:
            kind = KIND_NODULE
            scan_idx, j = self._nodules[int(rng.integers(len(self._nodules)))]
            box = self._train_boxes[scan_idx][j]
            centre = self._jittered(rng, box[:3], float(box[3]), transform.scale)
        else:
            kind = KIND_RANDOM
            scan_idx = int(rng.integers(len(self.scans)))
            centre = rng.uniform(0.0, 1.0, 3) * (np.asarray(self.scans[scan_idx].shape) - 1)
        scan = self.scans[scan_idx]
        volume = self._volumes.get(scan.uid)
        crop, boxes = augment.augmented_crop(
            volume, self._train_boxes[scan_idx], centre, self.crop_size, transform, scan.fill_hu
        )
        return crop, self._fit_boxes(boxes), kind, scan_idx, centre

    def _fit_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Keeps boxes whose centre lies in the crop; pads to ``max_boxes`` rows with zeros."""
        size = np.asarray(self.crop_size, np.float32)
        inside = np.all((boxes[:, :3] >= -0.5) & (boxes[:, :3] < size - 0.5), axis=1)
        boxes = boxes[inside][: self.data.max_boxes]
        out = np.zeros([self.data.max_boxes, 4], np.float32)
        out[: len(boxes)] = boxes
        return out


def make_dataset(
    sampler: CropSampler,
    anchors: AnchorConfig,
    batch_size: int,
    start: int = 0,
    pipeline_id: int = 0,
    num_pipelines: int = 1,
    gt_copies: int = 0,
) -> tf.data.Dataset:
    """The infinite, batched, prefetched crop stream of one input pipeline.

    Args:
      sampler: draws the crops.
      anchors: anchor strides/sizes/IoU thresholds for the targets.
      batch_size: crops per batch (per replica under tf.distribute).
      start: first element of this pipeline's stream (resume: ``step * batch_size`` per
        pipeline).
      pipeline_id: this pipeline's id (``InputContext.input_pipeline_id``).
      num_pipelines: number of input pipelines (workers).
      gt_copies: K, adds ``gt_noise`` float32 [b, max_boxes, K, 4] uniform in [-1, 1]: the
        noise of the jittered ground-truth boxes that the FPRN trains on. Drawn here, per
        element, so it is deterministic and independent of how batches are split over
        replicas (the distributed update equals the single-device one).

    Returns:
      A dataset of dicts (see the module docstring), plus ``index`` int64 [b], the elements'
      stream positions ``g``.
    """
    crop = tuple(int(n) for n in sampler.crop_size)
    data = sampler.data
    level_anchors = multilevel_anchors(crop, anchors.strides, anchors.sizes)
    max_boxes = data.max_boxes
    copies = int(gt_copies)

    def draw(g):
        vol, boxes, kind, scan, centre = sampler.sample(int(g))
        # A separate generator: the crops do not depend on the number of copies.
        noise_rng = np.random.default_rng([int(data.seed) & 0xFFFFFFFF, int(g), 1])
        noise = noise_rng.uniform(-1.0, 1.0, (max_boxes, copies, 4)).astype(np.float32)
        return vol, boxes, np.int32(kind), np.int32(scan), centre.astype(np.float32), noise

    def element(i):
        g = i * num_pipelines + pipeline_id
        vol, boxes, kind, scan, centre, noise = tf.numpy_function(
            draw,
            [g],
            (tf.float32, tf.float32, tf.int32, tf.int32, tf.float32, tf.float32),
            stateful=False,
        )
        vol = tf.ensure_shape(vol, crop)[..., None]
        boxes = tf.ensure_shape(boxes, [max_boxes, 4])
        out = {
            "volume": vol,
            "gt_boxes": boxes,
            "kind": tf.ensure_shape(kind, []),
            "scan": tf.ensure_shape(scan, []),
            "centre": tf.ensure_shape(centre, [3]),
            "index": g,
        }
        if copies:
            out["gt_noise"] = tf.ensure_shape(noise, [max_boxes, copies, 4])
        targets = assign_anchor_targets(
            boxes, level_anchors, anchors.positive_iou, anchors.negative_iou
        )
        for s, (labels, deltas) in targets.items():
            out[f"labels_{s}"] = labels
            out[f"deltas_{s}"] = deltas
        return out

    parallel = data.num_parallel_calls if data.num_parallel_calls > 0 else tf.data.AUTOTUNE
    ds = tf.data.Dataset.range(int(start), np.iinfo(np.int64).max)
    ds = ds.map(element, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.prefetch(data.prefetch if data.prefetch >= 0 else tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Our stream is already split per pipeline by element index; auto-sharding would drop data.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)


def split_targets(batch: dict) -> tuple[dict, dict]:
    """``labels_<s>`` / ``deltas_<s>`` entries of a batch as ``{stride: tensor}`` dicts."""
    labels = {int(k.split("_")[1]): v for k, v in batch.items() if k.startswith("labels_")}
    deltas = {int(k.split("_")[1]): v for k, v in batch.items() if k.startswith("deltas_")}
    return labels, deltas
