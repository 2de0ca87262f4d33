"""``MODEL.CODETR``: every setting of the Co-DETR detector, with the reason for its default.

Defaults are the published Co-DETR / Deformable-DETR++ recipe (COCO, 256-wide transformer);
``configs/codetr_R*.yaml`` scale the widths down for the embedded 128 px dataset.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN


def add_codetr_config(cfg: CN) -> None:
    c = cfg.MODEL.CODETR = CN()
    c.NUM_CLASSES = 80
    # backbone maps fed to the transformer (strides 8, 16, 32); more levels come from stride-2 convs
    c.IN_FEATURES = ["res3", "res4", "res5"]
    c.NUM_FEATURE_LEVELS = 4  # Deformable DETR: C3-C5 plus one stride-64 level
    c.HIDDEN_DIM = 256
    c.NHEADS = 8
    c.ENC_LAYERS = 6
    c.DEC_LAYERS = 6
    c.DIM_FEEDFORWARD = 2048  # Co-DETR's (Deformable DETR used 1024)
    c.DROPOUT = 0.0  # Co-DETR and DINO train without dropout in the transformer
    c.ENC_N_POINTS = 4
    c.DEC_N_POINTS = 4
    c.NUM_QUERIES = 300  # the notes: 300 queries
    # Deformable-DETR++ = two-stage query selection + iterative box refinement (the notes' base)
    c.TWO_STAGE = True
    c.BOX_REFINE = True
    # the two-stage encoder proposals are scored class-agnostically (one logit, matched against
    # all GTs as one class), as Deformable DETR; False: K logits, top-k by the best class
    c.ENC_CLASS_AGNOSTIC = True
    # losses (Deformable DETR): focal classification, L1 on normalised cxcywh, GIoU
    c.FOCAL_ALPHA = 0.25
    c.FOCAL_GAMMA = 2.0
    c.CLASS_WEIGHT = 2.0
    c.BBOX_WEIGHT = 5.0
    c.GIOU_WEIGHT = 2.0
    # Hungarian matching costs (the same weights as the losses, as Deformable DETR)
    c.COST_CLASS = 2.0
    c.COST_BBOX = 5.0
    c.COST_GIOU = 2.0
    # Co-DETR's collaborative hybrid assignment training (the notes' defaults)
    c.LAMBDA1 = 1.0  # weight of the positive-query branches' decoder losses
    c.LAMBDA2 = 2.0  # weight of the auxiliary heads' losses L_enc
    # L_global sums lambda2 * L_enc inside the sum over the L decoder layers, so L_enc is weighted
    # L * lambda2 (what Co-DETR's released configs do: loss weights num_dec_layer * lambda_2);
    # False: lambda2 once
    c.ENC_WEIGHT_PER_LAYER = True
    # multi-scale adapter: levels added below the encoder's coarsest map by stride-2 3x3 convs
    # (the notes: for a multi-scale encoder, downsample only its coarsest map); 1 gives strides 8..128
    c.ADAPTER_EXTRA_LEVELS = 1
    # Q_i = Linear(PE(B_pos)) + Linear(E(F*, pos)); False drops the feature term (ablation)
    c.POS_QUERY_FEATURES = True
    # at most this many positive queries per image and head (a random subset beyond); 0 = all.
    # The notes set no cap; a crowded image with a generous assignment can give thousands.
    c.MAX_POS_QUERIES = 0
    # optimiser (DETR recipe, read by tbd.engine.optim through CoDETR.param_lr_factors): the
    # ImageNet backbone and the deformable attention's offset/reference projections learn 10x slower
    c.BACKBONE_LR_FACTOR = 0.1
    c.LINEAR_PROJ_LR_FACTOR = 0.1
