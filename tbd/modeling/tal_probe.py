"""TBD probe adapter for the task-aligned heads (TOOD T-Head, ET-head); importing registers it.

The classification map is the score each head ranks its detections by: for TOOD the aligned
logit (``sigmoid = sqrt(sigmoid(P) * sigmoid(M))``), for the ET-head its class logits. Boxes are
``model.decode`` of the head's ltrb distances (after TOOD's offset sampling), one point per
location (``A = 1``).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from tbd.distill.probes import LevelPrediction, ProbeAdapter, register_probe_adapter
from tbd.modeling.tal_detector import TALDetector


class TALProbeAdapter(ProbeAdapter):
    def head(self, model: nn.Module) -> nn.Module:
        return model.head

    def feature_names(self, model: nn.Module) -> list[str]:
        return list(model.head_in_features)

    def num_classes(self, model: nn.Module) -> int | None:
        return int(model.num_classes)

    def to_levels(
        self, model: nn.Module, features: Sequence[Tensor], head_output: Any
    ) -> list[LevelPrediction]:
        logits = getattr(head_output, "aligned_logits", None) or head_output.cls_logits
        points = model.points(list(features))
        out = []
        for feat, cls, reg, pts, stride in zip(features, logits, head_output.box_ltrb, points, model.strides):
            b, _, h, w = cls.shape
            boxes = model.decode(pts.to(reg.device, reg.dtype), reg.flatten(2).transpose(1, 2))
            out.append(
                LevelPrediction(
                    int(stride),
                    feat.float(),
                    cls.float().permute(0, 2, 3, 1).reshape(b, h, w, 1, -1),
                    boxes.float().reshape(b, h, w, 1, 4),
                )
            )
        return out


register_probe_adapter(TALDetector, TALProbeAdapter())
