"""Initial weights for a model: resolve a name, read any of the usual formats, load with a report.

``MODEL.WEIGHTS`` (``--student-weights`` / ``--weights``) may be

* a Detectron2 checkpoint (``.pth``; a whole detector, or a tbd distillation run's checkpoint),
* a Detectron2 / Caffe2 ``.pkl`` (``detectron2://ImageNetPretrained/MSRA/R-50.pkl``, model-zoo files),
* a torchvision ResNet state dict (``resnet50-0676ba61.pth``), converted on load to Detectron2's
  names (``stem``, ``res2`` … ``res5``, ``shortcut``, ``norm``),
* ``torchvision://resnet18`` (``resnet34``, ``resnet50``, ``resnet101``, ``mobilenet_v2``;
  optionally ``torchvision://resnet50/IMAGENET1K_V2``), resolved through torchvision's weights API,
  which keeps its files under ``$TORCH_HOME/hub/checkpoints``,
* a torchvision ``mobilenet_v2`` state dict, for the MobileNetV2 backbone (tbd.modeling.backbones.mobilenet).

A backbone-only file (ImageNet weights) fills the bottom-up backbone; a partial fill (a backbone
tensor missing in the file, or a file tensor the backbone does not have) is an error unless
``TBD.ALLOW_PARTIAL_WEIGHTS`` is set, since a silently half-random backbone is worse than none.
Every load returns a :class:`WeightsReport` that says how many tensors were filled.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

TORCHVISION_SCHEME = "torchvision://"
#: the torchvision weights tbd knows how to convert, and their default weights enum member
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")
DEFAULT_TORCHVISION_WEIGHTS = "IMAGENET1K_V1"

#: pixel conventions of the two families of ImageNet weights (Detectron2 config values)
TORCHVISION_PIXELS = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
}
MSRA_PIXELS = {
    "INPUT.FORMAT": "BGR",
    "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
}


class WeightsError(ValueError):
    """Initial weights that cannot be found, read or used; the message says what to do."""


@dataclass
class WeightsReport:
    """What one load did."""

    source: str
    kind: str  # "torchvision-resnet", "caffe2", "detectron2-backbone", "detectron2-model", ...
    filled: int = 0  # model tensors that received a value
    target_total: int = 0  # tensors of the part loaded into (the backbone, or the whole model)
    target: str = ""  # the module loaded into ("backbone.bottom_up", "" = whole model)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    other_shape: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected)

    def summary(self) -> str:
        where = f"{self.target} tensors" if self.target else "model tensors"
        text = (
            f"initial weights {self.source} ({self.kind}): {self.filled}/{self.target_total} {where} filled"
        )
        if self.other_shape:
            text += f"; {len(self.other_shape)} skipped for another shape (e.g. {self.other_shape[0]})"
        if self.missing:
            text += f"; {len(self.missing)} missing (e.g. {self.missing[0]})"
        if self.unexpected:
            text += f"; {len(self.unexpected)} in the file but not in the model (e.g. {self.unexpected[0]})"
        return text


# --------------------------------------------------------------------------- resolving names
def torchvision_weights(spec: str) -> Any:
    """The torchvision ``WeightsEnum`` member named by ``torchvision://NAME[/MEMBER]``."""
    from torchvision.models import get_model_weights

    rest = spec[len(TORCHVISION_SCHEME) :]
    name, _, member = rest.partition("/")
    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError):
        raise WeightsError(
            f"{spec}: torchvision has no model {name!r}; tbd converts {', '.join(TORCHVISION_MODELS)}"
        ) from None
    member = member or DEFAULT_TORCHVISION_WEIGHTS
    if member not in enum.__members__:
        raise WeightsError(
            f"{spec}: {name} has no weights {member!r} (it has: {', '.join(enum.__members__)})"
        )
    return enum[member]


def torchvision_cache_file(spec: str) -> Path:
    """Where torchvision keeps (or would keep) the file of ``spec``: ``$TORCH_HOME/hub/checkpoints``."""
    url = torchvision_weights(spec).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _read_torchvision(spec: str) -> dict[str, torch.Tensor]:
    weights = torchvision_weights(spec)
    target = torchvision_cache_file(spec)
    try:
        return dict(weights.get_state_dict(progress=False))
    except Exception as err:  # offline: URLError, socket errors, ...
        raise WeightsError(
            f"{spec} needs torchvision's file {target.name} in {target.parent} (it is looked up under "
            f"$TORCH_HOME/hub/checkpoints; TORCH_HOME={os.environ.get('TORCH_HOME', 'unset')}), and "
            f"downloading it failed ({type(err).__name__}: {err}). Fetch {weights.url} on a machine "
            f"with network access and put it at {target} (or set TORCH_HOME to a folder whose "
            "hub/checkpoints/ holds it), or pass the local file as the initial weights: --weights FILE "
            "(tbd train, a registry teacher too), --student-weights FILE (tbd distill's student)."
        ) from err


