"""TBD probe adapter for the DW detector (importing this module registers it).

Kept out of :mod:`tbd.modeling.dw.detector` so the model does not depend on :mod:`tbd.distill`; import it
(e.g. from ``tbd.distill``) to let a :class:`~tbd.distill.probes.Probe` read a ``DWDetector``.
The boxes are the ones the DW loss and inference use: ``model.decode`` of the (refined) ltrb.
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
from tbd.modeling.dw.detector import DWDetector


class DWProbeAdapter(DenseDetectorAdapter):
    """``model.head`` on ``model.head_in_features``; one point per location (``A = 1``)."""

    def to_levels(
        self, model: nn.Module, features: Sequence[Tensor], head_output: Any
    ) -> list[LevelPrediction]:
        points = model.points([tuple(f.shape[-2:]) for f in features])
        return decode_point_levels(
            features, head_output[0], head_output[1], points, model.strides, model.decode
        )


register_probe_adapter(DWDetector, DWProbeAdapter())
