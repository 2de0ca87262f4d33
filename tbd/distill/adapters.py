"""The adaptation layer phi: one per distilled FPN level, student channels -> teacher channels."""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from .keys import ADAPTERS


class FeatureAdapters(nn.Module):
    """``phi_l`` for every distilled stride ``l``: a 1x1 conv, or the identity.

    ``student_channels`` / ``teacher_channels`` map stride -> channel count.
    """

    def __init__(
        self, student_channels: Mapping[int, int], teacher_channels: Mapping[int, int], kind: str = "conv1x1"
    ) -> None:
        super().__init__()
        if kind not in ADAPTERS:
            raise ValueError(f"unknown adapter {kind!r}; expected one of {ADAPTERS}")
        self.kind = kind
        self.layers = nn.ModuleDict()
        for stride, c_s in student_channels.items():
            c_t = teacher_channels[stride]
            if kind == "identity":
                if c_s != c_t:
                    raise ValueError(
                        f"DISTILL.ADAPTER 'identity' needs equal FPN channels; stride {stride} has "
                        f"student {c_s} vs teacher {c_t}: use 'conv1x1'"
                    )
                self.layers[str(stride)] = nn.Identity()
            else:
                self.layers[str(stride)] = nn.Conv2d(c_s, c_t, kernel_size=1)

    def forward(self, feature: Tensor, stride: int) -> Tensor:
        return self.layers[str(stride)](feature)
