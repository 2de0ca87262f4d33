"""What a model is, in words, from its config: detector, backbone, neck width, initial weights.

Used by run summaries (``summary.json``'s ``description`` fields and the final table's legend) so a
row is never just "teacher" or "student": e.g. ``TOOD (T-Head), MobileNetV2-FPN 128 ch, from
ImageNet (torchvision://mobilenet_v2)``.
"""

from __future__ import annotations

from pathlib import Path

from detectron2.config import CfgNode

#: meta-architecture -> what users call the detector (tbd's heads and Detectron2's)
DETECTORS = {
    "TOOD": "TOOD (T-Head)",
    "ETHeadDetector": "TOOD (ET-head)",
    "DWDetector": "DW",
    "FCOSDetector": "FCOS",
    "RetinaNet": "RetinaNet",
    "GeneralizedRCNN": "Faster R-CNN",
    "CoDETR": "Co-DETR",
}


def detector_name(cfg: CfgNode) -> str:
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "TBDistiller":
        arch = cfg.DISTILL.STUDENT_META_ARCHITECTURE
    return DETECTORS.get(arch, arch)


def backbone_name(cfg: CfgNode) -> str:
    """``R-18-FPN 256 ch``, ``MobileNetV2-FPN 128 ch``, or the builder's name for anything else."""
    builder = cfg.MODEL.BACKBONE.NAME
    low = builder.lower()
    if "mobilenet" in low:
        body = "MobileNetV2"
    elif "resnet" in low:
        body = f"R-{cfg.MODEL.RESNETS.DEPTH}"
    else:
        return builder
    if "fpn" in low:
        return f"{body}-FPN {cfg.MODEL.FPN.OUT_CHANNELS} ch"
    return body


def init_name(weights: str) -> str:
    """Where the weights come from: from scratch, ImageNet, or a checkpoint file."""
    if not weights:
        return "from scratch"
    if weights.startswith("torchvision://") or "ImageNetPretrained" in weights:
        return f"from ImageNet ({weights})"
    if weights.startswith(("detectron2://", "http://", "https://")):
        return f"weights {weights}"
    path = Path(weights)
    return f"weights {path.parent.name}/{path.name}" if path.parent.name else f"weights {path.name}"


def describe(cfg: CfgNode, weights: str | None = None) -> str:
    """``detector, backbone, init`` of ``cfg`` (``weights`` defaults to ``cfg.MODEL.WEIGHTS``)."""
    return ", ".join(
        (detector_name(cfg), backbone_name(cfg), init_name(cfg.MODEL.WEIGHTS if weights is None else weights))
    )
