"""Analyses of trained detectors: the harmonious-prediction ratio (``tbd harmony``)."""

from __future__ import annotations

from tbd.analysis.harmony import (
    THRESHOLD_KEYS,
    HarmonyEvaluator,
    HarmonyThresholds,
    best_match_iou,
    bin_labels,
    build_harmony_loader,
    default_bin_edges,
    detectron2_metrics,
    measure_harmony,
    summarize,
    thresholds_of,
)

__all__ = [
    "THRESHOLD_KEYS",
    "HarmonyEvaluator",
    "HarmonyThresholds",
    "best_match_iou",
    "bin_labels",
    "build_harmony_loader",
    "default_bin_edges",
    "detectron2_metrics",
    "measure_harmony",
    "summarize",
    "thresholds_of",
]
