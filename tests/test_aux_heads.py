"""Training-only auxiliary heads (MODEL.AUX_HEADS: atss, rcnn) on dense students."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from tbd.config import load_config
from tbd.distill.testing import distill_config, synthetic_batch
from tbd.engine.trainer import Trainer
from tbd.modeling.aux_heads import AuxPositives, attach_aux_heads, build_aux_heads
from tbd.modeling.aux_heads.atss import ATSSAuxHead, centerness_target
from tbd.modeling.tal.testing import TINY_OPTS
from tbd.ops.boxes import pairwise_iou

AUX = ["MODEL.AUX_HEADS.NAMES", "['atss','rcnn']", "MODEL.AUX_HEADS.RCNN.FC_DIM", "64"]
TOOD_OPTS = [*TINY_OPTS, "MODEL.TOOD.FEAT_CHANNELS", "32", "MODEL.TOOD.STACKED_CONVS", "2"]


def _instances(boxes: list[list[float]], classes: list[int], size: tuple[int, int]) -> Instances:
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return inst


def test_atss_assignment_matches_hand_worked_values() -> None:
    """One 4x4 level (stride 8, points at 4, 12, 20, 28), square priors of 2 strides, top-3 per GT.

    GT A [5, 3, 21, 17] (centre 13, 10): nearest points (12, 12), (12, 4), (20, 12) with prior IoUs
    195/285, 135/345, 117/363; mean + std = 0.658: only (12, 12) (index 5) is positive.
    GT B [19, 15, 31, 29] (centre 25, 22): nearest (28, 20), (20, 20), (28, 28), IoUs 143/281,
    117/307, 99/325; threshold 0.501: only (28, 20) (index 11).
    """
    iou_a = [195 / 285, 135 / 345, 117 / 363]
    iou_b = [143 / 281, 117 / 307, 99 / 325]
    for ious in (iou_a, iou_b):  # the rule by hand: the first candidate alone clears mean + std
        thresh = statistics.mean(ious) + statistics.stdev(ious)
        assert ious[0] >= thresh > max(ious[1:])
    torch.manual_seed(0)
    head = ATSSAuxHead(32, [8], num_classes=3, topk=3, anchor_scale=2.0, weight=1.0)
    gt = _instances([[5, 3, 21, 17], [19, 15, 31, 29]], [2, 0], (32, 32))
    out = head([torch.randn(1, 32, 4, 4)], [(32, 32)], [gt])
    (pos,) = out.positives
    order = pos.locations.argsort()
    assert pos.locations[order].tolist() == [5, 11] and pos.levels.tolist() == [0, 0]
    assert pos.boxes[order].tolist() == [[4, 4, 20, 20], [20, 12, 36, 28]]  # the priors
    assert pos.gt_boxes[order].tolist() == [[5, 3, 21, 17], [19, 15, 31, 29]]
    assert pos.gt_classes[order].tolist() == [2, 0]
    assert set(out.losses) == {"loss_aux_atss_cls", "loss_aux_atss_giou", "loss_aux_atss_ctr"}
    assert all(torch.isfinite(v) for v in out.losses.values())


def test_centerness_target_hand_worked() -> None:
    ltrb = torch.tensor([[2.0, 1.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(centerness_target(ltrb), torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize("cls_loss,centerness", [("focal", True), ("qfl", True), ("focal", False)])
def test_head_weight_scales_every_loss(cls_loss: str, centerness: bool) -> None:
    gt = _instances([[5, 3, 21, 17]], [1], (32, 32))
    feats = [torch.randn(1, 32, 4, 4)]
    losses = {}
    for w in (1.0, 2.0):
        torch.manual_seed(0)
        head = ATSSAuxHead(
            32, [8], 3, topk=3, anchor_scale=2.0, weight=w, cls_loss=cls_loss, centerness=centerness
        )
        losses[w] = head(feats, [(32, 32)], [gt]).losses
    assert ("loss_aux_atss_ctr" in losses[1.0]) == centerness
    for key, value in losses[1.0].items():
        assert torch.isfinite(value) and value > 0
        assert torch.allclose(losses[2.0][key], 2 * value)


def _check_positives(
    pos: AuxPositives, gt: Instances, strides: list[int], sizes: list[tuple[int, int]]
) -> None:
    n = len(pos)
    assert pos.gt_boxes.shape == (n, 4) and pos.gt_classes.shape == (n,) and pos.levels.shape == (n,)
    # every positive's GT is one of the image's GTs, with that GT's class
    same = (pos.gt_boxes[:, None, :] == gt.gt_boxes.tensor[None]).all(-1)  # [N, G]
    assert same.any(1).all()
    gt_idx = same.float().argmax(1)
    assert torch.equal(gt.gt_classes[gt_idx], pos.gt_classes)
    assert ((pos.levels >= 0) & (pos.levels < len(strides))).all()
    cells = torch.tensor([h * w for h, w in sizes])[pos.levels]
    assert ((pos.locations >= 0) & (pos.locations < cells)).all()
    # the centre of every positive box lies in (or, clamped, at the border of) its cell
    stride = torch.tensor(strides, dtype=torch.float32)[pos.levels]
    width = torch.tensor([w for _, w in sizes])[pos.levels]
    cx, cy = (pos.boxes[:, 0] + pos.boxes[:, 2]) / 2, (pos.boxes[:, 1] + pos.boxes[:, 3]) / 2
    col, row = pos.locations % width, pos.locations // width
    assert ((cx >= col * stride) | (col == 0)).all() and (
        (cx < (col + 1) * stride) | (col == width - 1)
    ).all()
    assert ((cy >= row * stride) | (row == 0)).all()


def test_positives_are_consistent_for_both_heads() -> None:
    torch.manual_seed(0)
    cfg = load_config("tood_R18_FPN", AUX)
    strides = [8, 16, 32]
    sizes = [(12, 10), (6, 5), (3, 3)]
    heads = build_aux_heads(cfg, 32, strides, num_classes=4)
    assert [h.name for h in heads] == ["atss", "rcnn"] and [h.weight for h in heads] == [2.0, 2.0]
    heads.train()
    feats = [torch.randn(2, 32, h, w) for h, w in sizes]
    gts = [
        _instances([[4, 6, 40, 50], [30, 20, 70, 90], [10, 60, 20, 70]], [0, 3, 1], (96, 80)),
        _instances([[0, 0, 60, 60]], [2], (90, 76)),
    ]
    with EventStorage(0):
        outs = [h(feats, [(96, 80), (90, 76)], gts) for h in heads]
    for head, out in zip(heads, outs):
        assert len(out.positives) == 2
        assert all(k.startswith(f"loss_aux_{head.name}_") for k in out.losses)
        for pos, gt in zip(out.positives, gts):
            assert len(pos) > 0
            _check_positives(pos, gt, strides, sizes)
    atss, rcnn = outs
    for pos in atss.positives:  # ATSS positives are the priors of their cells (side 8 strides)
        s = torch.tensor(strides, dtype=torch.float32)[pos.levels]
        w = torch.tensor([w for _, w in sizes])[pos.levels]
        cx, cy = (pos.locations % w + 0.5) * s, (pos.locations // w + 0.5) * s
        prior = torch.stack([cx - 4 * s, cy - 4 * s, cx + 4 * s, cy + 4 * s], dim=1)
        assert torch.allclose(pos.boxes, prior)
    for pos in rcnn.positives:  # Fast R-CNN foreground RoIs: IoU >= 0.5 with their GT
        iou = pairwise_iou(pos.boxes[:, None], pos.gt_boxes[:, None]).flatten()
        assert (iou >= 0.5 - 1e-6).all()


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="unknown heads"):
        build_aux_heads(load_config("tood_R18_FPN", ["MODEL.AUX_HEADS.NAMES", "['yolo']"]), 16, [8])
    with pytest.raises(ValueError, match="WEIGHTS"):
        load_cfg = load_config("tood_R18_FPN", [*AUX, "MODEL.AUX_HEADS.WEIGHTS", "[1.0]"])
        build_aux_heads(load_cfg, 16, [8])
    with pytest.raises(ValueError, match="CLS_LOSS"):
        build_aux_heads(load_config("tood_R18_FPN", [*AUX, "MODEL.AUX_HEADS.ATSS.CLS_LOSS", "bce"]), 16, [8])
    rcnn = load_config("faster_rcnn_R18_FPN", AUX)
    with pytest.raises(ValueError, match="dense students"):
        attach_aux_heads(build_model(rcnn), rcnn)


def _pair(opts: list[str]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A plain TOOD and the same weights with auxiliary heads (built as `tbd train` builds it)."""
    torch.manual_seed(0)
    plain = build_model(load_config("tood_R18_FPN", TOOD_OPTS))
    with_aux = Trainer.build_model(load_config("tood_R18_FPN", [*TOOD_OPTS, *opts]))
    missing, unexpected = with_aux.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("aux_heads.") for k in missing)
    return plain, with_aux


