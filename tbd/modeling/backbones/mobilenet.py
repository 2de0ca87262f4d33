"""MobileNetV2 as a Detectron2 backbone, and the FPNs that put the tbd heads on top of it.

The bottom-up network is MobileNetV2 (Sandler et al., CVPR 2018) written with Detectron2's own
pieces (:class:`~detectron2.layers.CNNBlockBase`, :func:`~detectron2.layers.get_norm`, FrozenBN),
grouped into stages by output stride, like the ResNets:

============  =====================  ======  ==============================  ==================
stage         torchvision indices    stride  channels (``WIDTH_MULT`` 1.0)   ``FREEZE_AT`` that
                                                                             freezes it
============  =====================  ======  ==============================  ==================
``stem``      ``features.0-1``       2       16                              >= 1
``m2``        ``features.2-3``       4       24                              >= 2
``m3``        ``features.4-6``       8       32                              >= 3
``m4``        ``features.7-13``      16      96                              >= 4
``m5``        ``features.14-18``     32      1280 (320 without LAST_CONV)    >= 5
============  =====================  ======  ==============================  ==================

``MODEL.BACKBONE.FREEZE_AT`` keeps the ResNet meaning: 0 trains everything, ``k >= 1`` freezes the
stem and the stages before ``m{k+1}`` (their BatchNorms become FrozenBN).

Three builders are registered in ``BACKBONE_REGISTRY``:

- ``build_mobilenet_v2_backbone``: the bottom-up network alone (outputs ``MOBILENET.OUT_FEATURES``).
- ``build_mobilenet_v2_fpn_backbone``: FPN on ``m3-m5`` plus P6/P7 -> ``p3-p7`` for the dense heads
  (RetinaNet, FCOS, TOOD, ET, DW). P6 is computed from P5, not from C5: a 3x3 conv on the 1280
  channels of ``m5`` would hold 1.5 M parameters at 128 FPN channels, two thirds of the backbone.
- ``build_mobilenet_v2_fpn_rcnn_backbone``: FPN on ``m2-m5`` plus max-pooled P6 -> ``p2-p6``
  (Faster R-CNN).

The FPN outputs carry the same names as the ResNet FPNs (``p3``...), so heads, probes and the
distiller need nothing new.

Weights: :func:`convert_torchvision_mobilenet_v2` maps torchvision's ``mobilenet_v2`` state dict
onto this module's names (relative to the bottom-up network: prefix ``backbone.bottom_up.`` for a
detector); :func:`load_mobilenet_v2_weights` loads such a dict into a built model. An ImageNet
backbone from torchvision expects RGB input scaled like torchvision's transforms, i.e. in
Detectron2 terms ``INPUT.FORMAT "RGB"``, ``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]`` and
``MODEL.PIXEL_STD [58.395, 57.12, 57.375]`` (:data:`TORCHVISION_PIXEL_MEAN` / ``_STD``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from torch import Tensor, nn

#: torchvision's ImageNet normalisation in Detectron2's units (0-255 pixels, RGB order)
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)
TORCHVISION_INPUT_FORMAT = "RGB"

STAGE_NAMES = ("stem", "m2", "m3", "m4", "m5")
_STAGE_STRIDES = {"stem": 2, "m2": 4, "m3": 8, "m4": 16, "m5": 32}

#: the inverted-residual groups of MobileNetV2: (expansion t, channels c, repeats n, first stride s,
#: stage). Stage boundaries fall where the stride changes; the stride-16 groups form ``m4`` and the
#: stride-32 groups (and the final 1x1 conv) ``m5``.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1, "stem"),
    (6, 24, 2, 2, "m2"),
    (6, 32, 3, 2, "m3"),
    (6, 64, 4, 2, "m4"),
    (6, 96, 3, 1, "m4"),
    (6, 160, 3, 2, "m5"),
    (6, 320, 1, 1, "m5"),
)
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280

#: norms the backbone accepts (``GN`` here picks a group count that divides every width)
NORMS = ("FrozenBN", "BN", "SyncBN", "GN", "nnSyncBN", "naiveSyncBN")


def add_mobilenet_config(cfg: CN) -> None:
    """``MODEL.MOBILENET.*``; ``MODEL.BACKBONE.FREEZE_AT`` is shared with the ResNets."""
    cfg.MODEL.MOBILENET = CN()
    # FrozenBN (Detectron2's default for ImageNet-initialised backbones), BN, SyncBN or GN
    cfg.MODEL.MOBILENET.NORM = "FrozenBN"
    # any of stem (stride 2), m2 (4), m3 (8), m4 (16), m5 (32); the FPN builders need
    # MODEL.FPN.IN_FEATURES among them
    cfg.MODEL.MOBILENET.OUT_FEATURES = ["m3", "m4", "m5"]
    # channel multiplier of every layer (torchvision's width_mult); ImageNet weights exist for 1.0
    cfg.MODEL.MOBILENET.WIDTH_MULT = 1.0
    # end m5 with MobileNetV2's final 1x1 conv to 1280 channels (torchvision's features.18)
    cfg.MODEL.MOBILENET.LAST_CONV = True


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10 % below ``value``
    (MobileNetV2's rule, so that widths match torchvision's for any ``width_mult``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _norm(norm: str, channels: int) -> nn.Module | None:
    if norm == "GN":
        # Detectron2's "GN" is GroupNorm(32, c), which cannot split 16, 24 or 144 channels
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return get_norm(norm, channels)


def _conv(
    in_channels: int, out_channels: int, kernel: int, stride: int, groups: int, norm: str, act: bool
) -> Conv2d:
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel,
        stride=stride,
        padding=(kernel - 1) // 2,
        groups=groups,
        bias=False,
        norm=_norm(norm, out_channels),
        activation=F.relu6 if act else None,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class InvertedResidual(CNNBlockBase):
    """1x1 expansion (absent when ``expand_ratio`` is 1) -> 3x3 depthwise -> linear 1x1 projection,
    with an identity shortcut when the shape is kept. Submodules: ``expand``, ``depthwise``,
    ``project`` (each a Detectron2 ``Conv2d`` with its norm in ``.norm``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, norm: str):
        super().__init__(in_channels, out_channels, stride)
        hidden = int(round(in_channels * expand_ratio))
        self.expand = _conv(in_channels, hidden, 1, 1, 1, norm, act=True) if expand_ratio != 1 else None
        self.depthwise = _conv(hidden, hidden, 3, stride, hidden, norm, act=True)
        self.project = _conv(hidden, out_channels, 1, 1, 1, norm, act=False)
        self.use_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.use_shortcut else y


