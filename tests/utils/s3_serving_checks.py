"""Runs in a subprocess with the S3 environment: loads an exported version back from a bucket.

Prints one ``RESULT {json}`` line: the metadata signature's version, the ``detect`` outputs on
the given volume, the versions the development server's manager sees (a version prefix without
``saved_model.pb`` must be skipped), and the state it loads the newest one into. It also
publishes two small fake versions over each other under SCRATCH_BASE through the export's
object-store path (the replace case, without the minute a real export takes) and reports the
objects and contents left. Leaves through ``exit_now`` (tf_agg3d/utils/process.py).

    python tests/utils/s3_serving_checks.py MODEL_BASE VOLUME_NPY SCRATCH_BASE
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np


def _publish_fake(files: dict, model_base: str) -> None:
    """Publishes `files` ({relative path: text}) as version 1 of `model_base`, replacing it."""
    from tf_agg3d.serving import publishing

    with tempfile.TemporaryDirectory() as local:
        for rel, text in files.items():
            path = os.path.join(local, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        final = f"{model_base}/1"
        publishing._publish_to_object_store(local, final, model_base, 1)


def _replace_checks(scratch_base: str) -> dict:
    import tensorflow as tf

    from tf_agg3d.utils import files as uio

    model_base = uio.join(scratch_base, "agg3d")
    old = {"saved_model.pb": "old graph", "variables/a": "old a", "variables/b": "old b"}
    new = {"saved_model.pb": "new graph", "variables/a": "new a", "assets.extra/m": "new m"}
    _publish_fake(old, model_base)
    _publish_fake(new, model_base)
    found = {}
    for folder, _, names in tf.io.gfile.walk(model_base):
        for name in names:
            path = uio.join(folder, name)
            found[path[len(model_base) + 1 :]] = uio.read_text(path)
    return {"objects": found}


def main(model_base: str, volume_npy: str, scratch_base: str) -> dict:
    import tensorflow as tf

    from tf_agg3d.serving.servables import ModelManager
    from tf_agg3d.utils import files as uio
    from tf_agg3d.utils.filesystems import ensure_filesystem

    ensure_filesystem(model_base)
    manager = ModelManager(model_base)
    on_disk = manager._on_disk()
    manager.refresh()
    newest = manager._versions[on_disk[-1]]
    loaded = tf.saved_model.load(uio.join(model_base, "agg3d", str(on_disk[-1])))
    meta = json.loads(loaded.signatures["metadata"]()["metadata"].numpy())
    volume = tf.constant(np.load(volume_npy))
    out = loaded.signatures["detect"](volume=volume)
    return {
        "on_disk": on_disk,
        "state": int(newest.state),
        "error": newest.error,
        "version": meta["version"],
        "checkpoint": meta["checkpoint"],
        "detect": {k: v.numpy().tolist() for k, v in out.items()},
        "replace": _replace_checks(scratch_base),
    }


if __name__ == "__main__":
    from tf_agg3d.utils.process import exit_now

    print("RESULT " + json.dumps(main(*sys.argv[1:])), flush=True)
    exit_now(0)
