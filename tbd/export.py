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


def detectron2_only(cfg: CfgNode) -> CfgNode:
    """``cfg`` restricted to the keys of Detectron2's own default config.

    Loadable by ``detectron2.config.get_cfg().merge_from_file`` without tbd; tbd-only sections
    (``DISTILL``, ``TBD``, the tbd heads' keys) are dropped.
    """
    from detectron2.config import get_cfg

    base = get_cfg()

    def prune(node: CfgNode, ref: CfgNode) -> CfgNode:
        kept = CfgNode()
        for key, value in node.items():
            if key not in ref:
                continue
            kept[key] = prune(value, ref[key]) if isinstance(value, CfgNode) else value
        return kept

    return prune(cfg, base)


def student_config_yaml(run_cfg: CfgNode) -> str:
    """The student's config as YAML: Detectron2's keys only for a Detectron2 architecture.

    Plain Detectron2 (``get_cfg().merge_from_file``) loads it for RetinaNet / Faster R-CNN on a
    Detectron2 backbone; a tbd head (TOOD, ET, DW, FCOSDetector) or a tbd backbone (MobileNetV2)
    keeps its tbd keys and needs ``import tbd.modeling`` to be registered.
    """
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    cfg = student_cfg(run_cfg)
    cfg.MODEL.WEIGHTS = ""
    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)
    native = arch.__module__.startswith("detectron2.") and backbone.__module__.startswith("detectron2.")
    return (detectron2_only(cfg) if native else cfg).dump()


def load_student_state(checkpoint: str | Path) -> dict[str, Any]:
    data = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    model = data.get("model", data) if isinstance(data, dict) else data
    return student_state_dict(model)


def export_student(run_cfg: CfgNode, checkpoint: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``model_student.pth`` and ``config_student.yaml`` (:func:`student_config_yaml`) into ``out_dir``."""
    from tbd.engine.checkpoint import atomic_torch_save, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model_student.pth"
    config = out / "config_student.yaml"
    atomic_torch_save({"model": load_student_state(checkpoint), "__author__": "tbd export"}, weights)
    atomic_write_text(config, student_config_yaml(run_cfg))
    return weights, config
