"""TBD probe adapter for the DW detector (importing this module registers it).

Kept out of :mod:`tbd.modeling.dw` so the model does not depend on :mod:`tbd.distill`; import it
(e.g. from ``tbd.distill``) to let a :class:`~tbd.distill.probes.Probe` read a ``DWDetector``.
The boxes are the ones the DW loss and inference use: ``model.decode`` of the (refined) ltrb.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from tbd.distill.probes import LevelPrediction, ProbeAdapter, register_probe_adapter
from tbd.modeling.dw import DWDetector


class DWProbeAdapter(ProbeAdapter):
    """``model.head`` on ``model.head_in_features``; one point per location (``A = 1``)."""

    def head(self, model: nn.Module) -> nn.Module:
        return model.head

    def feature_names(self, model: nn.Module) -> list[str]:
        return list(model.head_in_features)

    def num_classes(self, model: nn.Module) -> int | None:
        return int(model.num_classes)

    def to_levels(
        self, model: nn.Module, features: Sequence[Tensor], head_output: Any
    ) -> list[LevelPrediction]:
        logits, ltrb = head_output[0], head_output[1]
        points = model.points([tuple(f.shape[-2:]) for f in features])
        out = []
        for feat, cls, reg, pts, stride in zip(features, logits, ltrb, points, model.strides):
            b, _, h, w = cls.shape
            boxes = model.decode(pts.to(reg.device), reg.float().flatten(2).transpose(1, 2))  # [B, HW, 4]
            out.append(
                LevelPrediction(
                    int(stride),
                    feat.float(),
                    cls.float().permute(0, 2, 3, 1).reshape(b, h, w, 1, -1),
                    boxes.reshape(b, h, w, 1, 4),
                )
            )
        return out


register_probe_adapter(DWDetector, DWProbeAdapter())
