"""The detector and what every user of a trained one shares.

- :mod:`~tf_agg3d.models.detector`, :mod:`~tf_agg3d.models.builder`: ``Agg3DDetector``,
  assembled from injected backbone, heads and proposal generator.
- :mod:`~tf_agg3d.models.whole_scan`: ``WholeScanDetector``, sliding-window detection over a
  whole scan in one graph (training's ABS and validation, predict, the SavedModel).
- :mod:`~tf_agg3d.models.checkpoints`: the model directory's layout (config.yaml, phase
  checkpoints, the latest-model pointer), written by training and read by everyone else.
- :mod:`~tf_agg3d.models.loading`: rebuilding a trained detector from its model directory.
"""