def test_eval_forward_unchanged_and_aux_heads_not_run() -> None:
    plain, with_aux = _pair(AUX)
    calls = []
    for head in with_aux.aux_heads:
        head.register_forward_hook(lambda *a: calls.append(1))
    batch = synthetic_batch(2, 64, 2)
    plain.eval(), with_aux.eval()
    for m in (plain, with_aux):
        m.test_score_thresh = 0.0
    with torch.no_grad():
        a, b = plain(batch), with_aux(batch)
    assert not calls
    for x, y in zip(a, b):
        assert len(x["instances"]) > 0
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)
    assert "_tbd_aux_features" not in vars(with_aux.backbone)  # nothing kept after an eval forward

    # training: the student's own losses are the same, the auxiliary ones are added
    plain.train(), with_aux.train()
    with EventStorage(0):
        own, both = plain(batch), with_aux(batch)
    assert len(calls) == 2
    assert set(both) - set(own) == {
        *(f"loss_aux_atss_{t}" for t in ("cls", "giou", "ctr")),
        *(f"loss_aux_rcnn_{t}" for t in ("rpn_cls", "rpn_loc", "cls", "box_reg")),
    }
    for key, value in own.items():
        assert torch.allclose(both[key], value)


def test_aux_losses_reach_the_backbone() -> None:
    _, model = _pair(AUX)
    model.train()
    with EventStorage(0):
        losses = model(synthetic_batch(2, 64, 2))
    aux = sum(v for k, v in losses.items() if k.startswith("loss_aux_"))
    aux.backward()
    stem = model.backbone.bottom_up.stem.conv1.weight.grad
    assert stem is not None and stem.abs().sum() > 0
    fpn = [p.grad for n, p in model.backbone.named_parameters() if n.startswith("fpn_")]
    assert fpn and all(g is not None and g.abs().sum() > 0 for g in fpn)
    # only the auxiliary losses were backpropagated: the student's own head got nothing
    assert all(p.grad is None for p in model.head.parameters())
    for head in model.aux_heads:
        assert all(p.grad is not None for p in head.parameters() if p.requires_grad)


