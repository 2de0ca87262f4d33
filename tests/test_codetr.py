"""Co-DETR: deformable attention, Hungarian matching, box refinement, the positive-query branches,
the loss weighting, training and inference, and `tbd train` / `tbd eval` on tiny data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn

from tbd.cli.main import main
from tbd.config import load_config
from tbd.distill.testing import synthetic_batch
from tbd.modeling.codetr.aux_api import AuxOutput, AuxPositives
from tbd.modeling.codetr.deform_attn import ms_deform_attn
from tbd.modeling.codetr.detector import CoDETR
from tbd.modeling.codetr.losses import combine_losses
from tbd.modeling.codetr.matching import HungarianMatcher, cxcywh_to_xyxy
from tbd.ops.boxes import giou_loss
from tbd.ops.losses import sigmoid_focal_loss

TINY = [
    "MODEL.CODETR.HIDDEN_DIM", "32", "MODEL.CODETR.NHEADS", "4", "MODEL.CODETR.DIM_FEEDFORWARD", "64",
    "MODEL.CODETR.ENC_LAYERS", "1", "MODEL.CODETR.DEC_LAYERS", "2", "MODEL.CODETR.NUM_QUERIES", "20",
    "MODEL.CODETR.ENC_N_POINTS", "2", "MODEL.CODETR.DEC_N_POINTS", "2",
]  # fmt: skip


# --- deformable attention -----------------------------------------------------------------
def _bilinear_zero_padded(v: Tensor, x: float, y: float) -> Tensor:
    """``v [D, H, W]`` at continuous ``(x, y)`` in [0, 1] (pixel centres at (i + 0.5) / size),
    zeros outside: the four neighbours weighted by hand."""
    _, h, w = v.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(torch.floor(torch.tensor(px))), int(torch.floor(torch.tensor(py)))
    out = torch.zeros(v.shape[0], dtype=v.dtype)
    for dx, dy in itertools.product((0, 1), (0, 1)):
        cx, cy = x0 + dx, y0 + dy
        weight = (1 - abs(px - cx)) * (1 - abs(py - cy))
        if 0 <= cx < w and 0 <= cy < h:
            out += weight * v[:, cy, cx]
    return out


def test_deformable_attention_matches_loop_evaluation_of_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    b, m, d, q, p = 2, 2, 3, 3, 2
    shapes = torch.tensor([[3, 4], [2, 2]])
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(b, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(b, q, m, 2, p, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside
    attn = torch.rand(b, q, m, 2, p, generator=g, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    got = ms_deform_attn(value, shapes, loc, attn)
    starts = [0, 12]
    want = torch.zeros(b, q, m * d, dtype=torch.float64)
    for bi, qi, mi, li, pi in itertools.product(range(b), range(q), range(m), range(2), range(p)):
        h, w = shapes[li].tolist()
        level = value[bi, starts[li] : starts[li] + h * w, mi].T.reshape(d, h, w)
        x, y = loc[bi, qi, mi, li, pi].tolist()
        want[bi, qi, mi * d : (mi + 1) * d] += attn[bi, qi, mi, li, pi] * _bilinear_zero_padded(level, x, y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --- Hungarian matching ---------------------------------------------------------------------
def test_hungarian_matcher_finds_the_brute_force_optimum() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, n = 5, 3, 3
    logits = torch.randn(1, q, k, generator=g)
    boxes = torch.rand(1, q, 2, generator=g) * 0.6 + 0.2
    boxes = torch.cat([boxes, torch.rand(1, q, 2, generator=g) * 0.3 + 0.05], -1)
    gt_boxes = torch.cat(
        [torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], -1
    )
    gt_classes = torch.tensor([0, 2, 2])
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(logits[0], boxes[0], gt_classes, gt_boxes)
    best = min(sum(cost[r, c] for c, r in enumerate(rows)) for rows in itertools.permutations(range(q), n))
    ((rows, cols),) = matcher(logits, boxes, [gt_classes], [gt_boxes])
    assert len(rows) == n and sorted(cols.tolist()) == [0, 1, 2]
    torch.testing.assert_close(cost[rows, cols].sum(), best)
    # the cost adds the three terms with their weights: recompute one entry by hand
    p = logits[0, 0, 2].sigmoid()
    focal = 0.25 * (1 - p) ** 2 * -p.log() - 0.75 * p**2 * -(1 - p).log()
    l1 = (boxes[0, 0] - gt_boxes[1]).abs().sum()
    giou = 1 - giou_loss(cxcywh_to_xyxy(boxes[0, 0]), cxcywh_to_xyxy(gt_boxes[1]))
    torch.testing.assert_close(cost[0, 1], 2 * focal + 5 * l1 - 2 * giou, rtol=1e-5, atol=1e-5)


# --- models ---------------------------------------------------------------------------------
def _model(*opts: str, builder=None) -> CoDETR:  # type: ignore[no-untyped-def]
    cfg = load_config("codetr_R18", [*TINY, *opts])
    torch.manual_seed(0)
    model = CoDETR(cfg, aux_heads_builder=builder) if builder is not None else build_model(cfg)
    assert isinstance(model, CoDETR)
    return model


class CentreCellHead(nn.Module):
    """A small real one-to-many head for the plumbing tests: a 1x1 classifier on every pyramid
    level; the positives of a GT are the cells of every level that contain its centre."""

    name = "centre"

    def __init__(self, in_channels: int, strides: list[int], num_classes: int = 8) -> None:
        super().__init__()
        self.strides = strides
        self.cls = nn.Conv2d(in_channels, num_classes, 1)

    def forward(
        self, features: list[Tensor], image_sizes: list[tuple[int, int]], gt_instances: list[Instances]
    ) -> AuxOutput:
        assert len(features) == len(self.strides)
        losses, positives = [], []
        for b, inst in enumerate(gt_instances):
            boxes, classes = inst.gt_boxes.tensor, inst.gt_classes
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            per = {"boxes": [], "gt_boxes": [], "gt_classes": [], "levels": [], "locations": []}
            for lvl, (f, stride) in enumerate(zip(features, self.strides)):
                h, w = f.shape[-2:]
                cell = (centres / stride).floor().long()
                cell[:, 0].clamp_(0, w - 1)
                cell[:, 1].clamp_(0, h - 1)
                logits = self.cls(f[b : b + 1])[0]  # [K, H, W]
                target = torch.zeros_like(logits)
                target[classes, cell[:, 1], cell[:, 0]] = 1.0
                losses.append(sigmoid_focal_loss(logits, target).sum() / max(len(boxes), 1))
                anchor = torch.cat(
                    [(cell + 0.5) * stride - 2 * stride, (cell + 0.5) * stride + 2 * stride], 1
                )
                per["boxes"].append(anchor.float())
                per["gt_boxes"].append(boxes)
                per["gt_classes"].append(classes)
                per["levels"].append(torch.full_like(classes, lvl))
                per["locations"].append(cell[:, 1] * w + cell[:, 0])
            positives.append(AuxPositives(**{k: torch.cat(v) for k, v in per.items()}))
        return AuxOutput({"loss_aux_centre_cls": torch.stack(losses).mean()}, positives)


def _centre_heads(cfg, in_channels: int, strides: list[int]) -> nn.ModuleList:  # type: ignore[no-untyped-def]
    return nn.ModuleList([CentreCellHead(in_channels, strides, cfg.MODEL.CODETR.NUM_CLASSES)])


def test_box_refinement_keeps_boxes_valid_and_chains_the_references() -> None:
    model = _model()
    model.eval()
    images = model.preprocess(synthetic_batch(2, 64, 2))
    state = model.encode(images)
    tgt, pos, ref = model.main_queries(state, *model.proposals(state))
    # the box heads start at zero: every layer predicts its reference; a shift in layer 0 is then
    # carried by the refined references of all later layers
    with torch.no_grad():
        model.bbox_embed[0].layers[-1].bias.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
        _, boxes = model.decode(state, tgt, pos, ref)
        shifted = (torch.logit(ref.clamp(1e-5, 1 - 1e-5)) + torch.tensor([1.0, -1.0, 0.5, 0.0])).sigmoid()
        torch.testing.assert_close(boxes[0], shifted, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(boxes[1], boxes[0], rtol=1e-4, atol=1e-5)
        for head in model.bbox_embed:  # large random deltas: still valid boxes
            for layer in head.layers:
                layer.weight.normal_(0, 3.0)
        _, boxes = model.decode(state, tgt, pos, ref)
    for b in boxes:
        assert torch.isfinite(b).all() and (b >= 0).all() and (b <= 1).all()
        xyxy = cxcywh_to_xyxy(b)
        assert (xyxy[..., 2:] >= xyxy[..., :2]).all()


def test_training_step_gives_finite_losses_and_gradients_everywhere() -> None:
    model = _model(builder=_centre_heads)
    model.train()
    losses = model(synthetic_batch(2, 64, [3, 0]))  # an image without objects too
    expected = {"loss_dec_cls", "loss_dec_l1", "loss_dec_giou", "loss_proposal_cls", "loss_pos0_cls"}
    assert expected <= set(losses) and "loss_aux_centre_cls" in losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in (
        "backbone",
        "encoder",
        "decoder",
        "aux_heads",
        "pos_box_trans",
        "pos_feat_trans",
        "enc_class",
    ):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name) and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    # every trainable parameter takes part (no DistributedDataParallel find_unused_parameters)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize(
    "opts", [(), ("MODEL.CODETR.TWO_STAGE", "False", "MODEL.CODETR.BOX_REFINE", "False")]
)
def test_batch_without_objects_and_one_stage_variant_train(opts: tuple[str, ...]) -> None:
    model = _model(*opts)
    model.train()
    losses = model(synthetic_batch(2, 64, [0, 0]))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def _gt_positives(batch: list[dict]) -> list[AuxPositives]:  # type: ignore[type-arg]
    """Positives built directly from the ground truth: each GT twice (its own box, and a box
    shifted by 4 px), on level 0 at the cell of its centre (stride 8)."""
    out = []
    for x in batch:
        gt = x["instances"].gt_boxes.tensor
        cls = x["instances"].gt_classes
        centre = ((gt[:, :2] + gt[:, 2:]) / 2 / 8).floor().long()
        loc = centre[:, 1] * (x["image"].shape[-1] // 8) + centre[:, 0]
        out.append(
            AuxPositives(
                boxes=torch.cat([gt, gt + 4.0]),
                gt_boxes=torch.cat([gt, gt]),
                gt_classes=torch.cat([cls, cls]),
                levels=torch.zeros(2 * len(gt), dtype=torch.long),
                locations=torch.cat([loc, loc]),
            )
        )
    return out


def test_positive_query_branch_is_unmatched_and_trains_the_shared_decoder() -> None:
    model = _model(builder=_centre_heads)
    model.train()
    batch = synthetic_batch(2, 64, [2, 1], seed=3)
    images: ImageList = model.preprocess(batch)
    state = model.encode(images)
    pyramid = model.pyramid(state)

    def no_matching(*args: object) -> None:
        raise AssertionError("the positive-query branch must not run the Hungarian matcher")

    model.matcher = no_matching  # type: ignore[assignment]
    q = model.positive_queries(0, _gt_positives(batch), pyramid, images)
    assert q is not None and q["valid"].sum(1).tolist() == [4, 2]
    logits, boxes = model.run_positive_branch(state, q)
    assert len(logits) == len(model.decoder.layers)
    losses = model.branch_losses(logits, boxes, q)
    # by hand: positive j of image b against its own target, in order; padding queries count for nothing
    for layer, got in enumerate(losses):
        lg, bx = logits[layer], boxes[layer]
        cls = torch.zeros(()) + 0.0
        l1 = torch.zeros(())
        giou = torch.zeros(())
        for bi, n in enumerate([4, 2]):
            target = F.one_hot(q["gt_classes"][bi, :n], 8).float()
            cls = cls + sigmoid_focal_loss(lg[bi, :n], target).sum()
            l1 = l1 + (bx[bi, :n] - q["gt_boxes"][bi, :n]).abs().sum()
            giou = giou + giou_loss(cxcywh_to_xyxy(bx[bi, :n]), cxcywh_to_xyxy(q["gt_boxes"][bi, :n])).sum()
        torch.testing.assert_close(got["cls"], 2.0 * cls / 6)
        torch.testing.assert_close(got["l1"], 5.0 * l1 / 6)
        torch.testing.assert_close(got["giou"], 2.0 * giou / 6)
    # the branch's loss alone trains the shared decoder layers (and its own query projections),
    # not the one-to-one branch's query selection
    model.zero_grad()
    sum(v for layer in losses for v in layer.values()).backward()
    for i, layer in enumerate(model.decoder.layers):
        for name in ("self_attn.in_proj_weight", "cross_attn.sampling_offsets.weight", "ffn.linear1.weight"):
            grad = dict(layer.named_parameters())[name].grad
            assert grad is not None and grad.abs().sum() > 0, f"decoder layer {i} {name}"
    assert model.pos_box_trans[0][0].weight.grad.abs().sum() > 0
    assert model.pos_feat_trans[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.pos_trans.parameters())


def test_lambda1_and_lambda2_scale_the_branch_and_encoder_losses() -> None:
    batch = synthetic_batch(2, 64, 2, seed=4)
    runs = {}
    for lam1, lam2, per_layer in ((1.0, 2.0, True), (3.0, 0.5, True), (1.0, 2.0, False)):
        model = _model(
            "MODEL.CODETR.LAMBDA1", str(lam1), "MODEL.CODETR.LAMBDA2", str(lam2),
            "MODEL.CODETR.ENC_WEIGHT_PER_LAYER", str(per_layer), builder=_centre_heads,
        )  # fmt: skip
        model.train()
        torch.manual_seed(0)
        runs[(lam1, lam2, per_layer)] = {k: v.item() for k, v in model(batch).items()}
    base, scaled, once = runs[(1.0, 2.0, True)], runs[(3.0, 0.5, True)], runs[(1.0, 2.0, False)]
    assert scaled["loss_pos0_cls"] == pytest.approx(3.0 * base["loss_pos0_cls"], rel=1e-5)
    assert scaled["loss_aux_centre_cls"] == pytest.approx(0.25 * base["loss_aux_centre_cls"], rel=1e-5)
    assert scaled["loss_dec_cls"] == pytest.approx(base["loss_dec_cls"], rel=1e-5)
    # the sum over the L = 2 decoder layers of lambda2 L_enc
    assert base["loss_aux_centre_cls"] == pytest.approx(2 * once["loss_aux_centre_cls"], rel=1e-5)


def test_combine_losses_by_hand() -> None:
    t = torch.tensor
    dec = [{"cls": t(1.0)}, {"cls": t(2.0)}, {"cls": t(4.0)}]
    branches = [[{"cls": t(0.5)}, {"cls": t(0.25)}, {"cls": t(0.25)}], [{"cls": t(1.0)}] * 3]
    out = combine_losses(dec, {"cls": t(9.0)}, branches, {"loss_aux_atss_cls": t(0.1)}, 2.0, 3.0, True)
    assert out["loss_dec_cls"].item() == 7.0
    assert out["loss_proposal_cls"].item() == 9.0
    assert out["loss_pos0_cls"].item() == 2.0 and out["loss_pos1_cls"].item() == 6.0
    assert out["loss_aux_atss_cls"].item() == pytest.approx(3 * 3.0 * 0.1)


def test_eval_forward_returns_instances_in_original_pixels() -> None:
    model = _model("TEST.DETECTIONS_PER_IMAGE", "7")
    model.eval()
    batch = synthetic_batch(2, (48, 64), 1)
    batch[0]["height"], batch[0]["width"] = 96, 128  # the loader resized it by 0.5
    with torch.no_grad():
        out = model(batch)
    for result, (h, w) in zip(out, [(96, 128), (48, 64)]):
        inst = result["instances"]
        assert isinstance(inst, Instances) and len(inst) == 7 and inst.image_size == (h, w)
        assert isinstance(inst.pred_boxes, Boxes) and inst.scores.shape == (7,)
        assert inst.pred_classes.dtype == torch.long and int(inst.pred_classes.max()) < 8
        box = inst.pred_boxes.tensor
        assert (box[:, 0] >= 0).all() and (box[:, 2] <= w).all() and (box[:, 3] <= h).all()


def test_tbd_train_and_eval_run_codetr_from_its_config(tmp_path: Path) -> None:
    common = [
        "--data-dir", str(tmp_path / "data"), "--num-train-images", "8", "--num-val-images", "4",
        "--device", "cpu",
    ]  # fmt: skip
    run = tmp_path / "run"
    args = ["train", "--model", "configs/codetr_R18.yaml", "--iters", "2", "--batch-size", "2"]
    assert main([*args, "--output", str(run), *common, *TINY]) == 0
    assert (run / "model_final.pth").is_file()
    assert "loss_dec_cls" in (run / "metrics.json").read_text()
    results = json.loads((run / "results.json").read_text())
    assert "AP" in results["bbox"]
    assert main(["eval", "--run", str(run), "--output", str(tmp_path / "eval"), "--device", "cpu"]) == 0


def test_optimizer_applies_the_detr_lr_factors_and_full_model_clipping() -> None:
    from tbd.engine.optim import build_optimizer

    cfg = load_config("codetr_R18", [*TINY, "MODEL.CODETR.BACKBONE_LR_FACTOR", "0.1"])
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    base = cfg.SOLVER.BASE_LR
    assert lr_of[id(model.backbone.stem.conv1.weight)] == pytest.approx(0.1 * base)
    assert lr_of[id(model.decoder.layers[0].cross_attn.sampling_offsets.weight)] == pytest.approx(0.1 * base)
    assert lr_of[id(model.decoder.layers[0].cross_attn.value_proj.weight)] == pytest.approx(base)
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)
    # "full_model": the norm of all gradients together is clipped to CLIP_VALUE (0.1) in step()
    model.train()
    sum(model(synthetic_batch(2, 64, 2)).values()).mul(1e3).backward()
    opt.step()
    total = torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert total.item() == pytest.approx(0.1, rel=1e-3)


def test_coco_config_builds_the_published_sizes_and_runs_at_real_resolution_shapes() -> None:
    cfg = load_config("codetr_R50_COCO")
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, CoDETR)
    assert (model.hidden_dim, model.num_queries, len(model.decoder.layers), len(model.encoder.layers)) == (
        256,
        300,
        6,
        6,
    )
    assert model.pyramid_strides == [8, 16, 32, 64, 128]
    model.eval()
    batch = synthetic_batch(2, (96, 130), 1)
    batch[1]["image"] = batch[1]["image"][:, :80, :100]  # a smaller image: padding masks in play
    batch[1]["height"], batch[1]["width"] = 80, 100
    batch.append({"image": batch[0]["image"][:, :40, :40], "height": 40, "width": 40})  # below stride 64
    with torch.no_grad():
        out = model(batch)
    assert [r["instances"].image_size for r in out] == [(96, 130), (80, 100), (40, 40)]
    assert all(
        len(r["instances"]) == 100 and torch.isfinite(r["instances"].pred_boxes.tensor).all() for r in out
    )


def test_deformable_attention_module_places_offsets_in_cells_and_box_fractions() -> None:
    from tbd.modeling.codetr.deform_attn import MSDeformAttn

    attn = MSDeformAttn(d_model=4, n_levels=1, n_heads=1, n_points=1).double()
    with torch.no_grad():
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()
        attn.sampling_offsets.weight.zero_()
    shapes = torch.tensor([[4, 8]])  # H 4, W 8
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(8.0), indexing="ij")
    value = torch.stack([xs, ys, xs * 0, xs * 0 + 1], -1).reshape(1, 32, 4).double()  # channels: column, row
    query = torch.zeros(1, 1, 4, dtype=torch.float64)
    centre = torch.tensor([[[[(2 + 0.5) / 8, (1 + 0.5) / 4]]]], dtype=torch.float64)  # cell (x 2, y 1)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 2.0]))  # one cell right, two down
        out = attn(query, centre, value, shapes)
        assert out[0, 0, :2].tolist() == pytest.approx([3.0, 3.0])
        # a box reference: the offset is a fraction of half the box (w 0.5 -> 2 columns per unit)
        box = torch.cat([centre, torch.tensor([[[[0.5, 0.5]]]], dtype=torch.float64)], -1)
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))
        out = attn(query, box, value, shapes)
        assert out[0, 0, :2].tolist() == pytest.approx([2.0 + 0.25 * 8, 1.0])


def test_positives_outside_the_pyramid_are_a_clear_error() -> None:
    model = _model(builder=_centre_heads)
    batch = synthetic_batch(2, 64, 1)
    images = model.preprocess(batch)
    pyramid = model.pyramid(model.encode(images))
    positives = _gt_positives(batch)
    assert model.positive_queries(0, positives, pyramid, images) is not None
    positives[1].locations = positives[1].locations + 64  # level 0 is 8 x 8
    with pytest.raises(ValueError, match="outside the pyramid"):
        model.positive_queries(0, positives, pyramid, images)


def test_codetr_trains_with_the_real_atss_and_rcnn_heads() -> None:
    """The configs' aux heads (tbd.modeling.aux_heads) plugged into CoDETR: their one-to-many losses
    and their positives' query branches are trained; inference is unchanged by them."""
    from detectron2.utils.events import EventStorage

    from tbd.modeling.aux_heads.atss import ATSSAuxHead
    from tbd.modeling.aux_heads.rcnn import RCNNAuxHead

    cfg = load_config("codetr_R18", [*TINY, "MODEL.AUX_HEADS.NAMES", "['atss', 'rcnn']"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert [type(h) for h in model.aux_heads] == [ATSSAuxHead, RCNNAuxHead]
    assert all(h.weight == 1.0 for h in model.aux_heads)  # lambda2 is CoDETR's, not the head's
    model.train()
    with EventStorage():  # Detectron2's RPN/RoI heads log scalars, as in any training step
        losses = model(synthetic_batch(2, 64, [3, 2]))
    assert {"loss_aux_atss_cls", "loss_aux_rcnn_cls", "loss_pos0_cls", "loss_pos1_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for prefix in ("aux_heads.0", "aux_heads.1", "pos_box_trans.0", "pos_box_trans.1", "decoder"):
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0
            for n, p in model.named_parameters()
            if n.startswith(prefix)
        ), prefix
