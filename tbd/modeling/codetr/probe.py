"""TBD probe adapter for ``CoDETR``: a DETR teacher read through its auxiliary ATSS head.

A DETR has no per-location predictions: its decoder answers with a set of queries. Co-DETR's
collaborative training, though, keeps a one-to-many ``atss`` head on the multi-scale adapter's
pyramid (the encoder output plus the extra stride-2 levels), trained on the same encoder features
as the decoder. That head has exactly what TBD's harmony score needs: class logits and a decoded
box per location. The teacher's dense forward here is preprocess -> backbone -> encoder ->
pyramid -> ATSS head (no decoder, no post-processing); its features are the pyramid maps.

A CoDETR is a teacher only: as a student it has no dense head of its own for HD/TFD to train.
Importing this module registers the adapter.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from tbd.distill.probes import LevelPrediction, ProbeAdapter, decode_point_levels, register_probe_adapter
from tbd.modeling.codetr.detector import CoDETR

PROBED_HEAD = "atss"


def probed_head(model: nn.Module) -> nn.Module:
    """The auxiliary ``atss`` head of a CoDETR, or a clear error naming the fix."""
    heads = getattr(model, "aux_heads", [])
    for head in heads:
        if getattr(head, "name", "") == PROBED_HEAD:
            return head
    names = [getattr(h, "name", type(h).__name__) for h in heads]
    raise ValueError(
        f"this CoDETR has no '{PROBED_HEAD}' auxiliary head (MODEL.AUX_HEADS.NAMES = {names}), so it has "
        "no per-location predictions for TBD to read. Use a Co-DETR trained with 'atss' among "
        "MODEL.AUX_HEADS.NAMES (configs/codetr_R18.yaml, codetr_R50.yaml do), with its training run's "
        "config.yaml and model_final.pth: `tbd export` drops the auxiliary heads (they are training-only)"
    )


class CoDETRProbeAdapter(ProbeAdapter):
    """The pyramid of the multi-scale adapter and the ``atss`` head's logits and boxes on it."""

    def head(self, model: nn.Module) -> nn.Module:
        raise TypeError(
            "a CoDETR can be a TBD teacher (read through its auxiliary ATSS head) but not a student: "
            "its decoder has no dense head for HD and TFD to train. Distil it into a dense student "
            "(--student r18 / r50 / mnv2 with --head tal, dw, retinanet, fcos or et)"
        )

    def feature_names(self, model: nn.Module) -> list[str]:
        return [f"pyramid{i}" for i in range(len(model.pyramid_strides))]

    def num_classes(self, model: nn.Module) -> int | None:
        return int(model.num_classes)

    def strides(self, model: nn.Module) -> list[int]:
        return [int(s) for s in probed_head(model).strides]

    def channels(self, model: nn.Module) -> list[int]:
        return [int(model.hidden_dim)] * len(self.strides(model))

    def preprocess(self, model: nn.Module, batched_inputs: list[dict]) -> Tensor:
        return model.preprocess(batched_inputs).tensor

    def to_levels(
        self, model: nn.Module, features: Sequence[Tensor], head_output: Any
    ) -> list[LevelPrediction]:
        head = probed_head(model)
        logits, ltrb = head_output
        return decode_point_levels(features, logits, ltrb, head.points(features), head.strides, head.decode)

    def run_dense(self, model: nn.Module, batched_inputs: list[dict]) -> list[LevelPrediction]:
        head = probed_head(model)
        pyramid = model.pyramid(model.encode(model.preprocess(batched_inputs)))
        return self.to_levels(model, pyramid, head.predict(pyramid))


register_probe_adapter(CoDETR, CoDETRProbeAdapter())
