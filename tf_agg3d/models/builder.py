"""build_detector: the default Agg3DDetector of a :class:`tf_agg3d.config.ModelConfig`."""

from __future__ import annotations

from tf_agg3d.backbones.dense_unet3d import DenseUNet3D
from tf_agg3d.config import ModelConfig
from tf_agg3d.heads.fpr_head import FPRHead
from tf_agg3d.heads.rpn_head import RPNHead
from tf_agg3d.layers.local_magnification import LocalMagnification, deconv_stride_of
from tf_agg3d.models.detector import Agg3DDetector


def build_detector(model_config: ModelConfig | None = None) -> Agg3DDetector:
    """The paper's detector (or a smaller one) from a config; unbuilt (weights on first call).

    DenseUNet3D backbone (every pyramid level), one :class:`RPNHead` per anchor stride (not
    shared; ``model.anchors.strides`` may be any subset of the pyramid strides, e.g. ``[4]``
    for single-scale), Local Magnification in ``fpr.magnify_mode`` with the backbone's growth
    rate and bottleneck width, and :class:`FPRHead` when ``fpr.enabled``.

    Raises:
      ConfigError: anchor strides that are not backbone strides, or not one size list each.
    """
    cfg = model_config or ModelConfig()
    # The dataclasses validate themselves when constructed; again here for one edited in place.
    for part in (cfg.anchors, cfg.fpr, cfg):
        part.__post_init__()
    bb, fpr = cfg.backbone, cfg.fpr
    magnifier = None
    if fpr.enabled and fpr.local_magnification:
        magnifier = LocalMagnification(
            channels=bb.pyramid_channels,
            num_stages=fpr.magnify_stages,
            layers_per_stage=fpr.magnify_layers_per_stage,
            growth_rate=bb.growth_rate,
            bottleneck_width=bb.bottleneck_width,
            sync_batch_norm=bb.sync_batch_norm,
            deconv_stride=deconv_stride_of(fpr.magnify_mode),
            name="local_magnification",
        )
    return Agg3DDetector(
        backbone=DenseUNet3D.from_backbone_config(bb, name="backbone"),
        rpn_heads=lambda stride, num_anchors: RPNHead(num_anchors, name=f"rpn_head_{stride}"),
        fpr_head=FPRHead(fpr.hidden_units, dropout=fpr.dropout, name="fpr_head")
        if fpr.enabled
        else None,
        anchor_config=cfg.anchors,
        proposal_config=cfg.proposals,
        fpr_config=fpr,
        local_magnification=magnifier,
        hu_window=bb.hu_window,
        name="agg3d_detector",
    )
