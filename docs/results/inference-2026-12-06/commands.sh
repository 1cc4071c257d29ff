#!/bin/bash
# Issue 19's timing run, 2026-12-06 21:25-21:32 UTC, on a quiet 2-core AMD EPYC (AVX512-BF16)
# VM, nothing else running (load average 0.1 before). Run from the repository root; each
# command wrote the JSON file of the same name in this folder. monai_*.json: MONAI's LUNA16
# RetinaNet, one 192x192x80 patch, timed before and after ours (../shared/peers/README.md).
export TF_ENABLE_ONEDNN_OPTS=1
PYTHONPATH=../shared/peers/tvshim ~/.cache/peers/monai/bin/python ../shared/peers/monai_retinanet_patch.py 2 > monai_1.json
.venv/bin/python bench/inference.py --path both --repeats 2 > ours_both.json
.venv/bin/python bench/inference.py --path tiles --precision float32 --skip-demo > ours_f32.json
# "before": the paths and precision main used before issue 19 (18 windows, float32)
.venv/bin/python bench/inference.py --path windows --precision float32 --skip-demo --repeats 1 > before_windows_f32.json
.venv/bin/python bench/inference.py --path tiles --skip-demo --scan-shape 340,400,400 --repeats 1 > ours_large.json
PYTHONPATH=../shared/peers/tvshim ~/.cache/peers/monai/bin/python ../shared/peers/monai_retinanet_patch.py 2 > monai_2.json
