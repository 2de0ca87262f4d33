"""TBD probe adapter for the task-aligned heads (TOOD T-Head, ET-head); importing registers it.

The classification map is the score each head ranks its detections by: for TOOD the aligned
logit (``sigmoid = sqrt(sigmoid(P) * sigmoid(M))``), for the ET-head its class logits. Boxes are
``model.decode`` of the head's ltrb distances (after TOOD's offset sampling), one point per
location (``A = 1``).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from tbd.distill.probes import (
    DenseDetectorAdapter,
    LevelPrediction,
    decode_point_levels,
    register_probe_adapter,
)
from tbd.modeling.tal.detector import TALDetector


class TALProbeAdapter(DenseDetectorAdapter):
    def to_levels(
        self, model: nn.Module, features: Sequence[Tensor], head_output: Any
    ) -> list[LevelPrediction]:
        logits = getattr(head_output, "aligned_logits", None) or head_output.cls_logits
        points = model.points(list(features))
        return decode_point_levels(
            features, logits, head_output.box_ltrb, points, model.strides, model.decode
        )


register_probe_adapter(TALDetector, TALProbeAdapter())
