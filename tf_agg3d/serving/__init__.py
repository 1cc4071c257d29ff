"""TF-Serving: SavedModel export, gRPC client, development server (``docs/serving.md``).

- export: :mod:`~tf_agg3d.serving.signatures` (what goes into the SavedModel),
  :mod:`~tf_agg3d.serving.publishing` (writing a version atomically),
  :mod:`~tf_agg3d.serving.models_config` (TF-Serving's ``models.config``);
- calling: :mod:`~tf_agg3d.serving.client`;
- serving without TF-Serving: :mod:`~tf_agg3d.serving.dev_server` (gRPC services) over
  :mod:`~tf_agg3d.serving.servables` (versions, loading);
- shared: :mod:`~tf_agg3d.serving.contract` (names and limits),
  :mod:`~tf_agg3d.serving.protos` (TF-Serving's protobufs), :mod:`~tf_agg3d.serving.errors`.
"""
