"""Task-Balanced Distillation (METHODS.md §1): probes, harmony scores, HD, TFD with TWG, TBDistiller."""

from __future__ import annotations

from .adapters import FeatureAdapters
from .config import add_tbd_config, validate_tbd_config
from .distiller import TBDistiller, build_student, build_teacher, export_student, teacher_config, unwrap_model
from .losses import (
    TaskMaps,
    feature_distance,
    harmony_distillation_loss,
    hd_level_iou_guided,
    hd_level_plain,
    iou_guided_weight,
    tfd_loss,
    weighted_spatial_mean,
)
from .probes import LevelPrediction, Probe, ProbeAdapter, get_probe_adapter, register_probe_adapter
from .task_probs import classification_probability, harmony_score, regression_probability
from .twg import TaskWeightGenerator

__all__ = [
    "FeatureAdapters",
    "LevelPrediction",
    "Probe",
    "ProbeAdapter",
    "TBDistiller",
    "TaskMaps",
    "TaskWeightGenerator",
    "add_tbd_config",
    "build_student",
    "build_teacher",
    "classification_probability",
    "export_student",
    "feature_distance",
    "get_probe_adapter",
    "harmony_distillation_loss",
    "harmony_score",
    "hd_level_iou_guided",
    "hd_level_plain",
    "iou_guided_weight",
    "register_probe_adapter",
    "regression_probability",
    "teacher_config",
    "tfd_loss",
    "unwrap_model",
    "validate_tbd_config",
    "weighted_spatial_mean",
]
