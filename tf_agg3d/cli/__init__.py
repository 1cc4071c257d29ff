"""The command-line layer: what every ``tf_agg3d`` command shares, and the commands' bodies.

- :mod:`tf_agg3d.cli.flags`: the one flag spelling rule (``--max-marks`` and ``--max_marks``
  both work everywhere), the shared flags (``--config``, ``--set``, ``--model-dir``) and the
  quiet-by-default logging.
- :mod:`tf_agg3d.cli.exit`: the one way a command ends, with the documented statuses 0 (done),
  1 (some items failed, the others are done) and 2 (usage, configuration or input error, or a
  missing optional package), errors printed as ``kind: message`` on stderr.
- :mod:`tf_agg3d.cli.output`: the lines a command prints (results on stdout, progress and
  failed items on stderr).
- :mod:`tf_agg3d.cli.serving`: the serving commands (``agg3d-serve``, ``agg3d-client``).
- :mod:`tf_agg3d.cli.synthetic`: the synthetic dataset generators' commands.
- :mod:`tf_agg3d.cli.demo_steps`: the folders and steps the demos share.
- :mod:`tf_agg3d.cli.preprocess_steps`: the flags and body the preprocessing commands share.

A command's module defines its flags (dashed names), and its ``main(argv) -> int`` reads them
(:func:`tf_agg3d.cli.flags.values`), builds the config and calls the library; its zero-argument
``run()`` is ``tf_agg3d.cli.exit.run(main)``, the console script's target. The TensorFlow
C++ log level is set before TensorFlow is imported (:mod:`tf_agg3d.utils.verbosity`, called
from ``tf_agg3d/__init__.py`` for ``python -m`` and ``agg3d-*`` runs).

The ``python -m tf_agg3d.<command>`` modules and the ``agg3d-*`` console scripts
(``setup.cfg``) are thin entry points over these: flags -> config -> library call.
"""
