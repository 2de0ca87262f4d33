"""Detectron2's FCOS, buildable from a YAML config (0.6 ships it as a LazyConfig only)."""

from __future__ import annotations

from detectron2.config import CfgNode as CN
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead


def add_fcos_config(cfg: CN) -> None:
    """Add ``MODEL.FCOS.*`` (defaults follow Detectron2's LazyConfig ``fcos_R_50_FPN_1x``)."""
    cfg.MODEL.FCOS = CN()
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.FCOS.NUM_CONVS = 4
    cfg.MODEL.FCOS.NORM = "GN"
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6


@META_ARCH_REGISTRY.register()
class FCOSDetector(FCOS):
    """``MODEL.META_ARCHITECTURE: "FCOSDetector"``: Detectron2's own FCOS, built from ``cfg``."""

    def __init__(self, cfg: CN) -> None:
        backbone = build_backbone(cfg)
        fc = cfg.MODEL.FCOS
        shapes = backbone.output_shape()
        in_shapes = [shapes[f] for f in fc.IN_FEATURES]
        channels = in_shapes[0].channels
        head = FCOSHead(
            input_shape=in_shapes,
            conv_dims=[channels] * fc.NUM_CONVS,
            num_classes=fc.NUM_CLASSES,
            prior_prob=fc.PRIOR_PROB,
            norm=fc.NORM,
        )
        super().__init__(
            backbone=backbone,
            head=head,
            head_in_features=list(fc.IN_FEATURES),
            num_classes=fc.NUM_CLASSES,
            center_sampling_radius=fc.CENTER_SAMPLING_RADIUS,
            focal_loss_alpha=fc.FOCAL_LOSS_ALPHA,
            focal_loss_gamma=fc.FOCAL_LOSS_GAMMA,
            test_score_thresh=fc.SCORE_THRESH_TEST,
            test_topk_candidates=fc.TOPK_CANDIDATES_TEST,
            test_nms_thresh=fc.NMS_THRESH_TEST,
            max_detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
        )
