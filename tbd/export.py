"""Student-only artefacts from a distillation run, loadable by plain Detectron2.

A ``tbd distill`` checkpoint holds the :class:`~tbd.distill.TBDistiller`'s state: the student
under ``student.*`` plus the adapters and TWG used only in training. Exporting keeps the student
alone and writes a config whose ``MODEL.META_ARCHITECTURE`` is the student's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from detectron2.config import CfgNode

STUDENT_PREFIX = "student."
#: tensors of training-only modules (the auxiliary heads of MODEL.AUX_HEADS), never exported
_TRAINING_ONLY = re.compile(r"(^|\.)aux_heads\.")


def is_training_only(key: str) -> bool:
    """Whether a state-dict key belongs to a training-only module (``aux_heads.*``, at any depth)."""
    return _TRAINING_ONLY.search(key) is not None


def without_training_only(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the tensors of training-only modules (``aux_heads.*``)."""
    return {k: v for k, v in state.items() if not is_training_only(k)}


def student_state_dict(model_state: dict[str, Any]) -> dict[str, Any]:
    """The student's tensors of a distiller (or plain) state dict, keys without ``student.``,
    without training-only modules (auxiliary heads)."""
    if not any(k.startswith(STUDENT_PREFIX) for k in model_state):
        return without_training_only(dict(model_state))  # already a plain student checkpoint
    return without_training_only(
        {k[len(STUDENT_PREFIX) :]: v for k, v in model_state.items() if k.startswith(STUDENT_PREFIX)}
    )


def student_cfg(cfg: CfgNode) -> CfgNode:
    """The student's own config from a distillation config, for inference: its meta-architecture,
    and the training-only auxiliary heads (``MODEL.AUX_HEADS``) off."""
    out = cfg.clone()
    out.defrost()
    if out.MODEL.META_ARCHITECTURE == "TBDistiller":
        out.MODEL.META_ARCHITECTURE = out.DISTILL.STUDENT_META_ARCHITECTURE
    if "AUX_HEADS" in out.MODEL:
        out.MODEL.AUX_HEADS.NAMES = []
        out.MODEL.AUX_HEADS.WEIGHTS = []
    return out


def keys_of(cfg: CfgNode, ref: CfgNode) -> CfgNode:
    """``cfg`` restricted to the keys that ``ref`` has (at every depth), with ``cfg``'s values."""
    kept = CfgNode()
    for key, value in cfg.items():
        if key not in ref:
            continue
        kept[key] = keys_of(value, ref[key]) if isinstance(value, CfgNode) else value
    return kept


def detectron2_only(cfg: CfgNode) -> CfgNode:
    """``cfg`` restricted to the keys of Detectron2's own default config.

    Loadable by ``detectron2.config.get_cfg().merge_from_file`` without tbd; tbd-only sections
    (``DISTILL``, ``TBD``, the tbd heads' keys) are dropped.
    """
    from detectron2.config import get_cfg

    return keys_of(cfg, get_cfg())


def loading_config(native: bool) -> CfgNode:
    """The config a user merges an exported YAML into: Detectron2's ``get_cfg()``, plus
    :func:`tbd.modeling.add_model_config` for a tbd model (``native`` False)."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    if not native:
        from tbd.modeling import add_model_config

        add_model_config(cfg)
    return cfg


def is_native(cfg: CfgNode) -> bool:
    """Whether ``cfg``'s meta-architecture and backbone are Detectron2's own (not registered by tbd)."""
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)
    return arch.__module__.startswith("detectron2.") and backbone.__module__.startswith("detectron2.")


def student_config_yaml(run_cfg: CfgNode) -> str:
    """The student's config as YAML, with exactly the keys its loader has.

    For a Detectron2 architecture on a Detectron2 backbone (RetinaNet, Faster R-CNN on a ResNet):
    Detectron2's keys only, so ``get_cfg().merge_from_file`` loads it without tbd. For a tbd head
    (TOOD, ET, DW, FCOSDetector) or tbd backbone (MobileNetV2): Detectron2's keys plus those of
    :func:`tbd.modeling.add_model_config`. Never the training-only ``DISTILL.*``, ``TBD.*`` or
    ``SOLVER.OPTIMIZER``; every kept value is the student's (pixel mean/std, input format and test
    sizes, anchors, test thresholds, ...), with ``MODEL.WEIGHTS`` empty.
    """
    cfg = student_cfg(run_cfg)
    cfg.MODEL.WEIGHTS = ""
    return keys_of(cfg, loading_config(is_native(cfg))).dump()


def load_student_state(checkpoint: str | Path) -> dict[str, Any]:
    data = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    model = data.get("model", data) if isinstance(data, dict) else data
    return student_state_dict(model)


def export_student(run_cfg: CfgNode, checkpoint: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``model_student.pth`` and ``config_student.yaml`` (:func:`student_config_yaml`) into ``out_dir``."""
    from tbd.engine.atomic import atomic_torch_save, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model_student.pth"
    config = out / "config_student.yaml"
    atomic_torch_save({"model": load_student_state(checkpoint), "__author__": "tbd export"}, weights)
    atomic_write_text(config, student_config_yaml(run_cfg))
    return weights, config
