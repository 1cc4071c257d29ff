"""Which filesystem a path lives on, and loading the TensorFlow plugin that opens it.

Paths are local paths or ``scheme://...`` URLs that `tf.io.gfile` opens. ``s3://`` (and
``az://``) exist only once ``tensorflow_io`` is imported, which :func:`ensure_filesystem` does,
with an error that names the extra to install when it is missing. ``gs://`` and ``hdfs://`` are
also built into TensorFlow; tensorflow-io is imported for them when it is installed, and not
required.
"""

from __future__ import annotations

import functools

IO_EXTRA_HINT = "pip install tf_agg3d[io]"
# Schemes that only tensorflow-io's plugins provide; the others TensorFlow also handles itself.
_TFIO_ONLY_SCHEMES = frozenset({"s3", "az"})
_TFIO_OPTIONAL_SCHEMES = frozenset({"gs", "hdfs", "viewfs", "har"})


class MissingExtraError(ImportError):
    """A feature needs an optional package that is not installed; the message says what to do."""


def is_url(path: str) -> bool:
    """True for `scheme://...` paths handled by `tf.io.gfile` (s3, gs, hdfs, ...)."""
    return "://" in str(path)


def scheme(path: str) -> str:
    """The URL scheme in lower case (``"s3"``), or ``""`` for a local path."""
    path = str(path)
    return path.split("://", 1)[0].lower() if is_url(path) else ""


def import_tensorflow_io(feature: str):
    """Imports and returns ``tensorflow_io``.

    Args:
      feature: what needs it, for the error message.

    Raises:
      MissingExtraError: tensorflow-io is not installed or does not load against this TensorFlow.
    """
    try:
        import tensorflow_io
    except ImportError as err:
        raise MissingExtraError(
            f"{feature} needs tensorflow-io, which is not installed: {IO_EXTRA_HINT} "
            f"(tensorflow-io 0.37 loads with TensorFlow 2.16; see README) [{err}]"
        ) from None
    return tensorflow_io


@functools.cache
def tensorflow_io_available() -> bool:
    """True when ``import tensorflow_io`` succeeds."""
    try:
        import_tensorflow_io("probe")
    except ImportError:
        return False
    return True


@functools.cache
def _ensure_scheme(name: str) -> None:
    if name in _TFIO_ONLY_SCHEMES:
        # Importing tensorflow_io registers its filesystems (s3, az, ...) with tf.io.gfile.
        import_tensorflow_io(f"{name}:// paths")
    elif name in _TFIO_OPTIONAL_SCHEMES and tensorflow_io_available():
        import_tensorflow_io(f"{name}:// paths")


def ensure_filesystem(path: str) -> None:
    """Makes `tf.io.gfile` able to open `path` (imports tensorflow-io for s3/gs/hdfs URLs).

    Local paths need nothing. ``s3://`` and ``az://`` need tensorflow-io; ``gs://`` and
    ``hdfs://`` use tensorflow-io's plugins when it is installed and TensorFlow's own otherwise.

    Raises:
      MissingExtraError: the scheme needs tensorflow-io and it is not installed.
    """
    name = scheme(path)
    if name:
        _ensure_scheme(name)


def ensure_filesystems(*paths: str | None) -> None:
    """:func:`ensure_filesystem` for each path given; ``None`` and ``""`` (unset flags) are skipped.

    Entry points call it on every path flag before any work, so a missing tensorflow-io is
    reported once, up front, instead of after minutes of model loading.

    Raises:
      MissingExtraError: a path's scheme needs tensorflow-io and it is not installed.
    """
    for path in paths:
        if path:
            ensure_filesystem(str(path))


def gfile(path: str):
    """`tf.io.gfile`, with the filesystem of `path` registered."""
    ensure_filesystem(path)
    # Imported on first use, so that local-only work never loads TensorFlow through here.
    import tensorflow as tf

    return tf.io.gfile
