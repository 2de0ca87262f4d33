"""``MODEL.AUX_HEADS.*``: the training-only auxiliary heads (names, weights, per-head options)."""

from __future__ import annotations

from detectron2.config import CfgNode as CN

#: auxiliary heads tbd can build (the order of ``NAMES`` is the order they run in)
AUX_HEAD_NAMES = ("atss", "rcnn")

#: Co-DETR's lambda_2 for the encoder-side auxiliary heads: the starting weight of every head
DEFAULT_AUX_WEIGHT = 2.0

#: where each student meta-architecture keeps its class count
_CLASS_SECTIONS = {
    "RetinaNet": "RETINANET",
    "FCOSDetector": "FCOS",
    "TOOD": "TOOD",
    "ETHeadDetector": "ETHEAD",
    "DWDetector": "DW",
}


def add_aux_heads_config(cfg: CN) -> None:
    """Add ``MODEL.AUX_HEADS.*`` (off by default: ``NAMES`` empty). See docs/HEADS.md."""
    a = cfg.MODEL.AUX_HEADS = CN()
    a.NAMES = []  # subset of ["atss", "rcnn"]; empty = no auxiliary head
    a.WEIGHTS = []  # one loss weight per name; empty = 2.0 each (Co-DETR's lambda_2)
    a.NUM_CLASSES = 0  # 0 = the student's class count

    a.ATSS = CN()
    a.ATSS.NUM_CONVS = 1  # convs of each tower (class, box); Co-DETR's ATSS head uses 1
    a.ATSS.NORM = "GN"
    a.ATSS.PRIOR_PROB = 0.01
    a.ATSS.TOPK = 9  # candidates per level and GT (nearest prior centres)
    a.ATSS.ANCHOR_SCALE = 8.0  # side of the one square prior per location, in strides
    a.ATSS.CLS_LOSS = "focal"  # "focal" (ATSS, Co-DETR) or "qfl" (soft target = IoU of the predicted box)
    a.ATSS.FOCAL_ALPHA = 0.25  # focal only
    a.ATSS.FOCAL_GAMMA = 2.0
    a.ATSS.CLS_LOSS_WEIGHT = 1.0
    a.ATSS.GIOU_LOSS_WEIGHT = 2.0
    a.ATSS.CENTERNESS = True  # centerness branch (BCE) and centerness-weighted GIoU, as ATSS
    a.ATSS.CENTERNESS_LOSS_WEIGHT = 1.0
    # dense [B, G_chunk, A] work per chunk of GTs in the assignment (as MODEL.TAL.MAX_CHUNK_ELEMENTS)
    a.ATSS.MAX_CHUNK_ELEMENTS = 2**22

    a.RCNN = CN()  # Detectron2's RPN + StandardROIHeads (FastRCNNConvFCHead) on the same levels
    a.RCNN.ANCHOR_SCALE = 8.0  # RPN anchor size = ANCHOR_SCALE x stride per level (32..512 on P2-P6)
    a.RCNN.ASPECT_RATIOS = [0.5, 1.0, 2.0]
    a.RCNN.RPN_BATCH_SIZE_PER_IMAGE = 256
    a.RCNN.RPN_PRE_NMS_TOPK_TRAIN = 2000  # per level
    a.RCNN.RPN_POST_NMS_TOPK_TRAIN = 1000  # per image
    a.RCNN.BATCH_SIZE_PER_IMAGE = 512  # sampled RoIs per image
    a.RCNN.POSITIVE_FRACTION = 0.25
    a.RCNN.POOLER_RESOLUTION = 7
    a.RCNN.NUM_FC = 2
    a.RCNN.FC_DIM = 1024
    a.RCNN.BBOX_REG_LOSS_TYPE = "giou"  # Co-DETR: GIoU on decoded boxes; Detectron2's default: smooth_l1
    a.RCNN.BBOX_REG_LOSS_WEIGHT = 10.0  # Co-DETR's weight for GIoU normalised by all sampled RoIs


def aux_head_weights(cfg: CN) -> list[tuple[str, float]]:
    """``(name, weight)`` of every configured head, checked (a clear error names the bad key)."""
    a = cfg.MODEL.AUX_HEADS
    names = [str(n).lower() for n in a.NAMES]
    unknown = [n for n in names if n not in AUX_HEAD_NAMES]
    if unknown:
        raise ValueError(
            f"MODEL.AUX_HEADS.NAMES has unknown heads {unknown}; choose among {list(AUX_HEAD_NAMES)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"MODEL.AUX_HEADS.NAMES lists a head twice: {names}")
    weights = [float(w) for w in a.WEIGHTS] or [DEFAULT_AUX_WEIGHT] * len(names)
    if len(weights) != len(names):
        raise ValueError(
            f"MODEL.AUX_HEADS.WEIGHTS has {len(weights)} values for {len(names)} heads {names}: give one "
            "weight per name, or leave it empty for 2.0 each"
        )
    return list(zip(names, weights))


def aux_num_classes(cfg: CN) -> int:
    """The class count of the auxiliary heads: ``MODEL.AUX_HEADS.NUM_CLASSES``, else the student's."""
    if cfg.MODEL.AUX_HEADS.NUM_CLASSES > 0:
        return int(cfg.MODEL.AUX_HEADS.NUM_CLASSES)
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "TBDistiller" and "DISTILL" in cfg:
        arch = cfg.DISTILL.STUDENT_META_ARCHITECTURE
    section = _CLASS_SECTIONS.get(arch)
    if section is None:
        raise ValueError(
            f"cannot tell the class count of {arch!r} for its auxiliary heads: set MODEL.AUX_HEADS.NUM_CLASSES"
        )
    return int(cfg.MODEL[section].NUM_CLASSES)
