"""Small builders for tests and benchmarks of the distiller: configs and synthetic batches.

The synthetic images hold solid, class-coloured rectangles on a noisy background, in the
Detectron2 input format (``{"image": uint8-range float [3, H, W], "instances": Instances}``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.structures import Boxes, Instances
from torch import Tensor

from tbd.ops.boxes import pairwise_iou

#: one colour per class (BGR, 0-255)
_PALETTE = torch.tensor(
    [
        [230, 40, 40],
        [40, 230, 40],
        [40, 40, 230],
        [230, 230, 40],
        [230, 40, 230],
        [40, 230, 230],
        [240] * 3,
        [120] * 3,
    ],
    dtype=torch.float32,
)


def synthetic_batch(
    batch_size: int = 2,
    size: int | tuple[int, int] = 64,
    boxes_per_image: int | Sequence[int] = 2,
    num_classes: int = 8,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``batch_size`` images of ``size x size`` (or ``(height, width)``) with ``boxes_per_image``
    rectangles each (0 allowed). Sides are 20-60 % of the image's, scaled by ``sqrt(10 / n)``
    beyond 10 boxes (a crowd of smaller objects)."""
    g = torch.Generator().manual_seed(seed)
    counts = [boxes_per_image] * batch_size if isinstance(boxes_per_image, int) else list(boxes_per_image)
    height, width = (size, size) if isinstance(size, int) else size
    dims = torch.tensor([float(width), float(height)])
    out = []
    for n in counts:
        image = torch.rand(3, height, width, generator=g) * 60.0
        wh = dims * (0.2 + 0.4 * torch.rand(n, 2, generator=g)) * min(1.0, (10 / max(n, 1)) ** 0.5)
        xy = (dims - wh) * torch.rand(n, 2, generator=g)
        boxes = torch.cat([xy, xy + wh], dim=1).round()
        classes = torch.randint(0, num_classes, (n,), generator=g)
        for box, cls in zip(boxes.long().tolist(), classes.tolist()):  # painting pixels, test data only
            image[:, box[1] : box[3], box[0] : box[2]] = _PALETTE[cls % len(_PALETTE)].view(3, 1, 1)
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = classes
        out.append({"image": image, "instances": inst, "height": height, "width": width})
    return out


def dense_regression_probability(boxes: Tensor, gt_boxes: Tensor, gt_mask: Tensor) -> Tensor:
    """The former p_r: the whole ``[B, H W A, G]`` IoU tensor, then the max over GTs and anchors.

    The yardstick of :func:`tbd.distill.task_probs.regression_probability` (same value, same
    gradient, ``O(B H W A G)`` memory kept for the backward). Tests and benchmarks only.
    """
    b, h, w, a, _ = boxes.shape
    if gt_boxes.shape[1] == 0:
        return boxes.new_zeros((b, h, w))
    iou = pairwise_iou(boxes.reshape(b, h * w * a, 4), gt_boxes.to(boxes.dtype))  # [B, HWA, G]
    iou = iou.masked_fill(~gt_mask[:, None, :], 0.0)
    return iou.amax(dim=-1).view(b, h, w, a).amax(dim=-1)


def distill_config(
    student: str = "retinanet_R18_FPN", teacher: str = "retinanet_R18_FPN", opts: Sequence[str] = ()
) -> CfgNode:
    """A TBDistiller config: ``student`` YAML with ``MODEL.META_ARCHITECTURE = "TBDistiller"``."""
    from tbd.config import load_config

    cfg = load_config(student)
    cfg.DISTILL.STUDENT_META_ARCHITECTURE = cfg.MODEL.META_ARCHITECTURE
    cfg.MODEL.META_ARCHITECTURE = "TBDistiller"
    cfg.DISTILL.TEACHER_CONFIG = teacher
    cfg.merge_from_list(list(opts))
    return cfg


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, batches: Sequence[list[dict[str, Any]]]) -> None:
    """Set BatchNorm running statistics of an untrained model from a few forwards (train mode).

    A randomly initialised model in eval mode normalises with mean 0 / var 1, so its features
    are on the raw pixel scale; a trained teacher's are not. Used to make untrained teachers
    representative in benchmarks. Only BatchNorm buffers change.
    """
    from .probes import get_probe_adapter

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    was_training = model.training
    model.train()
    adapter = get_probe_adapter(model)
    for batch in batches:
        adapter.run_dense(model, batch)
    model.train(was_training)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
