"""Probes: read FPN features and dense predictions out of an ordinary Detectron2 forward.

Nothing is re-implemented: a forward hook on the model's dense head records the features it was
given (the FPN outputs) and what it returned; the model's own anchor generator and box transform
then turn those outputs into location-major tensors (:class:`LevelPrediction`).

One :class:`ProbeAdapter` per model family, found through the class hierarchy of the model
(:func:`get_probe_adapter`). A new head needs one small adapter; see :class:`ProbeAdapter`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN, ProposalNetwork
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from torch import Tensor, nn


@dataclass
class LevelPrediction:
    """One FPN level of one model, for a batch of ``B`` images.

    ``feature [B, C, H, W]`` (the FPN output the head consumed), ``logits [B, H, W, A, K]`` raw
    classification logits (``K = 1`` for RPN objectness), ``boxes [B, H, W, A, 4]`` decoded
    ``x1y1x2y2`` boxes in input-image pixels, with the model's own box transform.
    """

    stride: int
    feature: Tensor
    logits: Tensor
    boxes: Tensor

    @property
    def size(self) -> tuple[int, int]:
        return int(self.feature.shape[-2]), int(self.feature.shape[-1])

    def crop(self, h: int, w: int) -> LevelPrediction:
        """The top-left ``h x w`` locations (padding is bottom/right, so they see the same pixels)."""
        if self.size == (h, w):
            return self
        return LevelPrediction(
            self.stride, self.feature[..., :h, :w], self.logits[:, :h, :w], self.boxes[:, :h, :w]
        )


class ProbeAdapter:
    """What tbd needs to know about one detector family. A subclass must provide:

    - :meth:`head`: the module called once per forward with the list of FPN features (in the
      order of :meth:`feature_names`) as its first positional argument; it is hooked.
    - :meth:`feature_names`: the backbone outputs that module consumes, in order.
    - :meth:`num_classes`: the detector's class count (``None``: class-agnostic, not checked).
    - :meth:`to_levels`: head outputs -> :class:`LevelPrediction` per level (raw logits reshaped
      to ``[B, H, W, A, K]``, boxes decoded to ``[B, H, W, A, 4]``).

    :meth:`strides`, :meth:`channels`, :meth:`preprocess` and :meth:`run_dense` (the teacher's
    truncated forward: preprocess -> backbone -> head, no post-processing) come for free.
    """

    def head(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def feature_names(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def num_classes(self, model: nn.Module) -> int | None:
        raise NotImplementedError

    def to_levels(
        self, model: nn.Module, features: Sequence[Tensor], head_output: Any
    ) -> list[LevelPrediction]:
        raise NotImplementedError

    def strides(self, model: nn.Module) -> list[int]:
        shapes = model.backbone.output_shape()
        return [int(shapes[f].stride) for f in self.feature_names(model)]

    def channels(self, model: nn.Module) -> list[int]:
        shapes = model.backbone.output_shape()
        return [int(shapes[f].channels) for f in self.feature_names(model)]

    def preprocess(self, model: nn.Module, batched_inputs: list[dict]) -> Tensor:
        return model.preprocess_image(batched_inputs).tensor

    def run_dense(self, model: nn.Module, batched_inputs: list[dict]) -> list[LevelPrediction]:
        """Backbone + FPN + dense head only (the teacher's forward); the caller sets no_grad/autocast."""
        feats = model.backbone(self.preprocess(model, batched_inputs))
        features = [feats[f] for f in self.feature_names(model)]
        return self.to_levels(model, features, self.head(model)(features))


def decode_anchor_levels(
    features: Sequence[Tensor],
    cls_maps: Sequence[Tensor],
    reg_maps: Sequence[Tensor],
    strides: Sequence[int],
    anchor_generator: Callable[[list[Tensor]], list[Any]],
    box2box_transform: Any,
) -> list[LevelPrediction]:
    """Shared by anchor- and point-based heads whose maps are ``[B, A*K, H, W]`` / ``[B, A*4, H, W]``
    (Detectron2's layout) and whose box transform has ``apply_deltas(deltas, anchors)``."""
    anchors = anchor_generator(list(features))
    out = []
    for feat, cls, reg, anc, stride in zip(features, cls_maps, reg_maps, anchors, strides):
        b, _, h, w = cls.shape
        anc = anc.tensor.float()  # [H*W*A, 4], location-major
        a = anc.shape[0] // (h * w)
        logits = cls.float().view(b, a, -1, h, w).permute(0, 3, 4, 1, 2)
        deltas = reg.float().view(b, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, 4)
        boxes = box2box_transform.apply_deltas(
            deltas.reshape(-1, 4), anc.unsqueeze(0).expand(b, -1, -1).reshape(-1, 4)
        ).view(b, h, w, a, 4)
        out.append(LevelPrediction(int(stride), feat.float(), logits, boxes))
    return out


def decode_point_levels(
    features: Sequence[Tensor],
    cls_maps: Sequence[Tensor],
    ltrb_maps: Sequence[Tensor],
    points: Sequence[Tensor],
    strides: Sequence[int],
    decode: Callable[[Tensor, Tensor], Tensor],
) -> list[LevelPrediction]:
    """Anchor-free heads with one point per location (``A = 1``): logits ``[B, K, H, W]`` and
    ltrb distances ``[B, 4, H, W]`` in pixels, decoded by the model's own ``decode(points, ltrb)``."""
    out = []
    for feat, cls, reg, pts, stride in zip(features, cls_maps, ltrb_maps, points, strides):
        b, _, h, w = cls.shape
        boxes = decode(pts.to(reg.device, reg.dtype), reg.flatten(2).transpose(1, 2))  # [B, HW, 4]
        logits = cls.float().permute(0, 2, 3, 1).reshape(b, h, w, 1, -1)
        out.append(LevelPrediction(int(stride), feat.float(), logits, boxes.float().reshape(b, h, w, 1, 4)))
    return out


class DenseDetectorAdapter(ProbeAdapter):
    """RetinaNet and Detectron2's FCOS: ``model.head`` on ``model.head_in_features``."""

    def head(self, model: nn.Module) -> nn.Module:
        return model.head

    def feature_names(self, model: nn.Module) -> list[str]:
        return list(model.head_in_features)

    def num_classes(self, model: nn.Module) -> int | None:
        return int(model.num_classes)

    def to_levels(
        self, model: nn.Module, features: Sequence[Tensor], head_output: Any
    ) -> list[LevelPrediction]:
        # RetinaNet returns (logits, deltas); FCOS adds centerness, which p_c does not use.
        cls_maps, reg_maps = head_output[0], head_output[1]
        return decode_anchor_levels(
            features, cls_maps, reg_maps, self.strides(model), model.anchor_generator, model.box2box_transform
        )


class RPNAdapter(ProbeAdapter):
    """Two-stage detectors: the RPN is the dense module (objectness logits, decoded anchors)."""

    def head(self, model: nn.Module) -> nn.Module:
        return model.proposal_generator.rpn_head

    def feature_names(self, model: nn.Module) -> list[str]:
        return list(model.proposal_generator.in_features)

    def num_classes(self, model: nn.Module) -> int | None:
        roi_heads = getattr(model, "roi_heads", None)
        return int(roi_heads.num_classes) if roi_heads is not None else None

    def to_levels(
        self, model: nn.Module, features: Sequence[Tensor], head_output: Any
    ) -> list[LevelPrediction]:
        objectness, deltas = head_output
        pg = model.proposal_generator
        return decode_anchor_levels(
            features, objectness, deltas, self.strides(model), pg.anchor_generator, pg.box2box_transform
        )


def _tensors(output: Any) -> list[Tensor]:
    """The tensors of a head's output (nested lists, tuples, NamedTuples), in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def _map_tensors(output: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``output`` with ``fn`` applied to each of its tensors, containers rebuilt alike."""
    if isinstance(output, Tensor):
        return fn(output)
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(*(_map_tensors(item, fn) for item in output))
    if isinstance(output, (list, tuple)):
        return type(output)(_map_tensors(item, fn) for item in output)
    return output


_ADAPTERS: dict[type, ProbeAdapter] = {}


def register_probe_adapter(model_cls: type, adapter: ProbeAdapter) -> None:
    """Make ``adapter`` the probe of ``model_cls`` and its subclasses (most specific class wins)."""
    _ADAPTERS[model_cls] = adapter


def get_probe_adapter(model: nn.Module) -> ProbeAdapter:
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    known = ", ".join(sorted(c.__name__ for c in _ADAPTERS))
    raise TypeError(
        f"no TBD probe adapter for {type(model).__name__}; registered families: {known}. "
        "Add one with tbd.distill.register_probe_adapter(ModelClass, adapter)."
    )


register_probe_adapter(RetinaNet, DenseDetectorAdapter())
register_probe_adapter(FCOS, DenseDetectorAdapter())
register_probe_adapter(GeneralizedRCNN, RPNAdapter())
register_probe_adapter(ProposalNetwork, RPNAdapter())


class Probe:
    """A forward hook on a model's dense head, active only inside :meth:`capture`.

    >>> probe = Probe(student)
    >>> with probe.capture():
    ...     losses = student(batched_inputs)   # the ordinary training forward
    >>> levels = probe.levels()
    """

    def __init__(self, model: nn.Module, adapter: ProbeAdapter | None = None) -> None:
        self.model = model
        self.adapter = adapter or get_probe_adapter(model)
        self._armed = False
        self._record: tuple[list[Tensor], Any] | None = None
        self._versions: list[int] = []
        self._handle = self.adapter.head(model).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not self._armed:
            return
        if self._record is not None:
            raise RuntimeError(
                f"the dense head of {type(self.model).__name__} ran twice in one captured forward"
            )
        if not torch.is_grad_enabled():
            # Reason: post-processing may overwrite the head's outputs in place (Detectron2's FCOS
            # inference applies sigmoid_() to its logits); without autograd a copy costs no graph
            output = _map_tensors(output, lambda t: t.clone())
        self._versions = [t._version for t in _tensors(output)]
        self._record = (list(inputs[0]), output)

    @contextmanager
    def capture(self) -> Iterator[Probe]:
        self._record = None
        self._armed = True
        try:
            yield self
        finally:
            self._armed = False

    def levels(self) -> list[LevelPrediction]:
        if self._record is None:
            raise RuntimeError(f"the dense head of {type(self.model).__name__} did not run during capture")
        features, output = self._record
        self._record = None
        if [t._version for t in _tensors(output)] != self._versions:
            raise RuntimeError(
                f"{type(self.model).__name__} modified the outputs of its dense head in place after "
                "they were probed: the levels would not be what the head predicted. Capture with "
                "torch.no_grad() (the probe then keeps a copy) or make the model's post-processing "
                "out of place."
            )
        return self.adapter.to_levels(self.model, features, output)

    def remove(self) -> None:
        self._handle.remove()
