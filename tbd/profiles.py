"""Student profiles: how a student config is made right for the kind of data it trains on.

The student configs in ``configs/`` are made for the embedded 128 px dataset (CPU-sized, trained
from scratch). A profile adapts them to the data in use:

* ``embedded`` — the configs as they are (128 px, 128-channel FPN, BatchNorm from scratch, AdamW).
* ``coco`` — Detectron2's COCO conventions (``configs/profiles/coco.yaml``): 256-channel FPN,
  multi-scale training 640–800 / 1333, test 800 / 1333, ImageNet-initialised backbone with
  FrozenBN and ``FREEZE_AT 2``, SGD 0.01 at batch 16 with the linear scaling rule for other batch
  sizes, ``1x`` / ``2x`` / ``3x`` = 90k / 180k / 270k iterations at batch 16, Detectron2's anchors.
* ``custom`` — a user's COCO json: the ``coco`` profile at an input size taken from the data (the
  training images' median shorter side, bounded to [:data:`MIN_INPUT`, :data:`MAX_INPUT`], longer
  side at most 1333), and a schedule in epochs (``1x`` = 12 epochs, as COCO's 90k iterations).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from detectron2.config import CfgNode

from tbd.config import CONFIG_DIR

logger = logging.getLogger(__name__)

PROFILES = ("embedded", "coco", "custom")
PROFILE_FILE = CONFIG_DIR / "profiles" / "coco.yaml"
#: iterations at batch 16 of Detectron2's COCO schedules
SCHEDULES = {"1x": 90000, "2x": 180000, "3x": 270000}
REFERENCE_BATCH = 16
EPOCHS_PER_1X = 12  # 90k iterations x 16 images / 117k COCO images
#: custom profile: shorter-side bounds (Detectron2's usual test sizes run 320..800) and longer side
MIN_INPUT, MAX_INPUT, MAX_LONG_SIDE = 320, 800, 1333
#: multi-scale training: shorter sides at these fractions of the test size (COCO: 640..800 for 800)
TRAIN_SCALES = (0.8, 0.84, 0.88, 0.92, 0.96, 1.0)
#: objects below this side (sqrt of the box area) at the chosen input size get a warning
SMALL_OBJECT_PX = 8.0
SMALL_OBJECT_SHARE = 0.10
TOOD_WARMUP_EPOCHS = 4  # TOOD trains its first 4 epochs with ATSS assignment


class ProfileError(ValueError):
    """A profile request that cannot be served; the message says what to do."""


@dataclass
class ProfileInfo:
    """What a profile decided, for the console, ``config.yaml`` and ``summary.json``."""

    name: str
    input_size: int | None = None  # shorter side at test time
    input_rule: str = ""  # how the size was chosen
    weights: str = ""
    schedule: str = ""
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_size": self.input_size,
            "input_rule": self.input_rule,
            "weights": self.weights,
            "schedule": self.schedule,
            "warnings": list(self.warnings),
        }


def profile_for_dataset(train_name: str) -> str:
    """The default profile of a registered training set."""
    from tbd.data import TRAIN_NAME

    if train_name == TRAIN_NAME or train_name.startswith("tbd_shapes"):
        return "embedded"
    if train_name.startswith("user_"):
        return "custom"
    return "coco"  # COCO and Detectron2's other builtin datasets (LVIS, VOC, Cityscapes)


def _resnet_depth(cfg: CfgNode) -> int | None:
    name = cfg.MODEL.BACKBONE.NAME
    return int(cfg.MODEL.RESNETS.DEPTH) if "resnet" in name else None


def _is_mobilenet_v2(cfg: CfgNode) -> bool:
    return "mobilenet_v2" in cfg.MODEL.BACKBONE.NAME


def default_imagenet_weights(cfg: CfgNode) -> str:
    """``torchvision://resnet<depth>`` for a ResNet student, ``torchvision://mobilenet_v2`` for
    MobileNetV2; other backbones need their weights named."""
    if _is_mobilenet_v2(cfg):
        return "torchvision://mobilenet_v2"
    depth = _resnet_depth(cfg)
    if depth is None:
        raise ProfileError(
            f"no default ImageNet weights for backbone {cfg.MODEL.BACKBONE.NAME}: pass --student-weights "
            "(or MODEL.WEIGHTS), or --from-scratch"
        )
    return f"torchvision://resnet{depth}"


def apply_weights_convention(cfg: CfgNode, weights: str) -> str | None:
    """Set the input format, pixel mean/std and stride placement that ``weights`` were trained with."""
    from tbd.engine.weights import pixel_convention, pixel_family

    family = pixel_family(weights)
    for key, value in pixel_convention(family).items():
        node = cfg
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return family


def scale_to_batch(cfg: CfgNode, batch_size: int) -> None:
    """The linear scaling rule (Detectron2's ``auto_scale_workers``) from the profile's batch 16."""
    from detectron2.engine import DefaultTrainer

    reference = cfg.SOLVER.IMS_PER_BATCH
    if batch_size == reference:
        return
    if reference % 1:
        raise ProfileError(f"SOLVER.IMS_PER_BATCH {reference} is not a whole number")
    warmup_tal = cfg.MODEL.TAL.WARMUP_ITERS
    cfg.SOLVER.REFERENCE_WORLD_SIZE = reference  # one "worker" per image: scale by images
    scaled = DefaultTrainer.auto_scale_workers(cfg, batch_size)
    scaled.SOLVER.REFERENCE_WORLD_SIZE = 0  # done here; DefaultTrainer must not scale again
    cfg.merge_from_other_cfg(scaled)
    cfg.MODEL.TAL.WARMUP_ITERS = int(round(warmup_tal * reference / batch_size))


def _set_schedule(cfg: CfgNode, iters_at_16: int) -> None:
    cfg.SOLVER.MAX_ITER = int(iters_at_16)
    cfg.SOLVER.STEPS = (int(iters_at_16 * 2 / 3), int(iters_at_16 * 8 / 9))
    cfg.SOLVER.WARMUP_ITERS = min(1000, max(1, iters_at_16 // 10))
    cfg.SOLVER.CHECKPOINT_PERIOD = min(5000, max(1, iters_at_16 // 5))


def input_sizes(size: int, max_long: int) -> dict[str, Any]:
    """INPUT.* for test size ``size``: multi-scale training at 0.8..1.0 of it, same longer-side cap."""
    train = tuple(sorted({int(round(size * f)) for f in TRAIN_SCALES}))
    return {
        "MIN_SIZE_TRAIN": train,
        "MAX_SIZE_TRAIN": max_long,
        "MIN_SIZE_TEST": size,
        "MAX_SIZE_TEST": max_long,
    }


@dataclass(frozen=True)
class DataSizes:
    """Image and object sizes of a training set (pixels of the original images)."""

    num_images: int
    shorter: np.ndarray  # per image
    longer: np.ndarray
    object_side: np.ndarray  # sqrt(box area), per box
    object_shorter: np.ndarray  # the shorter side of the image each box is in
    object_longer: np.ndarray  # and its longer side

    @property
    def median_shorter(self) -> float:
        return float(np.median(self.shorter)) if self.shorter.size else 0.0


def data_sizes(dicts: Sequence[dict[str, Any]]) -> DataSizes:
    """Sizes from Detectron2 dataset dicts (``height``, ``width``, ``annotations[].bbox``)."""
    from detectron2.structures import BoxMode

    hw = np.array([(d.get("height", 0), d.get("width", 0)) for d in dicts], dtype=np.float64).reshape(-1, 2)
    boxes, owner = [], []
    for i, d in enumerate(dicts):
        for ann in d.get("annotations", ()):
            boxes.append(
                BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
            )
            owner.append(i)
    xyxy = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    side = np.sqrt(np.clip(xyxy[:, 2] - xyxy[:, 0], 0, None) * np.clip(xyxy[:, 3] - xyxy[:, 1], 0, None))
    shorter, longer = hw.min(axis=1), hw.max(axis=1)
    owner_idx = np.asarray(owner, dtype=np.int64)
    return DataSizes(len(dicts), shorter, longer, side, shorter[owner_idx], longer[owner_idx])


def choose_input_size(sizes: DataSizes) -> tuple[int, str]:
    """The custom profile's test shorter side: the median shorter side, bounded."""
    median = sizes.median_shorter
    if median <= 0:
        raise ProfileError("the training images have no height/width; pass --input-size")
    size = int(min(MAX_INPUT, max(MIN_INPUT, round(median))))
    rule = f"median shorter side of the training images {median:.0f} px"
    if size != round(median):
        rule += f", bounded to [{MIN_INPUT}, {MAX_INPUT}]"
    return size, rule


def long_side_cap(size: int) -> int:
    """The longer-side cap at shorter side ``size``: COCO's 1333/800 ratio, at most 1333."""
    return int(min(MAX_LONG_SIDE, math.ceil(size * MAX_LONG_SIDE / 800)))


def small_object_warning(sizes: DataSizes, size: int, max_long: int) -> str | None:
    """A warning when too many objects fall under :data:`SMALL_OBJECT_PX` at ``size``."""
    if sizes.object_side.size == 0:
        return None
    owner_scale = np.minimum(
        size / np.maximum(sizes.object_shorter, 1), max_long / np.maximum(sizes.object_longer, 1)
    )
    scaled = sizes.object_side * owner_scale
    share = float(np.mean(scaled < SMALL_OBJECT_PX))
    if share <= SMALL_OBJECT_SHARE:
        return None
    # the size at which the 10th percentile object reaches the threshold
    p10 = float(np.quantile(scaled, SMALL_OBJECT_SHARE))
    keep = int(math.ceil(size * SMALL_OBJECT_PX / max(p10, 1e-6) / 32) * 32)
    return (
        f"{100 * share:.0f}% of the training objects would be smaller than {SMALL_OBJECT_PX:.0f} px at input "
        f"size {size} (median object {float(np.median(scaled)):.1f} px there); --input-size {keep} keeps "
        f"{100 * (1 - SMALL_OBJECT_SHARE):.0f}% of them at {SMALL_OBJECT_PX:.0f} px or more"
    )


def apply_profile(
    cfg: CfgNode,
    profile: str,
    *,
    train_name: str,
    batch_size: int | None = None,
    schedule: str | None = None,
    input_size: int | None = None,
    from_scratch: bool = False,
    weights: str | None = None,
    world_size: int = 1,
) -> ProfileInfo:
    """Adapt the student config ``cfg`` (made for the embedded data) to ``profile``; in place."""
    if profile not in PROFILES:
        raise ProfileError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    info = ProfileInfo(name=profile)
    if profile == "embedded":
        if input_size or schedule:
            raise ProfileError(
                "--input-size and --schedule belong to the coco/custom profiles; the embedded profile keeps "
                "its 128 px CPU schedule (use --iters, or INPUT.* overrides)"
            )
        info.input_size = int(cfg.INPUT.MIN_SIZE_TEST)
        info.input_rule = "the embedded profile"
        if weights:
            cfg.MODEL.WEIGHTS = weights
            apply_weights_convention(cfg, weights)
        info.weights = cfg.MODEL.WEIGHTS
        return info

    cfg.merge_from_file(str(PROFILE_FILE))
    if _is_mobilenet_v2(cfg):  # the profile's FrozenBN for the backbone in use
        cfg.MODEL.MOBILENET.NORM = cfg.MODEL.RESNETS.NORM
    per_level = len(cfg.MODEL.ANCHOR_GENERATOR.SIZES[0])
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [
        [round(x * 2 ** (i / per_level), 2) for i in range(per_level)] for x in (32, 64, 128, 256, 512)
    ]
    schedule = schedule or "1x"
    if schedule not in SCHEDULES:
        raise ProfileError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    info.schedule = schedule

    if profile == "custom":
        from detectron2.data import DatasetCatalog

        dicts = DatasetCatalog.get(train_name)
        sizes = data_sizes(dicts)
        if input_size:
            size, rule = int(input_size), "--input-size"
        else:
            size, rule = choose_input_size(sizes)
        max_long = long_side_cap(size)
        for key, value in input_sizes(size, max_long).items():
            cfg.INPUT[key] = value
        info.input_size, info.input_rule = size, rule
        warning = small_object_warning(sizes, size, max_long)
        if warning:
            info.warnings.append(warning)
        epochs = EPOCHS_PER_1X * SCHEDULES[schedule] // SCHEDULES["1x"]
        iters = max(100, int(math.ceil(epochs * len(dicts) / REFERENCE_BATCH)))
        _set_schedule(cfg, iters)
        per_epoch = len(dicts) / REFERENCE_BATCH
        cfg.MODEL.TAL.WARMUP_ITERS = int(round(TOOD_WARMUP_EPOCHS * per_epoch))
        info.notes.append(
            f"{schedule} = {epochs} epochs of {len(dicts)} images = {iters} iterations at batch 16"
        )
    else:
        if input_size:
            max_long = long_side_cap(int(input_size))
            for key, value in input_sizes(int(input_size), max_long).items():
                cfg.INPUT[key] = value
            info.input_rule = "--input-size"
        else:
            info.input_rule = "Detectron2's COCO setting"
        info.input_size = int(cfg.INPUT.MIN_SIZE_TEST)
        _set_schedule(cfg, SCHEDULES[schedule])
        if schedule == "3x":  # Detectron2's 3x decays later than 2/3 and 8/9
            cfg.SOLVER.STEPS = (210000, 250000)
        cfg.SOLVER.CHECKPOINT_PERIOD = 5000

    if from_scratch:
        if weights:
            raise ProfileError("--from-scratch and --student-weights contradict each other; pass one")
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        cfg.MODEL.RESNETS.NORM = "SyncBN" if world_size > 1 else "BN"
        if _is_mobilenet_v2(cfg):
            cfg.MODEL.MOBILENET.NORM = cfg.MODEL.RESNETS.NORM
        info.notes.append("from scratch: BatchNorm trained, nothing frozen")
    else:
        cfg.MODEL.WEIGHTS = weights or default_imagenet_weights(cfg)
        apply_weights_convention(cfg, cfg.MODEL.WEIGHTS)
    info.weights = cfg.MODEL.WEIGHTS or "(from scratch)"
    if batch_size:
        scale_to_batch(cfg, int(batch_size))
    return info