def local_weights_file(spec: str) -> str:
    """A local path for a file path or a URL (``detectron2://``, ``https://``), with clear errors."""
    if "://" not in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights file {spec} does not exist; pass a checkpoint file, a URL or torchvision://NAME"
            )
        return str(path)
    from detectron2.utils.file_io import PathManager

    try:
        return PathManager.get_local_path(spec)
    except Exception as err:
        raise WeightsError(
            f"could not fetch the weights {spec} ({type(err).__name__}: {err}). Without network access, "
            "download that file on another machine and pass its local path instead"
        ) from err


# --------------------------------------------------------------------------- reading files
def read_weights(spec: str) -> tuple[dict[str, Any], str]:
    """``(state dict, kind)`` of ``spec`` in its own names; ``kind`` says which naming it uses."""
    if spec.startswith(TORCHVISION_SCHEME):
        state = _read_torchvision(spec)
        return state, _state_kind(state)
    local = local_weights_file(spec)
    try:
        if local.endswith(".pkl"):
            with open(local, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(local, map_location="cpu", weights_only=False)
    except Exception as err:
        raise WeightsError(
            f"weights file {spec} cannot be read as a checkpoint ({type(err).__name__}: {err}); "
            "pass a Detectron2 .pth/.pkl or a torchvision state dict"
        ) from err
    if not isinstance(data, Mapping):
        raise WeightsError(
            f"weights file {spec} holds a {type(data).__name__}, not a state dict or checkpoint"
        )
    author = data.get("__author__") if isinstance(data.get("__author__"), str) else None
    if "blobs" in data:
        data = data["blobs"]
    elif "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]
    state = {str(k): v for k, v in data.items() if not str(k).endswith("_momentum")}
    kind = "caffe2" if author == "Caffe2" else _state_kind(state)
    return state, kind


_TV_RESNET = re.compile(r"^layer[1-4]\.\d+\.")
_D2_BOTTOM_UP = re.compile(r"^(stem\.|res[2-5]\.\d+\.)")


def _state_kind(state: Mapping[str, Any]) -> str:
    keys = list(state)
    if "conv1.weight" in state and any(_TV_RESNET.match(k) for k in keys):
        return "torchvision-resnet"
    if any(k.startswith("features.") for k in keys) and "features.0.0.weight" in state:
        return "torchvision-mobilenet_v2"
    if keys and all(_D2_BOTTOM_UP.match(k) or k.startswith(("linear.", "fc.")) for k in keys):
        return "detectron2-backbone"
    if any(k.endswith("_w") or k.endswith("_b") for k in keys) and "conv1_w" in state:
        return "caffe2"
    return "detectron2-model"


# --------------------------------------------------------------------------- converting names
def convert_torchvision_resnet(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """torchvision ResNet names -> Detectron2 bottom-up ResNet names (classifier dropped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        new = key
        new = re.sub(r"^conv1\.", "stem.conv1.", new)
        new = re.sub(r"^bn1\.", "stem.conv1.norm.", new)
        new = re.sub(r"^layer([1-4])\.", lambda m: f"res{int(m.group(1)) + 1}.", new)
        new = re.sub(r"\.bn([1-3])\.", r".conv\1.norm.", new)
        new = new.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        out[new] = torch.as_tensor(value)
    return out


def _as_tensor(value: Any) -> torch.Tensor:
    """A tensor for a tensor or a NumPy array (Caffe2 / Detectron2 .pkl files hold arrays)."""
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def convert_caffe2_backbone(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Caffe2 / Detectron1 ImageNet names (``res2_0_branch2a_w``) -> Detectron2 bottom-up names."""
    from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names

    renamed, _ = convert_c2_detectron_names({k: v for k, v in state.items()})
    return {k: _as_tensor(v) for k, v in renamed.items() if _D2_BOTTOM_UP.match(k)}


def convert_torchvision_mobilenet_v2(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """torchvision ``mobilenet_v2`` names -> the names of tbd's MobileNetV2 bottom-up network."""
    from tbd.modeling.backbones.mobilenet import convert_torchvision_mobilenet_v2 as convert

    return convert({k: _as_tensor(v) for k, v in state.items()})


#: state-dict kind -> converter to Detectron2 bottom-up names (other modules may add theirs)
BACKBONE_CONVERTERS: dict[str, Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]] = {
    "torchvision-resnet": convert_torchvision_resnet,
    "torchvision-mobilenet_v2": convert_torchvision_mobilenet_v2,
    "caffe2": convert_caffe2_backbone,
    "detectron2-backbone": lambda s: {k: _as_tensor(v) for k, v in s.items() if _D2_BOTTOM_UP.match(k)},
}


# --------------------------------------------------------------------------- loading
def bottom_up_name(model: nn.Module) -> str:
    """Dotted name of the model's bottom-up backbone (the student's, inside a distiller)."""
    names = [
        n for n, _ in model.named_modules() if n == "backbone.bottom_up" or n.endswith(".backbone.bottom_up")
    ]
    names = [n for n in names if not n.startswith(("teacher", "baseline"))]  # a distiller's student
    if names:
        return min(names, key=len)
    if hasattr(model, "backbone"):
        return "backbone"
    student = getattr(model, "student", None)
    if isinstance(student, nn.Module) and hasattr(student, "backbone"):
        return "student.backbone"
    raise WeightsError(f"{type(model).__name__} has no backbone to load ImageNet weights into")


def _ignorable(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_backbone_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, kind: str
) -> WeightsReport:
    """Load Detectron2-named bottom-up tensors into the model's bottom-up backbone."""
    target = bottom_up_name(model)
    module = model.get_submodule(target)
    own = module.state_dict()
    report = WeightsReport(
        source=source, kind=kind, target=target, target_total=len([k for k in own if not _ignorable(k)])
    )
    report.missing = [k for k in own if k not in state and not _ignorable(k)]
    report.unexpected = [k for k in state if k not in own]
    report.other_shape = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if report.other_shape:
        raise WeightsError(
            f"{source} does not fit the backbone: {len(report.other_shape)} tensors have another shape "
            f"(e.g. {report.other_shape[0]}). The weights are for another architecture or depth: pick the "
            "weights of the same depth (torchvision://resnet18 for R-18, ...)"
        )
    usable = {k: v.to(own[k].dtype) for k, v in state.items() if k in own}
    module.load_state_dict(usable, strict=False)
    report.filled = len([k for k in usable if not _ignorable(k)])
    return report


def load_mobilenet_v2_backbone(
    model: nn.Module, state: Mapping[str, Any], source: str, kind: str
) -> WeightsReport:
    """Load torchvision ``mobilenet_v2`` weights into the model's MobileNetV2 bottom-up network.

    The stages the backbone does not build (``OUT_FEATURES`` stopping early, ``LAST_CONV`` off) are
    left out of the comparison; every other tensor must fit (tbd.modeling.backbones.mobilenet checks it).
    """
    from tbd.modeling.backbones.mobilenet import (
        WeightsMismatchError,
        find_mobilenet_v2,
        load_mobilenet_v2_weights,
    )

    target = bottom_up_name(model)
    module = model.get_submodule(target)
    try:
        backbone = find_mobilenet_v2(module)
    except ValueError:
        raise WeightsError(
            f"{source} holds MobileNetV2 weights, but this model's backbone is {type(module).__name__}: "
            "pick the weights of its backbone (torchvision://resnet18 for R-18, ...)"
        ) from None
    try:
        got = load_mobilenet_v2_weights(backbone, {k: _as_tensor(v) for k, v in state.items()}, source)
    except WeightsMismatchError as err:
        raise WeightsError(str(err)) from None
    total = len([k for k in backbone.state_dict() if not _ignorable(k)])
    return WeightsReport(source=source, kind=kind, filled=got.loaded, target_total=total, target=target)


#: state-dict kinds whose loading depends on what the model builds (checked there, not by names)
BACKBONE_LOADERS: dict[str, Callable[[nn.Module, Mapping[str, Any], str, str], WeightsReport]] = {
    "torchvision-mobilenet_v2": load_mobilenet_v2_backbone,
}


def load_model_weights(model: nn.Module, state: Mapping[str, Any], source: str, kind: str) -> WeightsReport:
    """Load a whole-detector checkpoint; tensors of another shape (e.g. a class count) are skipped."""
    own = model.state_dict()
    keys = set(own)
    if not any(k in keys for k in state) and any(k.startswith("student.") for k in state):
        state = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    elif not any(k in keys for k in state) and any(f"student.{k}" in keys for k in state):
        state = {f"student.{k}": v for k, v in state.items()}
    state = {k: _as_tensor(v) for k, v in state.items()}
    bottom = bottom_up_name(model) + "."
    report = WeightsReport(
        source=source, kind=kind, target="", target_total=len([k for k in own if not _ignorable(k)])
    )
    report.other_shape = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    usable = {
        k: v.to(own[k].dtype) for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)
    }
    # a whole-model file may leave a head out (another head, another class count), never the backbone
    report.missing = [k for k in own if k.startswith(bottom) and k not in usable and not _ignorable(k)]
    report.unexpected = [k for k in state if k not in own and not _ignorable(k) and k.startswith(bottom)]
    model.load_state_dict(usable, strict=False)
    report.filled = len([k for k in usable if not _ignorable(k)])
    if report.filled == 0:
        raise WeightsError(
            f"{source}: none of its {len(state)} tensors matches the model (file names like "
            f"{next(iter(state), '?')!r}, model names like {next(iter(own))!r}); pass a checkpoint of this "
            "architecture, ImageNet weights of its backbone, or torchvision://resnetNN"
        )
    return report


def load_initial_weights(model: nn.Module, spec: str, allow_partial: bool = False) -> WeightsReport | None:
    """Load ``spec`` into ``model`` (see the module doc); ``None`` when ``spec`` is empty."""
    if not spec:
        return None
    state, kind = read_weights(spec)
    if kind in BACKBONE_LOADERS:
        report = BACKBONE_LOADERS[kind](model, state, spec, kind)
    elif kind in BACKBONE_CONVERTERS:
        converted = BACKBONE_CONVERTERS[kind](state)
        report = load_backbone_weights(model, converted, spec, kind)
    elif kind.startswith("torchvision-"):
        raise WeightsError(
            f"{spec} is a {kind[len('torchvision-') :]} state dict, which this model's backbone cannot take "
            "(tbd converts torchvision ResNets and MobileNetV2)"
        )
    else:
        report = load_model_weights(model, state, spec, kind)
    if not report.complete:
        message = (
            f"{report.summary()}. The weights only partly fit this model's backbone: pick the weights "
            "of this backbone, or set TBD.ALLOW_PARTIAL_WEIGHTS True (--allow-partial-weights) to keep "
            "the partial load"
        )
        if not allow_partial:
            raise WeightsError(message)
        logger.warning(message)
    logger.info(report.summary())
    return report


def pixel_family(spec: str) -> str | None:
    """``"torchvision"`` or ``"msra"``: the input convention ImageNet weights ``spec`` were trained
    with (``None`` for a detector checkpoint, whose own config says it)."""
    if not spec:
        return None
    if spec.startswith(TORCHVISION_SCHEME) or "ImageNetPretrained/torchvision/" in spec:
        return "torchvision"
    if "ImageNetPretrained/MSRA/" in spec:
        return "msra"
    if "://" in spec:
        return None
    kind = read_weights(spec)[1]
    if kind.startswith("torchvision-"):
        return "torchvision"
    return "msra" if kind == "caffe2" else None


def pixel_convention(family: str | None) -> dict[str, Any]:
    """The config values (dotted keys) a backbone initialised from ``family`` weights needs."""
    return {"torchvision": dict(TORCHVISION_PIXELS), "msra": dict(MSRA_PIXELS)}.get(family or "", {})


# --------------------------------------------------------------------------- plain Detectron2
_converted_dir_name = "detectron2"


def converted_weights_file(spec: str) -> Path:
    """``torchvision://NAME`` as a Detectron2 ``.pkl`` (bottom-up names, matching heuristics on).

    Written once beside torchvision's own file; this is what Detectron2's ``DetectionCheckpointer``
    reads when a plain ``DefaultTrainer`` config says ``MODEL.WEIGHTS: torchvision://resnet50``.
    """
    source = torchvision_cache_file(spec)
    target = source.parent / _converted_dir_name / f"{source.stem}.pkl"
    if target.is_file():
        return target
    state, kind = read_weights(spec)
    if kind not in BACKBONE_CONVERTERS:
        raise WeightsError(f"{spec}: no conversion to Detectron2 names for a {kind} state dict")
    converted = BACKBONE_CONVERTERS[kind](state)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        payload = {k: v.numpy() for k, v in converted.items()}
        pickle.dump({"model": payload, "__author__": "torchvision", "matching_heuristics": True}, f)
    os.replace(tmp, target)
    return target


def register_torchvision_scheme() -> None:
    """Let Detectron2's ``PathManager`` (hence ``DetectionCheckpointer``) open ``torchvision://``."""
    from detectron2.utils.file_io import PathManager
    from iopath.common.file_io import PathHandler

    class _TorchvisionHandler(PathHandler):
        def _get_supported_prefixes(self) -> list[str]:
            return [TORCHVISION_SCHEME]

        def _get_local_path(self, path: str, **kwargs: Any) -> str:
            return str(converted_weights_file(path))

        def _open(self, path: str, mode: str = "r", **kwargs: Any) -> Any:
            return open(self._get_local_path(path), mode)

    if TORCHVISION_SCHEME not in getattr(PathManager, "_path_handlers", {}):
        PathManager.register_handler(_TorchvisionHandler())
