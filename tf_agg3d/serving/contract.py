"""The serving contract shared by the exporter, the development server and the client.

Signature names, tensor keys, limits and the layout of a version directory live here once, so
that the SavedModel, the server that serves it and the client that calls it cannot drift apart
(``docs/serving.md``, "The export contract").
"""

from __future__ import annotations

import re

MODEL_NAME = "agg3d"

# Signature keys of the exported SavedModel.
DEFAULT_SIGNATURE = "serving_default"
DETECT_SIGNATURE = "detect"
CROP_SIGNATURE = "detect_crop"
METADATA_SIGNATURE = "metadata"

# Input and output keys.
VOLUME_INPUT = "volume"
CROPS_INPUT = "crops"
DETECT_OUTPUTS = ("boxes", "scores", "rpn_scores", "fpr_scores", "num_detections")
METADATA_OUTPUT = "metadata"

# Largest preprocessed volume one Predict call accepts, (D, H, W) voxels at 1 mm. A
# lung-cropped chest CT at 1 mm is about 300 x 250 x 350; 512 per axis leaves room for whole
# chests (uncropped DeepLesion-style inputs) while bounding the request (512^3 int16 = 256 MiB)
# and the sliding-window work of a single call.
MAX_VOLUME_SHAPE = (512, 512, 512)

# gRPC refuses messages over 4 MiB by default; one scan is tens of MiB. TF-Serving itself
# raises its own limit to INT32_MAX, so clients and the development server do the same.
MAX_MESSAGE_BYTES = 2**31 - 1

# An overloaded server answers RESOURCE_EXHAUSTED with this trailing metadata: how long to wait
# before retrying, in milliseconds (the message says it too: "retry after 0.5 s").
RETRY_AFTER_METADATA = "retry-after-ms"

# Model versions are directories named by a positive decimal integer (TF-Serving's rule).
VERSION_DIR = re.compile(r"^[0-9]+$")

# Inside a version: loaders start from saved_model.pb (so it is published last on object
# stores); assets.extra/ holds the metadata and TF-Serving's warmup requests.
SAVED_MODEL_PB = "saved_model.pb"
ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"


def is_version_dir(name: str) -> bool:
    """True for a directory name TF-Serving treats as a model version."""
    return bool(VERSION_DIR.match(name))
