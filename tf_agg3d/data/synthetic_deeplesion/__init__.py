"""Holds the ``python -m tf_agg3d.data.synthetic_deeplesion`` entry point only."""
