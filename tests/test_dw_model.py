"""The DWDetector end to end on tiny inputs: config, probe surface, training, inference."""

from __future__ import annotations

import pytest
import torch

import tbd  # noqa: F401  (its compatibility shims must run before detectron2 is imported)

# isort: split
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from tbd.config import get_cfg, load_config
from tbd.modeling.dw.detector import DWDetector

SMALL = ["MODEL.FPN.OUT_CHANNELS", "64", "MODEL.DW.NUM_CONVS", "2"]


def _model(refine: bool = True, seed: int = 0) -> DWDetector:
    torch.manual_seed(seed)
    cfg = load_config("dw_R18_FPN", [*SMALL, "MODEL.DW.BOX_REFINEMENT", str(refine)])
    return build_model(cfg)


def _batch(n: int = 4, size: int = 64, with_empty: bool = False) -> list[dict]:
    """Bright rectangles of 2 classes (class = colour) on a dark background."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        img = torch.full((3, size, size), 20.0)
        inst = Instances((size, size))
        if with_empty and i == n - 1:
            boxes, classes = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
        else:
            x1, y1 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            w, h = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
            cls = i % 2
            img[cls * 2, y1 : y1 + h, x1 : x1 + w] = 230.0
            boxes, classes = (
                torch.tensor([[x1, y1, x1 + w, y1 + h]], dtype=torch.float32),
                torch.tensor([cls]),
            )
        inst.gt_boxes, inst.gt_classes = Boxes(boxes), classes
        out.append({"image": img, "instances": inst})
    return out


def test_config_keys_and_switch():
    cfg = get_cfg()
    assert (
        cfg.MODEL.DW.BOX_REFINEMENT is True and cfg.MODEL.DW.POS_MU == 5.0 and cfg.MODEL.DW.POS_MU_NORM == 3.0
    )
    ref = load_config("dw_R18_FPN")
    assert ref.MODEL.META_ARCHITECTURE == "DWDetector" and ref.MODEL.DW.NUM_CLASSES == 8
    assert ref.MODEL.RESNETS.DEPTH == 18 and ref.MODEL.DW.BOX_REFINEMENT
    for depth in (50, 101):
        assert load_config(f"dw_R{depth}_FPN").MODEL.RESNETS.DEPTH == depth
    assert _model(refine=False).head.refine is None
    assert _model(refine=True).head.refine is not None


def test_probe_surface_shapes_and_decode():
    model = _model()
    model.eval()
    images = model.preprocess_image(_batch(2))
    feats = model.backbone(images.tensor)
    feats = [feats[f] for f in model.head_in_features]
    logits, ltrb, ctr = model.head(feats)
    assert model.strides == [8, 16, 32, 64, 128]
    for f, lg, bx, ct in zip(feats, logits, ltrb, ctr):
        n, _, h, w = f.shape
        assert lg.shape == (n, 8, h, w) and bx.shape == (n, 4, h, w) and ct.shape == (n, 1, h, w)
        assert (bx >= 0).all()
    points = model.points([tuple(f.shape[-2:]) for f in feats])
    assert torch.equal(points[0][:2], torch.tensor([[4.0, 4.0], [12.0, 4.0]]))
    reg = ltrb[0].flatten(2).transpose(1, 2)  # [N, HW, 4]
    boxes = model.decode(points[0], reg)
    assert torch.allclose(boxes[..., 2:] - boxes[..., :2], reg[..., :2] + reg[..., 2:])


@pytest.mark.parametrize("refine", [True, False])
def test_training_steps_lower_the_loss(refine):
    model = _model(refine)
    model.train()
    batch = _batch(3, with_empty=True)  # the last image has no GT at all
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    totals = []
    with EventStorage() as storage:
        for _ in range(5):
            losses = model(batch)
            assert set(losses) == {"loss_dw_cls_pos", "loss_dw_loc", "loss_dw_cls_neg"}
            total = sum(losses.values())
            assert torch.isfinite(total)
            opt.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)  # as SOLVER.CLIP_GRADIENTS
            opt.step()
            totals.append(total.item())
        assert storage.history("dw/num_candidates").latest() > 0
    # the weights move with the predictions, so the DW loss is not monotone over long runs; over
    # the first steps on one batch it must fall clearly
    assert totals[-1] < 0.8 * totals[0], totals


def test_inference_returns_rescaled_instances():
    model = _model()
    # a detection-happy head: every location scores sigmoid(3) * sigmoid(3) ~ 0.9
    torch.nn.init.constant_(model.head.cls_score.bias, 3.0)
    torch.nn.init.constant_(model.head.centerness.bias, 3.0)
    model.eval()
    batch = [{"image": b["image"], "height": 128, "width": 96} for b in _batch(2)]
    with torch.no_grad():
        out = model(batch)
    assert len(out) == 2
    inst = out[0]["instances"]
    assert inst.image_size == (128, 96)
    assert 0 < len(inst) <= model.max_detections_per_image
    assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert (inst.pred_classes < 8).all() and (inst.scores > model.test_score_thresh).all()
    b = inst.pred_boxes.tensor
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 96).all() and (b[:, 3] <= 128).all()


def test_probe_adapter_reads_the_head_through_a_hook():
    from tbd.distill.probes import Probe, get_probe_adapter
    from tbd.modeling.dw.probe import DWProbeAdapter

    model = _model()
    model.eval()
    assert isinstance(get_probe_adapter(model), DWProbeAdapter)
    batch = _batch(2)
    probe = Probe(model)
    with torch.no_grad(), probe.capture():
        model(batch)
    levels = probe.levels()
    probe.remove()
    assert [lv.stride for lv in levels] == [8, 16, 32, 64, 128]
    with torch.no_grad():
        images = model.preprocess_image(batch)
        feats = model.backbone(images.tensor)
        logits, ltrb, _ = model.head([feats[f] for f in model.head_in_features])
    lv = levels[0]
    n, c, h, w = logits[0].shape
    assert lv.logits.shape == (n, h, w, 1, c) and lv.boxes.shape == (n, h, w, 1, 4)
    # location (row 1, col 2) of image 1: centre (20, 12), box = centre -/+ its ltrb
    l_, t_, r_, b_ = ltrb[0][1, :, 1, 2].tolist()
    expected = torch.tensor([20 - l_, 12 - t_, 20 + r_, 12 + b_])
    assert torch.allclose(lv.boxes[1, 1, 2, 0], expected, atol=1e-4)
    assert torch.equal(lv.logits[1, 1, 2, 0], logits[0][1, :, 1, 2])
