"""Datasets: the embedded procedural ``tbd_shapes`` and any COCO-format detection data.

Importing this package registers nothing and generates nothing; see :func:`register_shapes`,
:func:`ensure_shapes` and :func:`resolve_datasets`.
"""

from __future__ import annotations

from tbd.data.resolve import (
    EMBEDDED_NAME,
    check_registered_files,
    dataset_report,
    num_classes,
    register_user_coco,
    resolve_datasets,
)
from tbd.data.shapes import (
    GENERATOR_VERSION,
    TRAIN_NAME,
    VAL_NAME,
    dataset_dir,
    ensure_shapes,
    ensure_split,
    register_shapes,
    shapes_options_from_cfg,
    shapes_root,
    split_dir,
    split_files,
)
from tbd.data.shapes_render import SHAPE_CLASSES
from tbd.data.stats import DatasetStats, coco_stats
from tbd.data.validate import DatasetError, DatasetReport

__all__ = [
    "EMBEDDED_NAME",
    "GENERATOR_VERSION",
    "SHAPE_CLASSES",
    "TRAIN_NAME",
    "VAL_NAME",
    "DatasetError",
    "DatasetReport",
    "DatasetStats",
    "check_registered_files",
    "coco_stats",
    "dataset_dir",
    "dataset_report",
    "ensure_shapes",
    "ensure_split",
    "num_classes",
    "register_shapes",
    "register_user_coco",
    "resolve_datasets",
    "shapes_options_from_cfg",
    "shapes_root",
    "split_dir",
    "split_files",
]
