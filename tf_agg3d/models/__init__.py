"""The detector and what every user of a trained one shares.

- :mod:`~tf_agg3d.models.detector`, :mod:`~tf_agg3d.models.builder`: ``Agg3DDetector``,
  assembled from injected backbone, heads and proposal generator.
- :mod:`~tf_agg3d.models.whole_scan`: ``WholeScanDetector``, detection over a whole scan in
  tiles or sliding windows, in one graph (training's ABS and validation, predict, the
  SavedModel).
- :mod:`~tf_agg3d.models.windowed_scan`, :mod:`~tf_agg3d.models.scan_proposals`,
  :mod:`~tf_agg3d.models.tiled_backbone`, :mod:`~tf_agg3d.models.inference_backbone`,
  :mod:`~tf_agg3d.models.receptive_field`: its sliding-window and tiled paths.
- :mod:`~tf_agg3d.models.checkpoints`: the model directory's layout (config.yaml, phase
  checkpoints, the latest-model pointer), written by training and read by everyone else.
- :mod:`~tf_agg3d.models.loading`: rebuilding a trained detector from its model directory.
"""
