"""Experiments built from the training, inference and evaluation libraries.

Commands: ``crossval`` (LUNA16 10-fold cross-validation: one model per held-out subset, the
folds' predictions pooled into one FROC; ``python -m tf_agg3d.crossval``) and ``ablation``
(paper Tables II and III: every variant of a suite x seed trained on the training subsets and
scored on the held-out ones, with paired bootstrap differences; ``python -m tf_agg3d.ablate``;
suites in ``ablation_suites``, report in ``ablation_report``).

Shared parts: ``plan`` (fold and stage grammar, a model's training steps), ``run_dir`` (a run's
folder, DONE marker, timings), ``model_run`` (train the steps, predict held-out scans),
``annotation_sources`` (the ground-truth CSVs of a cache), ``scoring`` (per-branch FROC, the
match of some scans), ``paired_bootstrap`` (FROC differences over the same scans),
``processes`` (runs as parallel subprocesses), ``crossval_table`` (the per-fold table).
"""
