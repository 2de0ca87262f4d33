"""The optimizer named by ``SOLVER.OPTIMIZER``: Detectron2's SGD, or AdamW.

Detectron2 0.6 only builds SGD. AdamW is the usual choice for training from scratch with small
batches (the embedded-dataset configs use it); both share Detectron2's parameter groups (no weight
decay on norms when ``WEIGHT_DECAY_NORM`` is 0, bias LR factor) and its gradient clipping.

Two additions for DETR-family models: a model with ``param_lr_factors()`` (pairs of parameter
and LR multiplier, e.g. CoDETR's backbone at 0.1x) gets those multipliers, and
``SOLVER.CLIP_GRADIENTS.CLIP_TYPE: "full_model"`` clips the norm of all gradients together (the
DETR recipe; Detectron2's "norm" clips each parameter on its own). A model with
``gradient_clip_groups()`` (a distiller with the student trained alone beside it) has each group
clipped on its own, so the two students do not share one norm.
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
    full_model_clip = (
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    )
    if full_model_clip:  # Detectron2 0.6 does not know this type: clip here, not in its wrapper
        cfg = cfg.clone()
        cfg.defrost()
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = _build(name, cfg, model)
    _apply_lr_factors(optimizer, model)
    if full_model_clip:
        _clip_full_model(optimizer, float(cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE), _clip_groups(model))
    return optimizer


def _apply_lr_factors(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """Multiply the LR of the parameters the model names (a group mixing factors is split)."""
    factors = getattr(model, "param_lr_factors", None)
    if not callable(factors):
        return
    factor_of = {id(p): float(f) for p, f in factors()}
    groups = []
    for group in optimizer.param_groups:
        by_factor: dict[float, list[torch.nn.Parameter]] = {}
        for p in group["params"]:
            by_factor.setdefault(factor_of.get(id(p), 1.0), []).append(p)
        for factor, params in by_factor.items():
            groups.append({**group, "params": params, "lr": group["lr"] * factor})
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group(group)


def _clip_groups(model: torch.nn.Module) -> list[set[int]]:
    """Ids of the parameter sets the model wants clipped apart (``gradient_clip_groups``), or none."""
    groups = getattr(model, "gradient_clip_groups", None)
    return [{id(p) for p in group} for group in groups()] if callable(groups) else []


def _clip_full_model(
    optimizer: torch.optim.Optimizer, max_norm: float, groups: list[set[int]] | None = None
) -> None:
    """Clip the total gradient norm of every parameter of ``optimizer`` before each step (a
    subclass, as Detectron2's clipping: the LR scheduler wraps ``step`` as a bound method).
    ``groups``: parameter-id sets whose norms are clipped apart (parameters in none form one more)."""
    base = type(optimizer)
    groups = list(groups or [])

    def step(self: torch.optim.Optimizer, closure: object = None) -> object:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        rest = [p for p in params if not any(id(p) in ids for ids in groups)]
        for part in [[p for p in params if id(p) in ids] for ids in groups] + [rest]:
            if part:
                torch.nn.utils.clip_grad_norm_(part, max_norm)
        return base.step(self, closure)

    optimizer.__class__ = type(base.__name__ + "WithFullModelClip", (base,), {"step": step})


def _build(name: str, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
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
