"""SOLVER.OPTIMIZER: Detectron2's SGD by default, AdamW on request, both with its param groups."""

from __future__ import annotations

import pytest
import torch

from tbd.config import get_cfg
from tbd.engine.optim import build_optimizer


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def test_default_is_detectron2_sgd() -> None:
    cfg = get_cfg()
    opt = build_optimizer(cfg, _model())
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == cfg.SOLVER.MOMENTUM


def test_adamw_keeps_norm_without_decay_and_clips() -> None:
    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER = "adamw"
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1e-6
    model = _model()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    assert decays == [0.0, 0.05]  # BatchNorm parameters are not decayed
    # Detectron2's clipping wraps the class; a huge gradient is clipped before the step
    assert type(opt).__name__ == "AdamWWithGradientClip"
    model(torch.randn(2, 3, 8, 8)).square().mean().mul(1e6).backward()
    opt.step()
    # Detectron2 clips each parameter's gradient on its own
    assert all(p.grad.norm() <= 1e-6 * 1.01 for p in model.parameters())


def test_unknown_optimizer_named_in_error() -> None:
    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER is 'LAMB'; use one of SGD, ADAMW"):
        build_optimizer(cfg, _model())
