r"""Input pipeline throughput against training speed: does tf.data keep the model fed?

Measures crops/s of the training pipeline (random / nodule crops, augmentation, anchor targets,
parallel map, prefetch) and, on the same config, train steps/s of the RPN phase; prints one
JSON line. ``pipeline_headroom`` = (crops/s) / (crops the model consumes per second); above 1
the model never waits for data.

Usage:
  python bench/input_pipeline.py [--config configs/demo_cpu.yaml] [--cache DIR] \
      [--batches 20] [--steps 10] [--set key=value ...]

Without --cache, four synthetic LUNA16 scans (the demo's generator) are generated and
preprocessed into a temporary folder, so the benchmark runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _synthetic_cache(work: str, n_scans: int = 4) -> str:
    """Generates and preprocesses a small synthetic LUNA16 (the demo's data) under `work`."""
    raw, cache = os.path.join(work, "luna16"), os.path.join(work, "cache")
    for args in (
        ["tf_agg3d.data.synthetic", "--out", raw, "--n-scans", str(n_scans), "--seed", "0"],
        ["tf_agg3d.preprocess", "--luna-root", raw, "--out", cache],
    ):
        subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo_cpu.yaml")
    parser.add_argument("--cache", default=None)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()

    import tensorflow as tf

    from tf_agg3d.config import load_config
    from tf_agg3d.dataloaders import input_pipeline as pipeline
    from tf_agg3d.training.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="bench_input_")
    cache = args.cache or _synthetic_cache(tmp)
    config = load_config(args.config, [f"data.cache_dir={cache}", "train.phase=rpn", *args.set])
    scans, _ = pipeline.select_scans(config.data)
    batch = config.data.batch_size

    sampler = pipeline.CropSampler(config.data, scans)
    ds = pipeline.make_dataset(sampler, config.model.anchors, batch)
    it = iter(ds)
    next(it)  # warm-up: first map call, memory maps opened
    start = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    crops_per_s = args.batches * batch / (time.perf_counter() - start)

    trainer = Trainer(
        config,
        os.path.join(tmp, "model"),
        tf.distribute.OneDeviceStrategy("/cpu:0"),
        log=lambda _: None,
    )
    trainer.setup()
    iterator = trainer.make_iterator(0)
    trainer.train_steps(iterator, 2)  # tracing
    start = time.perf_counter()
    trainer.train_steps(iterator, args.steps)
    steps_per_s = args.steps / (time.perf_counter() - start)

    print(
        json.dumps(
            {
                "config": args.config,
                "crop_size": list(config.data.crop_size),
                "batch_size": batch,
                "num_parallel_calls": config.data.num_parallel_calls,
                "crops_per_s": round(crops_per_s, 2),
                "train_steps_per_s": round(steps_per_s, 3),
                "crops_consumed_per_s": round(steps_per_s * batch, 2),
                "pipeline_headroom": round(crops_per_s / (steps_per_s * batch), 2),
                "device": "GPU" if tf.config.list_logical_devices("GPU") else "CPU",
            }
        )
    )


if __name__ == "__main__":
    main()
