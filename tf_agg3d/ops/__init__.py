"""Tensor ops of the detector: anchors, box coding, IoU, targets, NMS, 3D RoI Align, and the
sliding-window grid over whole scans (:mod:`~tf_agg3d.ops.sliding_window`)."""