class PointwiseConv(CNNBlockBase):
    """MobileNetV2's final 1x1 conv + norm + ReLU6 (submodule ``conv``)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__(in_channels, out_channels, 1)
        self.conv = _conv(in_channels, out_channels, 1, 1, 1, norm, act=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class MobileNetV2Stem(CNNBlockBase):
    """3x3 stride-2 conv (``conv1``) and the first inverted residual (``block``, no expansion)."""

    def __init__(self, conv_channels: int, out_channels: int, norm: str, in_channels: int = 3):
        super().__init__(in_channels, out_channels, 2)
        self.conv1 = _conv(in_channels, conv_channels, 3, 2, 1, norm, act=True)
        self.block = InvertedResidual(conv_channels, out_channels, 1, 1, norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.conv1(x))


@dataclass(frozen=True)
class _BlockSpec:
    stage: str
    index_in_stage: int
    torchvision_index: int  # features.<i>
    in_channels: int
    out_channels: int
    stride: int
    expand_ratio: int  # 0: the final pointwise conv


def _block_specs(width_mult: float, last_conv: bool) -> list[_BlockSpec]:
    """Every block after ``stem.conv1``, in order, with its stage and torchvision index."""
    if not width_mult > 0:
        raise ValueError(f"MODEL.MOBILENET.WIDTH_MULT must be > 0, got {width_mult}")
    specs: list[_BlockSpec] = []
    channels = make_divisible(_STEM_CHANNELS * width_mult)
    per_stage: dict[str, int] = {}
    for t, c, n, s, stage in _INVERTED_RESIDUAL_SETTING:
        out = make_divisible(c * width_mult)
        for i in range(n):
            pos = per_stage.get(stage, 0)
            per_stage[stage] = pos + 1
            specs.append(_BlockSpec(stage, pos, len(specs) + 1, channels, out, s if i == 0 else 1, t))
            channels = out
    if last_conv:
        last = make_divisible(_LAST_CHANNELS * max(1.0, width_mult))
        specs.append(_BlockSpec("m5", per_stage["m5"], len(specs) + 1, channels, last, 1, 0))
    return specs


class MobileNetV2(Backbone):
    """MobileNetV2's feature extractor as a Detectron2 backbone (stages ``stem``, ``m2``-``m5``).

    Stages after the deepest requested output are not built (as in Detectron2's ResNet).
    """

    def __init__(
        self,
        out_features: list[str],
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        width_mult: float = 1.0,
        last_conv: bool = True,
        in_channels: int = 3,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"MODEL.MOBILENET.NORM must be one of {', '.join(NORMS)}, got {norm!r}")
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if not out_features or unknown:
            raise ValueError(
                f"MODEL.MOBILENET.OUT_FEATURES must name stages among {', '.join(STAGE_NAMES)}, "
                f"got {list(out_features)}"
            )
        if not 0 <= freeze_at <= len(STAGE_NAMES):
            raise ValueError(
                f"MODEL.BACKBONE.FREEZE_AT must be in 0..{len(STAGE_NAMES)} for MobileNetV2 "
                f"(0: train all, 1: freeze the stem, k >= 2: the stem and m2 to mk), got {freeze_at}"
            )
        depth = max(STAGE_NAMES.index(f) for f in out_features)
        specs = _block_specs(width_mult, last_conv)
        first = specs[0]
        self.stem = MobileNetV2Stem(first.in_channels, first.out_channels, norm, in_channels)
        self._out_feature_strides = {"stem": 2}
        self._out_feature_channels = {"stem": first.out_channels}
        self.stage_names: list[str] = []
        for stage in STAGE_NAMES[1 : depth + 1]:
            blocks: list[CNNBlockBase] = []
            for spec in (s for s in specs if s.stage == stage):
                if spec.expand_ratio == 0:
                    blocks.append(PointwiseConv(spec.in_channels, spec.out_channels, norm))
                else:
                    blocks.append(
                        InvertedResidual(
                            spec.in_channels, spec.out_channels, spec.stride, spec.expand_ratio, norm
                        )
                    )
            self.add_module(stage, nn.Sequential(*blocks))
            self.stage_names.append(stage)
            self._out_feature_strides[stage] = _STAGE_STRIDES[stage]
            self._out_feature_channels[stage] = blocks[-1].out_channels
        self._out_features = list(out_features)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> MobileNetV2:
        """Freeze the stem (``freeze_at >= 1``) and stages ``m2``..``m{freeze_at}``."""
        if freeze_at >= 1:
            self.stem.freeze()
        for idx, stage in enumerate(self.stage_names, start=2):
            if freeze_at >= idx:
                for block in getattr(self, stage).children():
                    block.freeze()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4:
            raise ValueError(f"MobileNetV2 takes [N, C, H, W] inputs, got shape {tuple(x.shape)}")
        outputs: dict[str, Tensor] = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for stage in self.stage_names:
            x = getattr(self, stage)(x)
            if stage in self._out_features:
                outputs[stage] = x
        return outputs

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


# ------------------------------------------------------------------------------------- builders
@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_backbone(cfg: CN, input_shape: ShapeSpec) -> MobileNetV2:
    mc = cfg.MODEL.MOBILENET
    return MobileNetV2(
        out_features=list(mc.OUT_FEATURES),
        norm=mc.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        width_mult=float(mc.WIDTH_MULT),
        last_conv=bool(mc.LAST_CONV),
        in_channels=input_shape.channels,
    )


def _fpn_bottom_up(cfg: CN, input_shape: ShapeSpec) -> tuple[MobileNetV2, list[str]]:
    bottom_up = build_mobilenet_v2_backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {in_features} asks for {missing}, which MobileNetV2 does not "
            f"output: set MODEL.MOBILENET.OUT_FEATURES to include them (it is "
            f"{list(cfg.MODEL.MOBILENET.OUT_FEATURES)})"
        )
    return bottom_up, in_features


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_fpn_backbone(cfg: CN, input_shape: ShapeSpec) -> FPN:
    """MobileNetV2 + FPN + P6/P7 from P5: ``p3``-``p7`` with ``FPN.IN_FEATURES`` ``m3, m4, m5``."""
    bottom_up, in_features = _fpn_bottom_up(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    last_level = int(math.log2(bottom_up.output_shape()[in_features[-1]].stride))
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature=f"p{last_level}"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_mobilenet_v2_fpn_rcnn_backbone(cfg: CN, input_shape: ShapeSpec) -> FPN:
    """MobileNetV2 + FPN + max-pooled P6: ``p2``-``p6`` with ``FPN.IN_FEATURES`` ``m2``-``m5``."""
    bottom_up, in_features = _fpn_bottom_up(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


# -------------------------------------------------------------------------------------- weights
_TV_KEY = re.compile(r"features\.(\d+)\.(.+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
#: torchvision sub-paths -> ours: an InvertedResidual with and without its expansion conv, and a
#: plain conv+BN (features.0 and features.18)
_EXPANDED = {
    "conv.0.0": ".expand",
    "conv.0.1": ".expand.norm",
    "conv.1.0": ".depthwise",
    "conv.1.1": ".depthwise.norm",
    "conv.2": ".project",
    "conv.3": ".project.norm",
}
_NOT_EXPANDED = {
    "conv.0.0": ".depthwise",
    "conv.0.1": ".depthwise.norm",
    "conv.1": ".project",
    "conv.2": ".project.norm",
}
_CONV_BN = {"0": "", "1": ".norm"}


def _torchvision_prefixes() -> dict[int, str]:
    """torchvision ``features`` index -> the module path of the same layer here."""
    prefixes = {0: "stem.conv1"}
    for spec in _block_specs(1.0, last_conv=True):
        if spec.stage == "stem":
            prefixes[spec.torchvision_index] = "stem.block"
        elif spec.expand_ratio == 0:
            prefixes[spec.torchvision_index] = f"m5.{spec.index_in_stage}.conv"
        else:
            prefixes[spec.torchvision_index] = f"{spec.stage}.{spec.index_in_stage}"
    return prefixes


def convert_torchvision_mobilenet_v2(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ``mobilenet_v2`` state dict -> this module's names, relative to :class:`MobileNetV2`.

    ``classifier.*`` and ``num_batches_tracked`` are dropped; the BN tensors (``weight``, ``bias``,
    ``running_mean``, ``running_var``) serve BN, SyncBN and FrozenBN alike. Any other key is an
    error. The layout is the same for every ``width_mult``. For a detector, prefix the result
    with ``backbone.bottom_up.``.
    """
    if "features.0.0.weight" not in state_dict:
        head = ", ".join(list(state_dict)[:5])
        raise ValueError(
            "not a torchvision mobilenet_v2 state dict: 'features.0.0.weight' is missing "
            f"(first keys: {head or 'none'}); pass torchvision.models.mobilenet_v2().state_dict() or "
            "the file of MobileNet_V2_Weights.IMAGENET1K_V1 (mobilenet_v2-b0353104.pth)"
        )
    prefixes = _torchvision_prefixes()
    plain = {0, max(prefixes)}
    out: dict[str, Tensor] = {}
    bad: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            continue
        m = _TV_KEY.match(key)
        if m is None or int(m.group(1)) not in prefixes:
            bad.append(key)
            continue
        idx, path, leaf = int(m.group(1)), m.group(2), m.group(3)
        if leaf == "num_batches_tracked":
            continue
        if idx in plain:
            table = _CONV_BN
        elif f"features.{idx}.conv.3.weight" in state_dict:
            table = _EXPANDED
        else:
            table = _NOT_EXPANDED
        if path not in table:
            bad.append(key)
            continue
        out[f"{prefixes[idx]}{table[path]}.{leaf}"] = value
    if bad:
        raise ValueError(
            f"{len(bad)} key(s) of the state dict are not torchvision MobileNetV2 tensors: "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
        )
    return out


@dataclass
class LoadReport:
    """What :func:`load_mobilenet_v2_weights` did."""

    loaded: int  # tensors copied into the backbone
    skipped: list[str] = field(default_factory=list)  # keys of stages the model does not build


class WeightsMismatchError(ValueError):
    """A weights dict that does not fit the backbone (names or shapes); the message lists them."""


def find_mobilenet_v2(model: nn.Module) -> MobileNetV2:
    """The one :class:`MobileNetV2` inside ``model`` (a detector, an FPN, or the backbone itself)."""
    found = [m for m in model.modules() if isinstance(m, MobileNetV2)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one MobileNetV2 backbone in {type(model).__name__}, found {len(found)}; "
            "pass the model (or its backbone) whose weights are to be loaded"
        )
    return found[0]


def _listing(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")


def load_mobilenet_v2_weights(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "the weights"
) -> LoadReport:
    """Load a torchvision ``mobilenet_v2`` state dict (or an already converted one) into the
    MobileNetV2 of ``model``. Every backbone tensor must be filled (``num_batches_tracked`` aside)
    with the right shape, and every given tensor used, except those of stages that the model does
    not build (``OUT_FEATURES`` stopping early, ``LAST_CONV`` off); anything else raises
    :class:`WeightsMismatchError`. Heads and FPN are left as they are."""
    backbone = find_mobilenet_v2(model)
    weights = (
        convert_torchvision_mobilenet_v2(state_dict)
        if "features.0.0.weight" in state_dict
        else dict(state_dict)
    )
    target = backbone.state_dict()
    built = ("stem", *backbone.stage_names)
    not_built = set(STAGE_NAMES) - set(built)
    skipped = sorted(k for k in weights if k.split(".", 1)[0] in not_built)
    if "m5" in built and not any(isinstance(b, PointwiseConv) for b in backbone.m5):
        # LAST_CONV off: the final conv of the weights has no place in this backbone
        n = len(backbone.m5)
        skipped += sorted(k for k in weights if k.startswith(f"m5.{n}."))
    skip = set(skipped)
    given = {k: v for k, v in weights.items() if k not in skip}
    expected = [k for k in target if not k.endswith("num_batches_tracked")]
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in target]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
        raise WeightsMismatchError(
            f"{source} do not fit the MobileNetV2 backbone ({'; '.join(parts)}); they must be a "
            "torchvision mobilenet_v2 state dict, or its conversion by convert_torchvision_mobilenet_v2"
        )
    shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in given.items()
        if tuple(v.shape) != tuple(target[k].shape)
    ]
    if shapes:
        raise WeightsMismatchError(
            f"{source}: {len(shapes)} tensor(s) have another shape than the backbone's "
            f"(given vs model): {_listing(shapes)}; ImageNet weights exist for WIDTH_MULT 1.0 only"
        )
    with torch.no_grad():
        for k, v in given.items():
            target[k].copy_(v)
    return LoadReport(loaded=len(given), skipped=skipped)
