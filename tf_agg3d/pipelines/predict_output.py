"""From the model's detections to the submission CSV of a Beam prediction run.

:class:`FindingsFn` maps a scan's detections to world-mm CSV rows through its affine, exactly
as ``python -m tf_agg3d.predict`` does
(:func:`tf_agg3d.inference.predictor.findings_from_detections`), and spreads the scans over
shards; :class:`WriteShardFn` writes each shard as JSON lines (beside the output, in a hidden
``.tmp-`` folder); :func:`merge_shards` writes the CSV of ``write_predictions`` (LUNA16's
columns + ``diameter_mm,rpn_score,fpr_score``, rows in input order) atomically and removes the
shards. :func:`default_failures_path` names the dead-letter CSV beside the output.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np

from tf_agg3d.pipelines import common
from tf_agg3d.pipelines.common import DoFn
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_text

MAX_SHARDS = 64


@dataclasses.dataclass(frozen=True)
class ScanRows:
    """One predicted scan: its place in the CSV, its uid and its rows (``Finding.as_row``)."""

    order: int
    uid: str
    rows: tuple


class FindingsFn(DoFn):
    """``(uid, PredictionResult)`` -> ``(shard, ScanRows)``: world-mm findings as CSV rows."""

    def __init__(self, num_shards: int):
        super().__init__()
        self.num_shards = max(1, int(num_shards))
        self.done = common.counter("scans_done")
        self.findings = common.counter("findings")
        self.milliseconds = common.distribution("detect_ms_per_scan")

    def process(self, element):
        from tf_agg3d.inference.predictor import findings_from_detections

        uid, result = element
        ref, inference = result.example, result.inference
        findings = findings_from_detections(inference, np.asarray(ref.affine).reshape(4, 4))
        rows = tuple(f.as_row(uid) for f in findings)
        seconds = float(inference["seconds"])
        self.done.inc()
        self.findings.inc(len(rows))
        self.milliseconds.update(int(round(seconds * 1000)))
        windows = int(inference.get("num_windows", -1))
        common.say(f"ok     {uid}: {windows} windows, {seconds:.1f} s, {len(rows)} findings")
        shard = zlib.crc32(uid.encode("utf-8")) % self.num_shards
        yield shard, ScanRows(ref.order, uid, rows)


def _shard_line(item: ScanRows) -> str:
    # json writes floats with repr: the merged CSV holds exactly the digits predict writes.
    return json.dumps({"order": item.order, "uid": item.uid, "rows": list(item.rows)})


class WriteShardFn(DoFn):
    """``(shard, [ScanRows])`` -> the shard file's path (JSON lines, written atomically; a
    retried bundle rewrites the same name)."""

    def __init__(self, shards_dir: str):
        super().__init__()
        self.shards_dir = shards_dir

    def process(self, element):
        shard, items = element
        items = sorted(items, key=lambda item: item.order)
        path = uio.join(self.shards_dir, f"shard-{int(shard):05d}.jsonl")
        atomic_write_text(path, "".join(_shard_line(item) + "\n" for item in items))
        yield path


def merge_shards(paths: list, out: str, shards_dir: str) -> int:
    """Writes the CSV from the shards (rows in input order), atomically; removes the shards.

    Returns:
      The number of rows written.
    """
    from tf_agg3d.data.luna16.csv_io import write_predictions

    records = []
    for path in paths:
        records += [json.loads(line) for line in uio.read_text(path).splitlines() if line]
    records.sort(key=lambda record: record["order"])
    count = write_predictions(out, [row for record in records for row in record["rows"]])
    common.remove_tree(shards_dir)
    return count


def default_failures_path(out: str) -> str:
    """``predictions.csv`` -> ``predictions_failures.csv`` (beside the output)."""
    stem = out[: -len(".csv")] if out.lower().endswith(".csv") else out
    return f"{stem}_failures.csv"
