"""TOOD (T-Head) meta-architecture: probe surface, inference format, training on the embedded dataset."""

from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model

from tbd.config import load_config
from tbd.modeling.tal.testing import TINY_OPTS, freeze_assignment, shapes_batch, train_steps
from tbd.modeling.tal.tood import THead, TOODHeadOutput

OPTS = [*TINY_OPTS, "MODEL.TOOD.FEAT_CHANNELS", "64", "MODEL.TOOD.STACKED_CONVS", "2"]


@pytest.fixture(scope="module")
def cfg():
    return load_config("tood_R18_FPN", OPTS)


@pytest.fixture(scope="module")
def batch(cfg, tmp_path_factory):
    return shapes_batch(cfg, tmp_path_factory.mktemp("shapes"), num_images=2)


def test_config_builds_for_every_depth():
    for depth in (18, 50, 101):
        c = load_config(f"tood_R{depth}_FPN")
        assert c.MODEL.META_ARCHITECTURE == "TOOD" and c.MODEL.TOOD.NUM_CLASSES == 8
        assert c.MODEL.RESNETS.DEPTH == depth and c.MODEL.TOOD.STACKED_CONVS == 6


def test_head_levels_the_backbone_lacks_are_named() -> None:
    cfg = load_config("tood_R18_FPN", [*OPTS, "MODEL.TOOD.IN_FEATURES", "['p3', 'res4']"])
    with pytest.raises(
        ValueError, match=r"MODEL.TOOD.IN_FEATURES \['res4'\] are not outputs of the backbone"
    ):
        build_model(cfg)


def test_head_probe_surface():
    torch.manual_seed(0)
    head = THead(in_channels=16, num_classes=3, strides=[8, 16], feat_channels=32, stacked_convs=2)
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)]
    seen = []
    head.register_forward_hook(lambda mod, inp, out: seen.append(out))
    out = head(feats)
    assert isinstance(seen[0], TOODHeadOutput) and seen[0] is out
    for lvl, (h, s) in enumerate(((8, 8), (4, 16))):
        assert out.cls_logits[lvl].shape == (2, 3, h, h) and out.aligned_logits[lvl].shape == (2, 3, h, h)
        assert out.box_ltrb[lvl].shape == (2, 4, h, h)
        # zero-initialised offsets: ltrb = exp(~0) strides, positive, in pixels
        assert (out.box_ltrb[lvl] > 0.5 * s).all() and (out.box_ltrb[lvl] < 2 * s).all()
    # the aligned score is the geometric mean of sigmoid(P) and sigmoid(M): at most max of both
    assert (out.aligned_scores()[0] <= 1).all()
    loss = sum(x.sum() for x in out.box_ltrb) + sum(x.sum() for x in out.aligned_logits)
    loss.backward()
    assert head.offset_conv2.weight.grad.abs().sum() > 0 and head.prob_conv2.weight.grad.abs().sum() > 0
    assert head.cls_decomp.fc1.weight.grad is not None and head.scales.grad is not None


def test_inference_format(cfg, batch):
    model = build_model(cfg).eval()
    model.test_score_thresh = 0.0  # keep detections from an untrained model
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": 200, "width": 100}])
    inst = out[0]["instances"]
    assert inst.image_size == (200, 100)
    assert 0 < len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert (inst.pred_classes < 8).all() and (inst.scores[:-1] >= inst.scores[1:]).all()
    assert model.strides == [8, 16, 32, 64, 128]
    pts = torch.tensor([[10.0, 20.0]])
    assert model.decode(pts, torch.tensor([[1.0, 2, 3, 4]])).tolist() == [[9.0, 18.0, 13.0, 24.0]]


def test_training_lowers_loss_on_embedded_batch(cfg, batch):
    torch.manual_seed(0)
    live = train_steps(build_model(cfg), batch, iters=3, lr=0.01)
    assert all(torch.isfinite(torch.tensor(live)))
    torch.manual_seed(0)
    model = build_model(cfg)
    freeze_assignment(model)
    fixed = train_steps(model, batch, iters=5, lr=0.01)
    assert fixed[-1] < 0.9 * fixed[0], fixed


def test_atss_warmup_switches_to_tal(batch):
    from detectron2.utils.events import EventStorage

    model = build_model(load_config("tood_R18_FPN", [*OPTS, "MODEL.TAL.WARMUP_ITERS", "3"]))
    assert not model.in_warmup()  # no trainer storage: TAL
    with EventStorage(2):
        assert model.in_warmup()
        losses = model(batch)  # an ATSS-assigned step trains too
        assert all(torch.isfinite(v) for v in losses.values())
    with EventStorage(3):
        assert not model.in_warmup()
