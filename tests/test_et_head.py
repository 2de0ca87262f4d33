"""ET-head (PP-YOLOE) meta-architecture: probe surface, DFL/VFL losses, training on the embedded dataset."""

from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model

from tbd.config import load_config
from tbd.modeling.tal.et_head import ETHead, ETHeadOutput
from tbd.modeling.tal.testing import TINY_OPTS, freeze_assignment, shapes_batch, train_steps

OPTS = [*TINY_OPTS, "MODEL.ETHEAD.FEAT_CHANNELS", "64"]


@pytest.fixture(scope="module")
def cfg():
    return load_config("et_R18_FPN", OPTS)


@pytest.fixture(scope="module")
def batch(cfg, tmp_path_factory):
    return shapes_batch(cfg, tmp_path_factory.mktemp("shapes"), num_images=2)


def test_config_builds_for_every_depth():
    for depth in (18, 50, 101):
        c = load_config(f"et_R{depth}_FPN")
        assert c.MODEL.META_ARCHITECTURE == "ETHeadDetector" and c.MODEL.ETHEAD.NUM_CLASSES == 8
        assert c.MODEL.RESNETS.DEPTH == depth and c.MODEL.ETHEAD.REG_MAX == 16


def test_head_probe_surface_and_initial_distances():
    torch.manual_seed(0)
    head = ETHead(
        in_channels=32, num_classes=3, strides=[8, 16], feat_channels=32, stacked_convs=1, reg_max=16
    )
    feats = [torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)]
    out = head(feats)
    assert isinstance(out, ETHeadOutput)
    for lvl, (h, s) in enumerate(((8, 8), (4, 16))):
        assert out.cls_logits[lvl].shape == (2, 3, h, h)
        assert out.reg_bins[lvl].shape == (2, 4 * 17, h, h)
        # uniform initial distributions: every side is reg_max / 2 strides
        torch.testing.assert_close(out.box_ltrb[lvl], torch.full((2, 4, h, h), 8.0 * s))
    sum(x.sum() for x in out.box_ltrb).backward()
    assert head.reg_pred.weight.grad.abs().sum() > 0 and head.reg_ese.fc.weight.grad is not None


def test_class_branch_shortcut_and_ese():
    torch.manual_seed(0)
    head = ETHead(in_channels=32, num_classes=2, strides=[8], feat_channels=32, stacked_convs=0)
    x = torch.randn(1, 32, 4, 4)
    pooled = x.mean((2, 3), keepdim=True)
    expected = head.cls_pred(head.cls_ese(x, pooled) + x)
    torch.testing.assert_close(head([x]).cls_logits[0], expected)
    with torch.no_grad():
        head.cls_ese.fc.bias.fill_(-50.0)  # attention closed: only the shortcut reaches the classifier
    torch.testing.assert_close(head([x]).cls_logits[0], head.cls_pred(head.cls_ese.conv(x * 0) + x))


def test_losses_and_inference(cfg, batch):
    torch.manual_seed(0)
    model = build_model(cfg)
    live = train_steps(model, batch, iters=1, lr=0.01)
    assert all(torch.isfinite(torch.tensor(live)))
    model.train()
    losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_giou", "loss_box_dfl"}
    assert all(v > 0 for v in losses.values())
    model.eval()
    model.test_score_thresh = 0.0
    with torch.no_grad():
        inst = model([{"image": batch[0]["image"]}])[0]["instances"]
    assert 0 < len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE and (inst.pred_classes < 8).all()


def test_training_lowers_loss_on_embedded_batch(cfg, batch):
    torch.manual_seed(0)
    model = build_model(cfg)
    freeze_assignment(model)
    fixed = train_steps(model, batch, iters=5, lr=0.002)
    assert fixed[-1] < 0.9 * fixed[0], fixed
