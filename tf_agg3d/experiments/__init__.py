"""Experiments built from the training, inference and evaluation libraries.

Modules: ``crossval`` (LUNA16 10-fold cross-validation: one model per held-out subset, the
folds' predictions pooled into one FROC; ``python -m tf_agg3d.crossval``).
"""
