"""Task-aligned learning (TAL, TOOD §2 of METHODS.md): the batch assigner, its losses and config keys.

The assigner works on padded batches: ``images x GTs x points`` with a GT mask, no Python loop over
GTs or points. The only loop is over *chunks* of GTs, whose size keeps the dense ``[B, g, A]`` work
(a one-byte "inside" mask) under ``max_chunk_elements``, so crowded images (thousands of GTs, ~20k
points) stay in bounded memory.

Pipeline, per GT chunk on the inside (point, GT) pairs only, then on the ``[B, G, m]`` top-m
candidates:

1. candidates: points whose centre lies strictly inside the GT (only these pairs are scored);
2. ``u = IoU(pred box, GT)``, ``s = score of the GT's class``, ``t = s^alpha * u^beta``;
   pairs with ``t = 0`` are dropped (no overlap: nothing to align), then the top ``m`` per GT by ``t``;
3. a point claimed by several GTs goes to the claimant with the highest IoU (ties: lowest GT index);
4. ``t_hat = t / max(t) * max(u)`` over each GT's final positives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from detectron2.config import CfgNode as CN
from detectron2.utils import comm
from torch import Tensor

from tbd.ops.boxes import aligned_iou, boxes_contain_points, giou_loss, segment_topk
from tbd.ops.losses import quality_focal_loss


def add_tal_config(cfg: CN) -> None:
    """Add ``MODEL.TAL.*`` (assigner), ``MODEL.TOOD.*`` (T-Head) and ``MODEL.ETHEAD.*`` (ET-head)."""
    cfg.MODEL.TAL = CN()
    cfg.MODEL.TAL.TOPK = 13  # m: positives per GT
    cfg.MODEL.TAL.ALPHA = 1.0  # exponent of the class score in t = s^alpha * u^beta
    cfg.MODEL.TAL.BETA = 6.0  # exponent of the IoU
    # dense [B, G_chunk, A] work per chunk; 2**22 floats = 16 MiB per intermediate tensor
    cfg.MODEL.TAL.MAX_CHUNK_ELEMENTS = 2**22
    # ATSS assignment for the first iterations (0 = TAL from the start)
    cfg.MODEL.TAL.WARMUP_ITERS = 0
    cfg.MODEL.TAL.ATSS_TOPK = 9  # ATSS: nearest points per level and GT
    cfg.MODEL.TAL.ATSS_ANCHOR_SCALE = 8.0  # ATSS: side of the square prior box, in strides

    cfg.MODEL.TOOD = CN()
    cfg.MODEL.TOOD.NUM_CLASSES = 80
    cfg.MODEL.TOOD.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.TOOD.FEAT_CHANNELS = 256
    cfg.MODEL.TOOD.STACKED_CONVS = 6  # N task-interactive convs
    cfg.MODEL.TOOD.LA_DOWN_RATE = 8  # layer attention: fc1 reduces N*C channels by this factor
    cfg.MODEL.TOOD.NORM = "GN"
    cfg.MODEL.TOOD.PRIOR_PROB = 0.01
    cfg.MODEL.TOOD.FOCAL_GAMMA = 2.0
    cfg.MODEL.TOOD.CLS_LOSS_WEIGHT = 1.0
    cfg.MODEL.TOOD.BOX_LOSS_WEIGHT = 2.0
    cfg.MODEL.TOOD.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.TOOD.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.TOOD.NMS_THRESH_TEST = 0.6

    cfg.MODEL.ETHEAD = CN()
    cfg.MODEL.ETHEAD.NUM_CLASSES = 80
    cfg.MODEL.ETHEAD.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.ETHEAD.FEAT_CHANNELS = 256
    cfg.MODEL.ETHEAD.STACKED_CONVS = 2  # shared convs before the ESE stems (PP-YOLOE: 0, after a PAN)
    cfg.MODEL.ETHEAD.NORM = "GN"
    cfg.MODEL.ETHEAD.PRIOR_PROB = 0.01
    cfg.MODEL.ETHEAD.REG_MAX = 16  # DFL bins 0..REG_MAX, in strides
    cfg.MODEL.ETHEAD.VFL_ALPHA = 0.75
    cfg.MODEL.ETHEAD.VFL_GAMMA = 2.0
    cfg.MODEL.ETHEAD.VFL_TARGET = "iou"  # "iou" (VarifocalNet's q) or "t_hat" (PP-YOLOE's code)
    cfg.MODEL.ETHEAD.CLS_LOSS_WEIGHT = 1.0
    cfg.MODEL.ETHEAD.GIOU_LOSS_WEIGHT = 2.5
    cfg.MODEL.ETHEAD.DFL_LOSS_WEIGHT = 0.5
    cfg.MODEL.ETHEAD.SCORE_THRESH_TEST = 0.05
    cfg.MODEL.ETHEAD.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.ETHEAD.NMS_THRESH_TEST = 0.6


@dataclass
class TALAssignment:
    """Per-point targets of one batch. ``B`` images, ``A`` points; background label = ``num_classes``."""

    labels: Tensor  # [B, A] long
    boxes: Tensor  # [B, A, 4] assigned GT box (zeros for background)
    scores: Tensor  # [B, A] soft target t_hat (0 for background)
    fg_mask: Tensor  # [B, A] bool
    gt_index: Tensor  # [B, A] long, -1 for background
    ious: Tensor  # [B, A] IoU of the predicted box with its assigned GT (0 for background)

    def one_hot_scores(self, num_classes: int) -> Tensor:
        """``[B, A, C]`` soft classification targets: t_hat at the assigned class, 0 elsewhere."""
        return scatter_class_targets(self.labels, self.scores, num_classes)


def scatter_class_targets(labels: Tensor, values: Tensor, num_classes: int) -> Tensor:
    """``[B, A, C]`` with ``values`` at ``labels`` (labels ``== num_classes`` mean background: all 0)."""
    out = values.new_zeros((*labels.shape, num_classes + 1))
    out.scatter_(-1, labels.unsqueeze(-1), values.unsqueeze(-1))
    return out[..., :num_classes]


@dataclass
class _Candidates:
    index: Tensor  # [B, G, m] point index of each candidate
    valid: Tensor  # [B, G, m] candidate inside its (real) GT
    iou: Tensor  # [B, G, m]
    metric: Tensor  # [B, G, m]


def resolve_candidates(
    cand: _Candidates, gt_boxes: Tensor, gt_labels: Tensor, num_points: int, num_classes: int
) -> TALAssignment:
    """Turn per-GT candidate lists into per-point targets (conflicts: highest IoU, then lowest GT index).

    Also used by the ATSS warm-up, whose candidates come from another rule.
    """
    b, g, m = cand.index.shape
    device = cand.index.device
    flat_idx = cand.index.reshape(b, g * m)
    iou = torch.where(cand.valid, cand.iou, torch.full_like(cand.iou, -1.0))
    best_iou = torch.full((b, num_points), -1.0, device=device, dtype=iou.dtype)
    best_iou.scatter_reduce_(1, flat_idx, iou.reshape(b, g * m), reduce="amax")
    win = cand.valid & (iou >= best_iou.gather(1, flat_idx).view(b, g, m))
    gt_ids = torch.arange(g, device=device).view(1, g, 1).expand(b, g, m)
    owner = torch.full((b, num_points), g, device=device, dtype=torch.long)
    owner.scatter_reduce_(1, flat_idx, torch.where(win, gt_ids, g).reshape(b, g * m), reduce="amin")
    win &= gt_ids == owner.gather(1, flat_idx).view(b, g, m)

    zero = torch.zeros_like(cand.metric)
    max_metric = torch.where(win, cand.metric, zero).amax(-1, keepdim=True)
    max_iou = torch.where(win, cand.iou, zero).amax(-1, keepdim=True)
    t_hat = torch.where(win, cand.metric / max_metric.clamp(min=1e-12) * max_iou, zero)

    fg = owner < g
    gt_index = torch.where(fg, owner, torch.full_like(owner, -1))
    safe = owner.clamp(max=g - 1)
    labels = torch.where(fg, gt_labels.gather(1, safe), torch.full_like(owner, num_classes))
    boxes = torch.where(fg[..., None], gt_boxes.gather(1, safe[..., None].expand(b, num_points, 4)), 0.0)
    scores = torch.zeros((b, num_points), device=device, dtype=t_hat.dtype)
    scores.scatter_add_(1, flat_idx, t_hat.reshape(b, g * m))
    ious = torch.zeros_like(scores)
    ious.scatter_add_(1, flat_idx, torch.where(win, cand.iou, zero).reshape(b, g * m))
    return TALAssignment(labels, boxes, scores, fg, gt_index, ious)


class TaskAlignedAssigner:
    """Vectorised task-aligned assignment over a padded batch (see the module docstring)."""

    def __init__(
        self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, max_chunk_elements: int = 2**22
    ) -> None:
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.max_chunk_elements = max_chunk_elements

    def gt_chunk_size(self, batch: int, num_gts: int, num_points: int) -> int:
        """How many GTs one dense ``[B, g, A]`` chunk holds."""
        return max(1, min(num_gts, self.max_chunk_elements // max(1, batch * num_points)))

    @torch.no_grad()
    def candidates(
        self,
        pred_scores: Tensor,
        pred_boxes: Tensor,
        points: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor | None = None,
    ) -> _Candidates:
        """The top-``m`` candidates of every GT, ``[B, G, m]`` (sparse: only inside pairs are scored).

        Per block of GTs, the dense work is a one-byte "point inside GT" mask; IoU, class score
        and metric are computed for the inside pairs only, and a segmented top-k (two stable
        sorts) ranks each GT's pairs. Candidates with metric 0 are dropped (they never become
        positives); ties in the metric keep the lower point index.
        """
        b, num_points, _ = pred_scores.shape
        g = gt_boxes.shape[1]
        k = min(self.topk, num_points)
        device = pred_scores.device
        index = torch.zeros((b, g, k), dtype=torch.long, device=device)
        valid = torch.zeros((b, g, k), dtype=torch.bool, device=device)
        iou_out = torch.zeros((b, g, k), dtype=pred_boxes.dtype, device=device)
        metric_out = torch.zeros((b, g, k), dtype=pred_scores.dtype, device=device)
        step = self.gt_chunk_size(b, g, num_points)
        for g0 in range(0, g, step):  # chunks of GTs: bounded memory, not a per-GT loop
            boxes = gt_boxes[:, g0 : g0 + step]
            gc = boxes.shape[1]
            inside = boxes_contain_points(boxes, points)  # [B, gc, A] bool
            if gt_mask is not None:
                inside &= gt_mask[:, g0 : g0 + step, None]
            bi, gi, ai = inside.nonzero(as_tuple=True)
            del inside
            iou = aligned_iou(boxes[bi, gi], pred_boxes[bi, ai])
            labels = gt_labels[:, g0 : g0 + step].clamp(min=0)[bi, gi]
            metric = pred_scores[bi, ai, labels].pow(self.alpha) * iou.pow(self.beta)
            pos = metric > 0  # a zero metric (no overlap, zero score) is never a positive
            bi, gi, ai, iou, metric = bi[pos], gi[pos], ai[pos], iou[pos], metric[pos]
            sel, rank = segment_topk(metric, bi * gc + gi, b * gc, k)
            slot = (bi[sel], g0 + gi[sel], rank)
            index[slot] = ai[sel]
            valid[slot] = True
            iou_out[slot] = iou[sel]
            metric_out[slot] = metric[sel]
        return _Candidates(index, valid, iou_out, metric_out)

    @torch.no_grad()
    def __call__(
        self,
        pred_scores: Tensor,
        pred_boxes: Tensor,
        points: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_mask: Tensor,
        num_classes: int,
    ) -> TALAssignment:
        """Assign a batch.

        Args:
            pred_scores: ``[B, A, C]`` class probabilities (after sigmoid).
            pred_boxes: ``[B, A, 4]`` decoded predicted boxes.
            points: ``[A, 2]`` point centres ``(x, y)``.
            gt_boxes: ``[B, G, 4]``; gt_labels: ``[B, G]``; gt_mask: ``[B, G]`` (False = padding).
        """
        pred_scores = pred_scores.detach().float()
        pred_boxes = pred_boxes.detach().float()
        gt_boxes = gt_boxes.float()
        cand = self.candidates(pred_scores, pred_boxes, points.float(), gt_boxes, gt_labels, gt_mask)
        cand.valid &= gt_mask[..., None]
        return resolve_candidates(cand, gt_boxes, gt_labels, points.shape[0], num_classes)


def reduced_normalizer(total: Tensor) -> Tensor:
    """``total`` averaged over the processes of a DDP run (as is for one process), at least 1."""
    total = total.detach().clone()
    world = comm.get_world_size()
    if world > 1:
        dist.all_reduce(total)
        total = total / world
    return total.clamp(min=1.0)


def task_aligned_losses(
    cls_logits: Tensor,
    pred_boxes: Tensor,
    assignment: TALAssignment,
    num_classes: int,
    gamma: float = 2.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """TOOD losses: quality focal loss with soft targets t_hat and t_hat-weighted GIoU, both / sum t_hat.

    ``cls_logits [B, A, C]`` are the logits whose sigmoid is the (aligned) score; ``pred_boxes
    [B, A, 4]`` decoded boxes. Returns ``(loss_cls, loss_box, normalizer)``.
    """
    targets = assignment.one_hot_scores(num_classes).to(cls_logits.dtype)
    normalizer = reduced_normalizer(assignment.scores.sum())
    loss_cls = quality_focal_loss(cls_logits, targets, gamma=gamma).sum() / normalizer
    fg = assignment.fg_mask
    weights = assignment.scores[fg]
    loss_box = (giou_loss(pred_boxes[fg], assignment.boxes[fg]) * weights).sum() / normalizer
    return loss_cls, loss_box, normalizer
