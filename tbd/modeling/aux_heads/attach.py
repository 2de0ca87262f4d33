"""Attach the auxiliary heads to a built dense student, without changing its class.

:func:`attach_aux_heads` adds ``model.aux_heads`` (an ``nn.ModuleList``: its parameters are
optimised and checkpointed with the model) and three hooks:

* on the student's backbone: in training, keep its output (the FPN maps) for this forward;
* on the student (after its forward): in training, run every auxiliary head on the levels its own
  head reads (``head_in_features``), with the batch's GT, and add their losses to its loss dict;
* before the student's forward: drop maps a failed previous step may have left.

In eval mode nothing runs but two flag checks: predictions and their cost are the student's.
``tbd train`` / ``tbd distill`` apply it in :meth:`tbd.engine.trainer.Trainer.build_model`; a
``TBDistiller`` gets the heads on its student, whose loss dict it passes through unchanged.
Export (:mod:`tbd.export`) drops the ``aux_heads.*`` tensors and switches ``MODEL.AUX_HEADS`` off.
"""

from __future__ import annotations

from typing import Any

from detectron2.config import CfgNode as CN
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from torch import nn

from tbd.modeling.aux_heads.build import build_aux_heads
from tbd.modeling.aux_heads.config import aux_head_weights

_KEPT = "_tbd_aux_features"  # attribute of the backbone holding this forward's maps


def aux_target(model: nn.Module) -> nn.Module:
    """The dense student that gets the heads: ``model`` itself or a ``TBDistiller``'s student."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    student = getattr(model, "student", None)
    return student if isinstance(student, nn.Module) else model


def attach_aux_heads(model: nn.Module, cfg: CN) -> nn.Module:
    """Give ``model`` (or its student) the heads of ``MODEL.AUX_HEADS``; no-op when none are named.

    Idempotent. Returns ``model``. Raises ``ValueError`` for a student that is not a dense detector.
    """
    if not aux_head_weights(cfg):
        return model
    target = aux_target(model)
    if hasattr(target, "aux_heads"):
        return model
    if not isinstance(target, DenseDetector):
        raise ValueError(
            f"MODEL.AUX_HEADS applies to dense students (RetinaNet, FCOS, TOOD, ET, DW); "
            f"{type(target).__name__} is not one: set MODEL.AUX_HEADS.NAMES []"
        )
    shapes = target.backbone.output_shape()
    in_features = list(target.head_in_features)
    channels = {shapes[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"auxiliary heads need equal channels on every level, got {sorted(channels)}")
    strides = [int(shapes[f].stride) for f in in_features]
    heads = build_aux_heads(cfg, channels.pop(), strides, num_classes=int(target.num_classes))
    target.aux_heads = heads.to(target.pixel_mean.device)
    target.register_forward_pre_hook(_drop_kept_features)
    target.backbone.register_forward_hook(_keep_features)
    target.register_forward_hook(_add_aux_losses)
    inner = model
    while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = inner.module
    if inner is not target and callable(getattr(inner, "rebuild_baseline", None)):
        inner.rebuild_baseline()  # the student trained alone gets the same heads (DISTILL.WITH_BASELINE)
    return model


def _drop_kept_features(module: nn.Module, args: Any) -> None:
    module.backbone.__dict__.pop(_KEPT, None)


def _keep_features(backbone: nn.Module, args: Any, output: Any) -> None:
    if backbone.training:
        backbone.__dict__[_KEPT] = output


def _add_aux_losses(module: nn.Module, args: Any, output: Any) -> Any:
    features = module.backbone.__dict__.pop(_KEPT, None)
    if not module.training or features is None or not isinstance(output, dict) or not args:
        return None
    batched_inputs = args[0]
    device = module.pixel_mean.device
    gt = [x["instances"].to(device) for x in batched_inputs]
    image_sizes = [(int(x["image"].shape[-2]), int(x["image"].shape[-1])) for x in batched_inputs]
    levels = [features[f] for f in module.head_in_features]
    for head in module.aux_heads:
        output.update(head(levels, image_sizes, gt).losses)
    return output
