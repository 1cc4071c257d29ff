"""Apache Beam batch jobs: the cache preprocessing and whole-scan prediction at scale.

- :mod:`tf_agg3d.pipelines.preprocess`: LUNA16 -> the cache, one element per scan, with the
  functions and the cache entries of ``python -m tf_agg3d.preprocess``;
- :mod:`tf_agg3d.pipelines.predict`: RunInference on an exported SavedModel's ``detect``
  signature -> the submission CSV of ``python -m tf_agg3d.predict``; its steps are
  ``predict_jobs`` (which scans), ``predict_model`` (which SavedModel), ``predict_inference``
  (a scan's volume, then ``detect``) and ``predict_output`` (the rows, shards and the CSV);
- :mod:`tf_agg3d.pipelines.common`: the runner defaults, the dead-letter file, the counters.

Both run on any Beam runner (the DirectRunner on the local cores by default; Dataflow, Flink,
Spark: README "Batch jobs on Apache Beam"). ``apache-beam`` is an optional extra
(``pip install 'tf_agg3d[beam]'``): these modules import without it, and the commands say what
to install. Their command lines are in :mod:`tf_agg3d.cli.pipelines`.

This package imports neither job module, so that ``python -m tf_agg3d.pipelines.<job>`` runs
the module once as ``__main__`` and once under its own name (the name Beam's workers unpickle
its DoFns by).
"""
