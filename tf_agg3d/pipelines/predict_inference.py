"""The prediction's per-scan work on Beam workers: a scan's volume, then the model on it.

- :class:`LoadVolumeFn`: a :class:`~tf_agg3d.pipelines.predict_jobs.PredictJob` -> its
  preprocessed volume (:class:`ScanInput`), read from the cache or read and preprocessed as
  ``Predictor.predict_scan`` does;
- :class:`DetectSignatureHandler`: RunInference's model handler for the export's ``detect``
  signature. RunInference's stock TensorFlow handler cannot serve this model (it loads
  SavedModels through Keras, which Keras 3 no longer does, and stacks a batch into one tensor,
  while scans differ in shape), so this one loads the SavedModel with ``tf.saved_model.load``
  and calls ``detect`` once per scan;
- the dead letters of both steps as :class:`~tf_agg3d.pipelines.common.Failure` rows
  (:data:`FAILED`, :func:`inference_failures`, :func:`count_failure`): a scan that fails never
  fails the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import numpy as np

from tf_agg3d.config import PreprocessConfig
from tf_agg3d.pipelines import common
from tf_agg3d.pipelines.common import DoFn, Failure, ModelHandler
from tf_agg3d.pipelines.predict_jobs import PredictJob
from tf_agg3d.utils.filesystems import ensure_filesystem

# The tagged output of LoadVolumeFn that carries its dead letters.
FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class ScanInput:
    """A preprocessed scan on its way to the model: int16 [D, H, W] HU and its affine."""

    order: int
    volume: np.ndarray
    affine: tuple


@dataclasses.dataclass(frozen=True)
class ScanRef:
    """What a prediction keeps of its input (not the volume): its place and its affine."""

    order: int
    affine: tuple


class LoadVolumeFn(DoFn):
    """:class:`PredictJob` -> ``(uid, ScanInput)``: a cache entry read, or a scan read and
    preprocessed as ``Predictor.predict_scan`` does; a :class:`Failure` on ``failed``."""

    def __init__(self, preprocess: PreprocessConfig, threads: int | None = None):
        super().__init__()
        self.preprocess = preprocess
        self.threads = threads
        self.failed = common.counter("scans_failed")
        self.milliseconds = common.distribution("load_ms_per_scan")

    def setup(self):
        if self.threads:
            import SimpleITK as sitk

            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(self.threads)

    def process(self, job: PredictJob):
        from tf_agg3d.data import cache as cache_lib
        from tf_agg3d.data.preprocessing.cache_entry import preprocess_scan
        from tf_agg3d.data.readers import sitk as sitk_reader

        start = time.perf_counter()
        stage = "read"
        try:
            if job.source == "cache":
                meta, volume = cache_lib.read_entry(job.path, job.uid)
            else:
                scan = sitk_reader.read_scan(job.path)
                mask = sitk_reader.read_lung_mask(job.mask_path) if job.mask_path else None
                stage = "preprocess"
                volume, meta = preprocess_scan(scan, mask, self.preprocess)
                del scan, mask
            volume = np.asarray(volume)
            if volume.dtype != np.int16 or volume.ndim != 3:
                raise ValueError(
                    f"expected an int16 [D, H, W] volume, got {volume.dtype} {volume.shape}"
                )
            affine = tuple(float(v) for v in np.asarray(meta["affine"], np.float64).ravel())
        except Exception as err:  # noqa: BLE001 - one bad scan must not fail the pipeline
            self.failed.inc()
            failure = Failure(job.uid, stage, common.error_message(err))
            common.say(f"FAILED {job.uid} ({stage}): {failure.error}")
            yield common.beam.pvalue.TaggedOutput(FAILED, failure)
            return
        self.milliseconds.update(int(round((time.perf_counter() - start) * 1000)))
        yield job.uid, ScanInput(job.order, volume, affine)


class DetectSignatureHandler(ModelHandler):
    """RunInference's model handler for the export's ``detect`` signature.

    Examples are :class:`ScanInput`; each is one ``detect`` call (batches of one: scans differ
    in shape, and one scan already fills the model's window batches). Predictions are
    ``PredictionResult(ScanRef, {output: numpy array, "seconds": float})``.

    Args:
      export_dir: the SavedModel version folder (local or URL).
      threads: TensorFlow intra-op threads in this worker (None: TensorFlow's default).
    """

    def __init__(self, export_dir: str, threads: int | None = None):
        super().__init__(min_batch_size=1, max_batch_size=1)
        self.export_dir = str(export_dir)
        self.threads = threads

    def load_model(self):
        import tensorflow as tf

        if self.threads:
            # RuntimeError: TensorFlow already started in this process; it keeps its pools.
            with contextlib.suppress(RuntimeError):
                tf.config.threading.set_intra_op_parallelism_threads(self.threads)
        ensure_filesystem(self.export_dir)
        return tf.saved_model.load(self.export_dir)

    def run_inference(self, batch, model, inference_args=None):
        import tensorflow as tf
        from apache_beam.ml.inference.base import PredictionResult

        from tf_agg3d.serving import contract

        detect = model.signatures[contract.DETECT_SIGNATURE]
        results = []
        for example in batch:
            start = time.perf_counter()
            out = detect(**{contract.VOLUME_INPUT: tf.constant(example.volume)})
            inference = {k: v.numpy() for k, v in out.items()}
            inference["seconds"] = time.perf_counter() - start
            results.append(
                PredictionResult(ScanRef(example.order, example.affine), inference, self.export_dir)
            )
        return results

    def get_num_bytes(self, batch) -> int:
        return int(sum(np.asarray(example.volume).nbytes for example in batch))

    def get_metrics_namespace(self) -> str:
        return "tf_agg3d_detect"


def inference_failures(element):
    """RunInference's dead letters ``(batch, (type, repr, traceback))`` -> :class:`Failure`."""
    batch, error = element
    kind, text = error[0], error[1]
    name = getattr(kind, "__name__", str(kind))
    for key, _ in batch:
        yield Failure(str(key), "inference", " ".join(f"{name}: {text}".split()))


def count_failure(failure: Failure) -> Failure:
    """Counts and reports an inference failure as it passes (LoadVolumeFn counts its own)."""
    if failure.stage == "inference":
        common.counter("scans_failed").inc()
        common.say(f"FAILED {failure.uid} ({failure.stage}): {failure.error}")
    return failure