def test_export_drops_aux_heads_and_plain_config_loads(tmp_path: Path) -> None:
    from tbd.engine.checkpoint import load_weights_checked
    from tbd.export import export_student

    cfg = load_config("tood_R18_FPN", [*TOOD_OPTS, *AUX])
    model = Trainer.build_model(cfg)
    state = model.state_dict()
    assert any(k.startswith("aux_heads.") for k in state)
    torch.save({"model": state}, tmp_path / "model_final.pth")
    weights, config = export_student(cfg, tmp_path / "model_final.pth", tmp_path / "export")
    exported = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    assert not any("aux_heads" in k for k in exported)
    assert set(exported) == {k for k in state if not k.startswith("aux_heads.")}
    plain_cfg = load_config(str(config))
    assert list(plain_cfg.MODEL.AUX_HEADS.NAMES) == []
    student = Trainer.build_model(plain_cfg)
    assert not hasattr(student, "aux_heads")
    load_weights_checked(student, str(weights))  # every tensor present, none missing


def test_distiller_trains_a_student_with_aux_heads() -> None:
    from tbd.distill.distiller import TBDistiller

    cfg = distill_config("tood_R18_FPN", "retinanet_R18_FPN", [*TOOD_OPTS, *AUX])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    assert isinstance(model, TBDistiller) and len(model.student.aux_heads) == 2
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = model.student.aux_heads[0].cls_pred.weight.detach().clone()
    with EventStorage(0):
        model.train()
        losses = model(synthetic_batch(2, 64, 2))
        for key in (
            "loss_cls",
            "loss_box_giou",
            "loss_hd",
            "loss_tfd",
            "loss_aux_atss_cls",
            "loss_aux_rcnn_cls",
        ):
            assert key in losses and torch.isfinite(losses[key])
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert not torch.equal(before, model.student.aux_heads[0].cls_pred.weight)
    assert all(not k.startswith("teacher") for k in model.state_dict())


