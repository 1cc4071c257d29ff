"""In-process prediction: whole scans -> world-coordinate findings (``Predictor``), on top of
:class:`tf_agg3d.models.whole_scan.WholeScanDetector` and :mod:`tf_agg3d.models.loading`."""
