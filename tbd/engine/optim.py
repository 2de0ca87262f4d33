"""The optimizer named by ``SOLVER.OPTIMIZER``: Detectron2's SGD, or AdamW.

Detectron2 0.6 only builds SGD. AdamW is the usual choice for training from scratch with small
batches (the embedded-dataset configs use it); both share Detectron2's parameter groups (no weight
decay on norms when ``WEIGHT_DECAY_NORM`` is 0, bias LR factor) and its gradient clipping.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import build_optimizer as d2_build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

OPTIMIZERS = ("SGD", "ADAMW")


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    name = str(cfg.SOLVER.OPTIMIZER).upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER is {cfg.SOLVER.OPTIMIZER!r}; use one of {', '.join(OPTIMIZERS)}")
    if name == "SGD":
        return d2_build_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
        params,
        lr=cfg.SOLVER.BASE_LR,
        betas=(cfg.SOLVER.MOMENTUM, 0.999),
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
    )