def test_distiller_export_function_drops_aux_heads(tmp_path: Path) -> None:
    from tbd.distill.distiller import export_student

    cfg = distill_config("tood_R18_FPN", "retinanet_R18_FPN", [*TOOD_OPTS, *AUX])
    model = Trainer.build_model(cfg)
    export_student(model, tmp_path / "student.pth", cfg)
    state = torch.load(tmp_path / "student.pth", map_location="cpu", weights_only=False)["model"]
    assert state and not any("aux_heads" in k for k in state)
    plain = load_config(str(tmp_path / "student.yaml"))
    assert plain.MODEL.META_ARCHITECTURE == "TOOD" and list(plain.MODEL.AUX_HEADS.NAMES) == []


@pytest.mark.parametrize("config", ["retinanet_R18_FPN", "fcos_R18_FPN", "dw_R18_FPN", "et_R18_FPN"])
def test_every_dense_student_takes_aux_heads(config: str) -> None:
    cfg = load_config(config, [*TINY_OPTS, "MODEL.AUX_HEADS.NAMES", "['atss']"])
    model = Trainer.build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(synthetic_batch(2, 64, 2))
    assert {"loss_aux_atss_cls", "loss_aux_atss_giou", "loss_aux_atss_ctr"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


def test_cli_train_with_aux_heads(tmp_path: Path) -> None:
    from tbd.cli.main import main

    out = tmp_path / "run"
    args = [
        "train", "--model", "r18", "--head", "tal", "--iters", "2", "--output", str(out),
        "--data-dir", str(tmp_path / "data"), "--num-train-images", "8", "--num-val-images", "4",
        "--batch-size", "2", "--device", "cpu",
        "MODEL.AUX_HEADS.NAMES", "['atss','rcnn']", "MODEL.AUX_HEADS.RCNN.FC_DIM", "64",
    ]  # fmt: skip
    assert main(args) == 0
    metrics = (out / "metrics.json").read_text()
    assert "loss_aux_atss_cls" in metrics and "loss_aux_rcnn_box_reg" in metrics
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert any(k.startswith("aux_heads.0.") for k in state) and any(
        k.startswith("aux_heads.1.") for k in state
    )
    assert main(["export", "--run", str(out)]) == 0
    exported = torch.load(out / "export" / "model_student.pth", map_location="cpu", weights_only=False)[
        "model"
    ]
    assert not any("aux_heads" in k for k in exported)
