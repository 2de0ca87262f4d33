"""HarmonyEvaluator and the harmony statistics on hand-built predictions and ground truth."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, BoxMode, Instances

from tbd.analysis.harmony import (
    HarmonyEvaluator,
    HarmonyThresholds,
    best_match_iou,
    default_bin_edges,
    detectron2_metrics,
    summarize,
)


def _ann(box: list[float], cls: int, mode: BoxMode = BoxMode.XYXY_ABS, crowd: int = 0) -> dict[str, Any]:
    return {"bbox": box, "bbox_mode": mode, "category_id": cls, "iscrowd": crowd}


def _dataset() -> list[dict[str, Any]]:
    return [
        {
            "image_id": 1,
            "height": 50,
            "width": 50,
            "annotations": [
                _ann([0, 0, 10, 10], 0),  # A, class 0
                _ann([20, 20, 20, 20], 1, BoxMode.XYWH_ABS),  # B = [20, 20, 40, 40], class 1
                _ann([0, 0, 10, 10], 1, crowd=1),  # crowd: never ground truth
            ],
        },
        {"image_id": 2, "height": 50, "width": 50, "annotations": []},
        {"image_id": 3, "height": 50, "width": 50, "annotations": [_ann([5, 5, 25, 25], 2)]},
    ]


def _instances(boxes: list[list[float]], scores: list[float], classes: list[int]) -> dict[str, Instances]:
    inst = Instances((50, 50))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return {"instances": inst}


def _outputs() -> list[tuple[dict[str, Any], dict[str, Instances]]]:
    image1 = _instances(
        [
            [0, 0, 10, 10],  # p1 cls 0, score .9: IoU 1 with A
            [0, 0, 10, 5],  # p2 cls 0, score .8: IoU .5 with A
            [20, 20, 40, 40],  # p3 cls 0, score .6: covers B (class 1) -> 0 per class, 1 agnostic
            [0, 0, 10, 10],  # p4 cls 1, score .3 (not easy): on A and the crowd box -> 0 / 1
            [0, 0, 10, 10],  # p5 score .01: below the floor, ignored
            [20, 20, 40, 35],  # p6 cls 1, score .55: IoU .75 with B
        ],
        [0.9, 0.8, 0.6, 0.3, 0.01, 0.55],
        [0, 0, 0, 1, 0, 1],
    )
    image2 = _instances([[5, 5, 15, 15]], [0.7], [2])  # q1: no GT in the image -> IoU 0
    image3 = _instances([], [], [])  # GT, no prediction
    return [({"image_id": 1}, image1), ({"image_id": 2}, image2), ({"image_id": 3}, image3)]


def _run(thresholds: HarmonyThresholds | None = None, batch: int = 1) -> tuple[dict, dict]:
    ev = HarmonyEvaluator("hand_built", thresholds, dataset_dicts=_dataset())
    ev.reset()
    pairs = _outputs()
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        ev.process([c[0] for c in chunk], [c[1] for c in chunk])
    metrics = ev.evaluate()
    return ev.summary, metrics


def _hs(score: float, iou: float) -> float:
    return 1.0 - math.tanh(abs(score - iou))


def test_per_class_statistics_match_hand_worked_values() -> None:
    s, metrics = _run()
    # kept (score >= .05): p1 (.9, 1), p2 (.8, .5), p3 (.6, 0), p4 (.3, 0), p6 (.55, .75), q1 (.7, 0)
    assert s["num_images"] == 3 and s["num_gt"] == 3  # the crowd box is not counted
    assert s["num_predictions"] == 6
    assert s["num_easy"] == 5
    assert s["easy_iou_counts"] == [2, 0, 0, 0, 0, 1, 0, 1, 0, 1]
    assert s["easy_iou_shares"] == pytest.approx([0.4, 0, 0, 0, 0, 0.2, 0, 0.2, 0, 0.2])
    assert s["harmonious_share"] == pytest.approx(2 / 5)  # p1, p6
    assert s["harmonious_share_at"] == pytest.approx({"0.5": 3 / 5, "0.7": 2 / 5})
    assert s["num_harmonious"] == 2
    assert s["mean_iou_easy"] == pytest.approx((1 + 0.5 + 0 + 0.75 + 0) / 5)
    pairs = [(0.9, 1.0), (0.8, 0.5), (0.6, 0.0), (0.3, 0.0), (0.55, 0.75), (0.7, 0.0)]
    assert s["mean_hs"] == pytest.approx(np.mean([_hs(a, b) for a, b in pairs]), abs=1e-6)
    easy = [p for p in pairs if p[0] >= 0.5]
    assert s["mean_hs_easy"] == pytest.approx(np.mean([_hs(a, b) for a, b in easy]), abs=1e-6)
    assert s["score_thresh"] == 0.5 and s["iou_thresh"] == 0.7 and s["score_floor"] == 0.05
    assert s["bin_edges"][7] == 0.7
    # the Detectron2 view: flat floats, per-bin values with the "name-detail" convention
    flat = metrics["harmony"]
    assert flat["harmonious_share"] == pytest.approx(0.4)
    assert flat["easy_iou_share-0.7-0.8"] == pytest.approx(0.2)
    assert all(isinstance(v, float) for v in flat.values())


def test_class_agnostic_matches_any_class() -> None:
    s, _ = _run(HarmonyThresholds(class_agnostic=True))
    # p3 now matches B (IoU 1), p4 matches A (IoU 1); the crowd box is still ignored
    assert s["easy_iou_counts"] == [1, 0, 0, 0, 0, 1, 0, 1, 0, 2]
    assert s["harmonious_share_at"] == pytest.approx({"0.5": 4 / 5, "0.7": 3 / 5})
    assert s["class_agnostic"] is True


def test_batches_of_several_images_give_the_same_result() -> None:
    one, _ = _run(batch=1)
    three, _ = _run(batch=3)
    assert one == three


def test_thresholds_change_what_counts() -> None:
    s, _ = _run(HarmonyThresholds(score_thresh=0.75, iou_thresh=0.9, score_floor=0.5, bin_edges=(0, 0.5, 1)))
    # kept: p1 (.9, 1), p2 (.8, .5), p3 (.6, 0), p6 (.55, .75), q1 (.7, 0); easy: p1, p2
    assert s["num_predictions"] == 5 and s["num_easy"] == 2
    assert s["easy_iou_counts"] == [0, 2]  # 0.5 falls in [0.5, 1]
    assert s["harmonious_share_at"] == pytest.approx({"0.5": 1.0, "0.9": 0.5})
    assert s["reported_iou_thresholds"] == [0.5, 0.9]


def test_no_predictions_gives_undefined_shares_not_errors() -> None:
    ev = HarmonyEvaluator("hand_built", dataset_dicts=_dataset())
    ev.process([{"image_id": 3}], [_instances([], [], [])])
    metrics = ev.evaluate()["harmony"]
    s = ev.summary
    assert s["num_images"] == 1 and s["num_gt"] == 1 and s["num_easy"] == 0
    assert s["easy_iou_counts"] == [0] * 10
    assert s["harmonious_share"] is None and s["mean_hs"] is None and s["easy_iou_shares"][0] is None
    assert math.isnan(metrics["harmonious_share"])
    json.dumps(s)  # None, not NaN: valid JSON


def test_unknown_image_id_is_reported() -> None:
    ev = HarmonyEvaluator("hand_built", dataset_dicts=_dataset())
    with pytest.raises(KeyError, match="image_id 99"):
        ev.process([{"image_id": 99}], [_instances([], [], [])])


def test_reset_forgets_processed_images() -> None:
    ev = HarmonyEvaluator("hand_built", dataset_dicts=_dataset())
    pairs = _outputs()
    ev.process([pairs[0][0]], [pairs[0][1]])
    ev.reset()
    ev.process([pairs[1][0]], [pairs[1][1]])
    ev.evaluate()
    assert ev.summary["num_images"] == 1 and ev.summary["num_predictions"] == 1


def test_best_match_iou_edge_cases() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 5, 10]])
    classes = torch.tensor([0, 1])
    gt = torch.tensor([[0.0, 0, 10, 10], [0, 0, 5, 10]])
    assert best_match_iou(boxes, classes, gt, torch.tensor([0, 1])).tolist() == [1.0, 1.0]
    # per class: the 2nd prediction may only match the class-1 GT (IoU .5 with the first box)
    assert best_match_iou(boxes, classes, gt[:1], torch.tensor([1])).tolist() == [0.0, 0.5]
    assert best_match_iou(boxes, classes, gt[:0], torch.tensor([], dtype=torch.int64)).tolist() == [0, 0]
    assert best_match_iou(boxes[:0], classes[:0], gt, torch.tensor([0, 1])).shape == (0,)


def test_summarize_boundaries_are_inclusive() -> None:
    t = HarmonyThresholds(score_thresh=0.5, iou_thresh=0.75, score_floor=0.25)
    s = summarize(np.array([0.5, 0.25, 0.2499]), np.array([0.75, 1.0, 1.0]), t)
    assert s["num_predictions"] == 2 and s["num_easy"] == 1 and s["harmonious_share"] == 1.0
    assert s["easy_iou_counts"][7] == 1
    s = summarize(np.array([0.9]), np.array([1.0]), t)
    assert s["easy_iou_counts"][-1] == 1  # IoU 1 lies in the last, closed bin


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bin_edges": (0.1, 0.5, 1.0)},
        {"bin_edges": (0.0, 0.5, 0.5, 1.0)},
        {"bin_edges": (0.0,)},
        {"iou_thresh": 1.5},
        {"score_floor": 0.6, "score_thresh": 0.5},
    ],
)
def test_bad_thresholds_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        HarmonyThresholds(**kwargs)


def test_default_bin_edges_are_round() -> None:
    assert default_bin_edges() == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert default_bin_edges(4) == (0.0, 0.25, 0.5, 0.75, 1.0)


def test_detectron2_metrics_are_printable_by_detectron2() -> None:
    from collections import OrderedDict

    from detectron2.evaluation.testing import flatten_results_dict, print_csv_format

    _, metrics = _run()
    print_csv_format(OrderedDict(metrics))  # raises on non-numbers
    flat = flatten_results_dict(metrics)
    assert flat["harmony/harmonious_share"] == pytest.approx(0.4)
    assert detectron2_metrics(summarize(np.zeros(0), np.zeros(0), HarmonyThresholds()))["num_easy"] == 0


# --- DDP: two CPU processes (gloo) gather into the main process ---------------------------------
def _ddp_worker(path: str) -> None:
    from detectron2.utils import comm

    ev = HarmonyEvaluator("hand_built", dataset_dicts=_dataset())
    pairs = _outputs()
    rank = comm.get_rank()
    mine = pairs[rank :: comm.get_world_size()]  # rank 0: images 1 and 3, rank 1: image 2
    ev.process([p[0] for p in mine], [p[1] for p in mine])
    result = ev.evaluate()
    with open(os.path.join(path, f"rank{rank}.json"), "w") as f:
        json.dump({"result": result, "summary": ev.summary}, f)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU launch shim applies only without CUDA")
def test_ddp_gathers_every_process_into_the_main_one(tmp_path) -> None:
    from detectron2.engine import launch

    launch(_ddp_worker, 2, dist_url="auto", args=(str(tmp_path),))
    main = json.loads((tmp_path / "rank0.json").read_text())
    other = json.loads((tmp_path / "rank1.json").read_text())
    single, _ = _run()
    assert other["result"] == {}
    assert main["summary"] == json.loads(json.dumps(single))


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_best_iou_match_in_gt_blocks_equals_the_dense_max(class_agnostic: bool) -> None:
    """The block-wise best match (used for crowded images) gives the dense [N, G] max and argmax."""
    from tbd.ops.boxes import best_iou_match, pairwise_iou

    gen = torch.Generator().manual_seed(3)
    xy = torch.rand(40, 2, generator=gen) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(40, 2, generator=gen) * 60], dim=1)
    gxy = torch.rand(300, 2, generator=gen) * 200
    gt = torch.cat([gxy, gxy + 5 + torch.rand(300, 2, generator=gen) * 60], dim=1)
    classes, gt_classes = (
        torch.randint(0, 3, (40,), generator=gen),
        torch.randint(0, 3, (300,), generator=gen),
    )
    dense = pairwise_iou(boxes, gt)
    if not class_agnostic:
        dense = dense.masked_fill(classes[:, None] != gt_classes[None, :], 0.0)
    labels = (None, None) if class_agnostic else (classes, gt_classes)
    for chunk in (2**22, 40 * 7, 1):
        best, index = best_iou_match(boxes, gt, None, *labels, max_chunk_elements=chunk)
        assert torch.equal(best, dense.amax(dim=1)) and torch.equal(index, dense.argmax(dim=1))
    assert torch.equal(best_match_iou(boxes, classes, gt, gt_classes, class_agnostic), dense.amax(dim=1))


def test_pairwise_iou_nograd_is_bitwise_the_autograd_form() -> None:
    from tbd.ops.boxes import pairwise_iou, pairwise_iou_nograd

    gen = torch.Generator().manual_seed(5)
    xy = torch.rand(2, 300, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + torch.rand(2, 300, 2, generator=gen) * 40], -1)
    boxes[0, 0] = torch.tensor([5.0, 5.0, 5.0, 9.0])  # degenerate
    gxy = torch.rand(2, 17, 2, generator=gen) * 100
    gt = torch.cat([gxy, gxy + torch.rand(2, 17, 2, generator=gen) * 40], -1)
    assert torch.equal(pairwise_iou_nograd(boxes, gt), pairwise_iou(boxes, gt))
    assert torch.equal(pairwise_iou_nograd(boxes[0], gt[0]), pairwise_iou(boxes[0], gt[0]))
