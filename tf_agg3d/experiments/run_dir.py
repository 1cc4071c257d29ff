"""The bookkeeping of one resumable model run: its folder, its DONE marker and its timings.

A run (a cross-validation fold, an ablation variant x seed) lives in one model directory::

  RUN/config.yaml, checkpoints/, summaries/   what ``tf_agg3d.train`` writes there
  RUN/timings.json     seconds of each stage so far (summed over resumed runs)
  RUN/predictions.csv  the held-out scans' findings (written atomically)
  RUN/DONE.json        written last, atomically: the run is finished and is skipped from then on

Everything is written with :func:`tf_agg3d.utils.atomic_write.atomic_write_json` /
``atomic_write_text``, so a run killed at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from tf_agg3d.data.errors import DataError
from tf_agg3d.utils import files as uio
from tf_agg3d.utils.atomic_write import atomic_write_json

DONE_NAME = "DONE.json"
PREDICTIONS_NAME = "predictions.csv"
TIMINGS_NAME = "timings.json"


def now() -> str:
    """The UTC time in ISO format, to the second (the ``finished`` field of markers)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class RunDir:
    """One run's folder (local or a URL) and its files.

    Args:
      path: the model directory of the run.
    """

    def __init__(self, path: str):
        self.path = str(path)

    def file(self, name: str) -> str:
        return uio.join(self.path, name)

    @property
    def done_path(self) -> str:
        return self.file(DONE_NAME)

    @property
    def predictions(self) -> str:
        return self.file(PREDICTIONS_NAME)

    def is_done(self) -> bool:
        return uio.exists(self.done_path)

    def read_done(self, required: str = "seriesuids") -> dict:
        """The DONE.json record.

        Args:
          required: a key whose value must be a list (the scans the run predicted).

        Raises:
          DataError: an unreadable marker, or one without the `required` list.
        """
        path = self.done_path
        try:
            record = uio.read_json(path)
        except (ValueError, OSError) as err:
            raise DataError(path, f"unreadable run marker ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get(required), list):
            raise DataError(path, f"run marker without a '{required}' list")
        return record

    def write_done(self, record: Mapping) -> None:
        """Writes DONE.json atomically: the last file a finished run writes."""
        atomic_write_json(self.done_path, dict(record))

    def timings(self) -> dict[str, float]:
        """Seconds of each stage so far ({} when none, or when the file is unreadable)."""
        path = self.file(TIMINGS_NAME)
        if not uio.exists(path):
            return {}
        try:
            return {str(k): float(v) for k, v in uio.read_json(path).items()}
        except (ValueError, OSError, AttributeError):
            return {}

    def add_time(self, timings: dict[str, float], key: str, seconds: float) -> None:
        """Adds `seconds` to ``timings[key]`` and writes the file (a resumed stage sums up)."""
        timings[key] = round(timings.get(key, 0.0) + seconds, 3)
        atomic_write_json(self.file(TIMINGS_NAME), timings)
