"""The probe adapters of Faster R-CNN (RPN), Detectron2's FCOS, TOOD and the ET-head against the
models' own parts: what a hooked forward yields equals a manual run of preprocess -> backbone ->
head, read at named locations, anchors and classes, with boxes decoded by hand.

(RetinaNet: tests/test_distill_distiller.py; DW: tests/test_dw_model.py; Co-DETR:
tests/test_codetr_teacher.py.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch import nn

from tbd.config import load_config
from tbd.distill import Probe, get_probe_adapter
from tbd.distill.probes import LevelPrediction
from tbd.distill.testing import synthetic_batch
from tbd.modeling.tal.testing import TINY_OPTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROW, COL = 1, 2  # a location off the diagonal: x and y cannot be confused


def _model(config: str, opts: list[str] = ()) -> nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(config, [*TINY_OPTS, *opts])).eval()


def _probed(model: nn.Module, batch: list[dict]) -> list[LevelPrediction]:
    probe = Probe(model)
    try:
        with torch.no_grad(), probe.capture():
            model(batch)
        return probe.levels()
    finally:
        probe.remove()


def _features(model: nn.Module, batch: list[dict], names: list[str]) -> list[torch.Tensor]:
    with torch.no_grad():
        feats = model.backbone(model.preprocess_image(batch).tensor)
    return [feats[f] for f in names]


def _probed_and_head(model: nn.Module, batch: list[dict]) -> tuple[list[LevelPrediction], Any]:
    """The probe's levels and the dense head's own output on the same features."""
    levels = _probed(model, batch)
    features = _features(model, batch, list(model.head_in_features))
    with torch.no_grad():
        return levels, model.head(features)


def _box_at_cell(ltrb: list[float], stride: int) -> torch.Tensor:
    """x1y1x2y2 of distances (l, t, r, b) from the centre of cell (ROW, COL) at ``stride``."""
    l_, t_, r_, b_ = ltrb
    cx, cy = (COL + 0.5) * stride, (ROW + 0.5) * stride
    return torch.tensor([cx - l_, cy - t_, cx + r_, cy + b_])


def test_rpn_adapter_reads_objectness_and_decodes_anchors() -> None:
    model = _model("faster_rcnn_R18_FPN", ["MODEL.ROI_HEADS.NUM_CLASSES", "5"])
    adapter = get_probe_adapter(model)
    assert adapter.num_classes(model) == 5  # the ROI heads' classes, not the RPN's one logit
    assert adapter.strides(model) == [4, 8, 16, 32, 64]
    batch = synthetic_batch(2, 64, seed=1)
    levels = _probed(model, batch)
    pg = model.proposal_generator
    features = _features(model, batch, list(pg.in_features))
    with torch.no_grad():
        objectness, deltas = pg.rpn_head(features)
        anchors = pg.anchor_generator(features)
    level = 2  # stride 16: a 4 x 4 map, 3 anchors per location
    lv = levels[level]
    a = 3
    h, w = features[level].shape[-2:]
    assert lv.stride == 16 and torch.equal(lv.feature, features[level])
    assert lv.logits.shape == (2, h, w, a, 1) and lv.boxes.shape == (2, h, w, a, 4)
    for img, anchor in ((0, 1), (1, 2)):
        assert lv.logits[img, ROW, COL, anchor, 0] == objectness[level][img, anchor, ROW, COL]
        # Detectron2's anchors are location-major; RPN deltas are (dx, dy, dw, dh), weights 1
        x1, y1, x2, y2 = anchors[level].tensor[(ROW * w + COL) * a + anchor].tolist()
        dx, dy, dw, dh = deltas[level][img, 4 * anchor : 4 * anchor + 4, ROW, COL].tolist()
        cx, cy = (x1 + x2) / 2 + dx * (x2 - x1), (y1 + y2) / 2 + dy * (y2 - y1)
        bw, bh = (x2 - x1) * torch.tensor(dw).exp(), (y2 - y1) * torch.tensor(dh).exp()
        expected = torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        torch.testing.assert_close(lv.boxes[img, ROW, COL, anchor], expected, rtol=1e-5, atol=1e-4)
    # the anchors of one location differ: a wrong anchor/delta layout cannot go unnoticed
    assert not torch.allclose(lv.boxes[0, ROW, COL, 0], lv.boxes[0, ROW, COL, 1])


def test_fcos_adapter_reads_class_logits_and_decodes_ltrb_by_stride() -> None:
    model = _model("fcos_R18_FPN")
    adapter = get_probe_adapter(model)
    assert adapter.num_classes(model) == 8 and adapter.strides(model) == [8, 16, 32, 64, 128]
    batch = synthetic_batch(2, 64, seed=2)
    levels, (logits, ltrb, _) = _probed_and_head(model, batch)
    level, stride = 1, 16
    lv = levels[level]
    _, k, h, w = logits[level].shape
    assert lv.stride == stride and lv.logits.shape == (2, h, w, 1, k) and lv.boxes.shape == (2, h, w, 1, 4)
    assert torch.equal(lv.logits[1, ROW, COL, 0], logits[level][1, :, ROW, COL])
    # Detectron2's FCOS: the point is the centre of a stride-sized anchor at the cell's centre,
    # ltrb = relu(regression) x stride
    expected = _box_at_cell((ltrb[level][1, :, ROW, COL].relu() * stride).tolist(), stride)
    torch.testing.assert_close(lv.boxes[1, ROW, COL, 0], expected, rtol=1e-5, atol=1e-4)


def test_fcos_probe_in_training_and_in_place_post_processing() -> None:
    """Detectron2's FCOS inference applies sigmoid_() to its head's logits in place: a probe without
    autograd keeps a copy (above), one with autograd refuses to hand on overwritten outputs."""
    model = _model("fcos_R18_FPN")
    batch = synthetic_batch(2, 64, seed=5)
    model.train()
    probe = Probe(model)
    try:
        with EventStorage(), probe.capture():
            model(batch)  # the training forward: the outputs stay as the head returned them
        levels = probe.levels()
        with torch.no_grad():
            logits, _, _ = model.head([lv.feature for lv in levels])
        assert torch.equal(levels[0].logits[0, ROW, COL, 0], logits[0][0, :, ROW, COL])
        model.eval()
        with probe.capture():
            model(batch)
        with pytest.raises(RuntimeError, match="modified the outputs of its dense head in place"):
            probe.levels()
    finally:
        probe.remove()


def test_tood_adapter_reads_the_aligned_logits_and_decodes_ltrb_pixels() -> None:
    model = _model("tood_R18_FPN", ["MODEL.TOOD.FEAT_CHANNELS", "32", "MODEL.TOOD.STACKED_CONVS", "2"])
    adapter = get_probe_adapter(model)
    assert adapter.num_classes(model) == 8 and adapter.strides(model) == [8, 16, 32, 64, 128]
    batch = synthetic_batch(2, 64, seed=3)
    levels, out = _probed_and_head(model, batch)
    level, stride = 0, 8
    lv = levels[level]
    got = lv.logits[0, ROW, COL, 0]
    # the score TOOD ranks its detections by: sqrt(sigmoid(P) sigmoid(M)), not sigmoid(P)
    assert torch.equal(got, out.aligned_logits[level][0, :, ROW, COL])
    assert not torch.allclose(got, out.cls_logits[level][0, :, ROW, COL])
    expected = _box_at_cell(
        out.box_ltrb[level][0, :, ROW, COL].tolist(), stride
    )  # pixels, after offset sampling
    torch.testing.assert_close(lv.boxes[0, ROW, COL, 0], expected, rtol=1e-5, atol=1e-4)


def test_et_adapter_reads_class_logits_and_the_expected_bin_distances() -> None:
    model = _model("et_R18_FPN", ["MODEL.ETHEAD.FEAT_CHANNELS", "64"])
    with torch.no_grad():  # bin distributions that are not uniform
        torch.nn.init.normal_(model.head.reg_pred.weight, std=0.3)
    assert get_probe_adapter(model).strides(model) == [8, 16, 32, 64, 128]
    batch = synthetic_batch(2, 64, seed=4)
    levels, out = _probed_and_head(model, batch)
    level, stride = 1, 16
    lv = levels[level]
    assert torch.equal(lv.logits[1, ROW, COL, 0], out.cls_logits[level][1, :, ROW, COL])
    bins = out.reg_bins[level][1, :, ROW, COL].view(4, 17)  # side-major: l, t, r, b
    l_, t_, r_, b_ = ((bins.softmax(-1) * torch.arange(17.0)).sum(-1) * stride).tolist()
    assert len({round(x, 3) for x in (l_, t_, r_, b_)}) == 4  # four different sides
    expected = _box_at_cell([l_, t_, r_, b_], stride)
    torch.testing.assert_close(lv.boxes[1, ROW, COL, 0], expected, rtol=1e-5, atol=1e-3)
