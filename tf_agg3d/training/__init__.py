"""Two-phase training under tf.distribute, and Anchor Based Sampling.

- :mod:`~tf_agg3d.training.loop`: the generic loop (distributed step, resume, checkpoints,
  signals, logging, validation cadence); knows nothing about the detector.
- :mod:`~tf_agg3d.training.detector_task`: the detector's task (phases, data, losses, the
  RPN/FPRN step); :mod:`~tf_agg3d.training.trainer` assembles the two (``Trainer``, ``train``).
- :mod:`~tf_agg3d.training.abs`: Anchor Based Sampling and the whole-scan validation.
- :mod:`~tf_agg3d.training.checks`, :mod:`~tf_agg3d.training.schedules`,
  :mod:`~tf_agg3d.training.strategy`: config checks, optimizer and learning rate, strategies.
"""
