"""Set-prediction losses: sigmoid focal classification, L1 and GIoU on the paired queries.

One function serves both kinds of branch: the one-to-one branch pairs queries with GTs by the
Hungarian matcher; Co-DETR's positive-query branches pair query j with the target its auxiliary
head assigned to positive j (no matching).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from detectron2.utils import comm
from torch import Tensor

from tbd.modeling.codetr.matching import cxcywh_to_xyxy
from tbd.ops.boxes import giou_loss
from tbd.ops.losses import sigmoid_focal_loss


@dataclass(frozen=True)
class LossWeights:
    cls: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0


def paired_losses(
    logits: Tensor,
    boxes: Tensor,
    batch_idx: Tensor,
    query_idx: Tensor,
    tgt_classes: Tensor,
    tgt_boxes: Tensor,
    normaliser: float,
    weights: LossWeights,
    query_valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """Weighted ``cls``, ``l1``, ``giou`` losses, each summed and divided by ``normaliser``.

    Args:
        logits: ``[B, Q, K]``; boxes: ``[B, Q, 4]`` normalised cxcywh.
        batch_idx, query_idx: ``[P]`` the paired queries; tgt_classes ``[P]``, tgt_boxes ``[P, 4]``
            (normalised cxcywh) their targets. Every other query is a negative (all-zero target).
        query_valid: ``[B, Q]`` bool, False for padding queries (no loss at all).
    """
    target = torch.zeros_like(logits)
    target[batch_idx, query_idx, tgt_classes] = 1.0
    cls = sigmoid_focal_loss(logits, target, weights.alpha, weights.gamma)
    if query_valid is not None:
        cls = cls * query_valid[..., None].to(cls.dtype)
    paired = boxes[batch_idx, query_idx]
    l1 = (paired - tgt_boxes).abs().sum()
    giou = giou_loss(cxcywh_to_xyxy(paired), cxcywh_to_xyxy(tgt_boxes)).sum()
    return {
        "cls": weights.cls * cls.sum() / normaliser,
        "l1": weights.l1 * l1 / normaliser,
        "giou": weights.giou * giou / normaliser,
    }


def global_normaliser(count: int, device: torch.device) -> float:
    """The number of targets averaged over the processes, at least 1 (as DETR's ``num_boxes``)."""
    n = torch.tensor([float(count)], device=device)
    if comm.get_world_size() > 1:
        torch.distributed.all_reduce(n)
        n = n / comm.get_world_size()
    return max(float(n.item()), 1.0)


def combine_losses(
    decoder: list[dict[str, Tensor]],
    proposal: dict[str, Tensor],
    positive_branches: list[list[dict[str, Tensor]]],
    encoder_heads: dict[str, Tensor],
    lambda1: float,
    lambda2: float,
    enc_weight_per_layer: bool,
) -> dict[str, Tensor]:
    """``L_global = sum_l (L_dec_l + lambda1 sum_i L_dec_{i,l} + lambda2 L_enc)`` as a loss dict.

    ``decoder[l]``: the one-to-one losses of layer l; ``proposal``: the two-stage encoder-proposal
    loss (added once, as Deformable DETR does); ``positive_branches[i][l]``: branch i's layer-l losses;
    ``encoder_heads``: the auxiliary heads' losses (``L_enc`` = their sum). With
    ``enc_weight_per_layer`` the ``lambda2 L_enc`` term is counted once per decoder layer (the sum
    over l in the formula), i.e. weighted ``L * lambda2``; else ``lambda2``.
    Terms are summed over layers and reported per kind (``loss_dec_cls``, ``loss_pos{i}_l1``...).
    """
    out: dict[str, Tensor] = {}
    for layer in decoder:
        for key, value in layer.items():
            out[f"loss_dec_{key}"] = out.get(f"loss_dec_{key}", 0.0) + value
    for key, value in proposal.items():
        out[f"loss_proposal_{key}"] = value
    for i, branch in enumerate(positive_branches):
        for layer in branch:
            for key, value in layer.items():
                name = f"loss_pos{i}_{key}"
                out[name] = out.get(name, 0.0) + lambda1 * value
    enc_scale = lambda2 * (len(decoder) if enc_weight_per_layer else 1)
    for key, value in encoder_heads.items():
        out[key] = enc_scale * value
    return out  # type: ignore[return-value]
