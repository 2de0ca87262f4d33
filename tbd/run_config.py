"""A run's config from its options: datasets, class count, device, schedule and KEY VALUE overrides.

The options are an ``argparse.Namespace`` as the ``tbd`` commands parse them (any other object
with those attributes will do; one that is missing takes its default). Used by the commands and
by the library (:mod:`tbd.teachers` trains a teacher with them).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from detectron2.config import CfgNode

from tbd.ui import UsageError


def set_iterations(cfg: CfgNode, iters: int) -> None:
    """``--iters``: the schedule compressed to ``iters`` (LR steps and the TAL warm-up keep their share)."""
    old = cfg.SOLVER.MAX_ITER
    cfg.SOLVER.MAX_ITER = iters
    steps = sorted({int(s * iters / old) for s in cfg.SOLVER.STEPS if s < old} - {0})
    cfg.SOLVER.STEPS = tuple(x for x in steps if x < iters) if len(steps) < iters else ()
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(1, iters // 10))
    cfg.SOLVER.CHECKPOINT_PERIOD = min(cfg.SOLVER.CHECKPOINT_PERIOD, iters)
    if "TAL" in cfg.MODEL and cfg.MODEL.TAL.WARMUP_ITERS > 0:
        # the ATSS warm-up is part of the schedule (TOOD: 4 of 12 epochs): it shrinks with it
        cfg.MODEL.TAL.WARMUP_ITERS = max(1, int(cfg.MODEL.TAL.WARMUP_ITERS * iters / old))
    if cfg.TEST.EVAL_PERIOD > iters:
        cfg.TEST.EVAL_PERIOD = 0


def set_num_classes(cfg: CfgNode, num_classes: int) -> None:
    """Set the class count of every head family that the config knows."""
    for section in ("RETINANET", "ROI_HEADS", "FCOS", "TOOD", "ETHEAD", "DW", "CODETR", "SEM_SEG_HEAD"):
        node = cfg.MODEL.get(section)
        if node is not None and "NUM_CLASSES" in node:
            node.NUM_CLASSES = num_classes


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return name


def apply_common(cfg: CfgNode, args: argparse.Namespace, train: str, test: str) -> CfgNode:
    """Datasets, class count, device, schedule flags and trailing KEY VALUE overrides."""
    from tbd.data import TRAIN_NAME, VAL_NAME, num_classes

    cfg.DATASETS.TRAIN = (train,)
    cfg.DATASETS.TEST = (test,)
    set_num_classes(cfg, num_classes(test))
    cfg.MODEL.DEVICE = pick_device(getattr(args, "device", "auto"))
    if getattr(args, "data_dir", None):
        cfg.TBD.DATA_DIR = args.data_dir
    if TRAIN_NAME in (train, test) or VAL_NAME in (train, test):  # record the embedded split sizes used
        cfg.TBD.NUM_TRAIN_IMAGES = getattr(args, "num_train_images", None) or cfg.TBD.NUM_TRAIN_IMAGES
        cfg.TBD.NUM_VAL_IMAGES = getattr(args, "num_val_images", None) or cfg.TBD.NUM_VAL_IMAGES
    iters = getattr(args, "iters", None)
    if iters:
        set_iterations(cfg, iters)
    if getattr(args, "batch_size", None):
        cfg.SOLVER.IMS_PER_BATCH = args.batch_size
    if getattr(args, "lr", None):
        cfg.SOLVER.BASE_LR = args.lr
    if getattr(args, "eval_period", None) is not None:
        cfg.TEST.EVAL_PERIOD = args.eval_period
    if getattr(args, "seed", None) is not None:
        cfg.SEED = args.seed
    opts = [o for o in (getattr(args, "opts", None) or []) if o != "--"]
    if opts:
        if len(opts) % 2:
            raise UsageError(f"config overrides come in KEY VALUE pairs; got {opts}")
        try:
            cfg.merge_from_list(opts)
        except (KeyError, AssertionError, ValueError) as err:
            raise UsageError(f"bad config override: {err}") from err
    return cfg


def check_batch_per_process(cfg: CfgNode, world_size: int) -> None:
    """BatchNorm in training needs at least 2 images per process (1x1 maps on the top levels)."""
    per_process, rest = divmod(cfg.SOLVER.IMS_PER_BATCH, world_size)
    if rest:
        raise UsageError(
            f"--batch-size {cfg.SOLVER.IMS_PER_BATCH} does not split over {world_size} processes; "
            "use a multiple of the process count"
        )
    uses_bn = any(v == "BN" for k, v in flat_items(cfg) if k.endswith("NORM"))
    if per_process < 2 and uses_bn:
        raise UsageError(
            f"each of the {world_size} processes would train on {per_process} image per batch, and "
            "BatchNorm needs at least 2: raise --batch-size, or use SyncBN/GN norms in the config"
        )


def flat_items(node: CfgNode, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` for every leaf of a config."""
    items: list[tuple[str, Any]] = []
    for key, value in node.items():
        if isinstance(value, CfgNode):
            items.extend(flat_items(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items
