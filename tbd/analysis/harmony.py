"""Harmonious-prediction analysis (METHODS.md §1.4, the TBD paper's Table 1 observation).

A detector's post-processed predictions are compared with the ground truth of a dataset:

* every prediction with ``score >= score_floor`` (default 0.05, Detectron2's usual test-time score
  threshold) gets the IoU with its best-matching GT box (same class by default);
* the "easily classified" ones (``score >= score_thresh``, default 0.5) are counted in IoU bins;
* ``harmonious_share`` is the share of easily classified predictions whose IoU is at least
  ``iou_thresh`` (default 0.7), reported at 0.5 too;
* ``mean_hs`` is the mean harmony score ``1 - tanh(|score - IoU|)`` over all predictions above the
  floor, ``mean_hs_easy`` over the easily classified ones.

Ground truth is read from ``DatasetCatalog`` (by ``image_id``), not from the loader's inputs:
Detectron2's test-time ``DatasetMapper`` drops the annotations, and the predictions are already in
the original image's coordinates (``detector_postprocess``), which is the frame of the dataset
dicts. So no transform has to be undone and any test loader works. Crowd annotations
(``iscrowd = 1``) are not used as ground truth.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from torch import Tensor

from tbd.ops.boxes import best_iou_match

logger = logging.getLogger(__name__)

#: IoU thresholds always reported besides ``iou_thresh`` (0.5: the loosest "correct detection")
EXTRA_IOU_THRESHOLDS = (0.5,)


def default_bin_edges(num_bins: int = 10) -> tuple[float, ...]:
    """``num_bins`` equal IoU bins on [0, 1]; edges rounded so 0.7 is 0.7, not 0.7000000000000001."""
    if num_bins < 1:
        raise ValueError(f"need at least one IoU bin, got {num_bins}")
    return tuple(round(float(e), 10) for e in np.linspace(0.0, 1.0, num_bins + 1))


@dataclass(frozen=True)
class HarmonyThresholds:
    """Every threshold of the measurement; all of them are printed next to the numbers.

    Attributes:
        score_thresh: a prediction with at least this score is "easily classified".
        iou_thresh: an easily classified prediction with at least this IoU is "harmonious".
        score_floor: predictions below this score are ignored entirely (mean HS is over the rest).
        bin_edges: IoU histogram edges, increasing, from 0 to 1; bins are ``[a, b)``, the last
            ``[a, 1]``.
        class_agnostic: match a prediction with GT boxes of any class (default: its own class).
    """

    score_thresh: float = 0.5
    iou_thresh: float = 0.7
    score_floor: float = 0.05
    bin_edges: tuple[float, ...] = field(default_factory=default_bin_edges)
    class_agnostic: bool = False

    def __post_init__(self) -> None:
        edges = tuple(float(e) for e in self.bin_edges)
        object.__setattr__(self, "bin_edges", edges)
        if len(edges) < 2 or edges[0] != 0.0 or edges[-1] != 1.0:
            raise ValueError(f"IoU bin edges must run from 0 to 1, got {list(edges)}")
        if any(b <= a for a, b in zip(edges[:-1], edges[1:])):
            raise ValueError(f"IoU bin edges must increase strictly, got {list(edges)}")
        for name in ("score_thresh", "iou_thresh", "score_floor"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if self.score_floor > self.score_thresh:
            raise ValueError(
                f"score_floor ({self.score_floor}) is above score_thresh ({self.score_thresh}): every "
                "easily classified prediction must also pass the floor"
            )

    @property
    def reported_iou_thresholds(self) -> tuple[float, ...]:
        return tuple(sorted({*EXTRA_IOU_THRESHOLDS, self.iou_thresh}))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bin_edges"] = list(self.bin_edges)
        d["reported_iou_thresholds"] = list(self.reported_iou_thresholds)
        return d


# ---------------------------------------------------------------------------------------------
# pure computations
def best_match_iou(
    pred_boxes: Tensor,
    pred_classes: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    class_agnostic: bool = False,
) -> Tensor:
    """IoU of each prediction ``[N, 4]`` with its best-matching GT ``[G, 4]`` -> ``[N]``.

    Per class by default: a GT box of another class counts as IoU 0. No GT -> 0. The ``[N, G]``
    IoUs are computed in bounded blocks of GTs (crowded images).
    """
    if gt_boxes.shape[0] == 0 or pred_boxes.shape[0] == 0:
        return pred_boxes.new_zeros(pred_boxes.shape[0])
    classes = (None, None) if class_agnostic else (pred_classes, gt_classes)
    best, _ = best_iou_match(pred_boxes.float(), gt_boxes.float(), None, *classes)
    return best.clamp(min=0.0)


def harmony_score_np(scores: np.ndarray, ious: np.ndarray) -> np.ndarray:
    """HS = 1 - tanh(|score - IoU|) (METHODS.md §1.2), on numpy arrays."""
    return 1.0 - np.tanh(np.abs(scores.astype(np.float64) - ious.astype(np.float64)))


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def summarize(
    scores: np.ndarray,
    ious: np.ndarray,
    thresholds: HarmonyThresholds,
    num_images: int = 0,
    num_gt: int = 0,
) -> dict[str, Any]:
    """The harmony statistics of predictions with ``scores`` and best-match ``ious`` (1-D, same length).

    Predictions below ``score_floor`` are dropped first. Values that are undefined (no easy
    prediction, no prediction at all) are ``None``. The thresholds are part of the dict (the keys
    of :data:`THRESHOLD_KEYS`).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    ious = np.asarray(ious, dtype=np.float64).reshape(-1)
    if scores.shape != ious.shape:
        raise ValueError(f"scores {scores.shape} and ious {ious.shape} differ in length")
    kept = scores >= thresholds.score_floor
    scores, ious = scores[kept], ious[kept]
    easy = scores >= thresholds.score_thresh
    easy_ious = ious[easy]
    counts, _ = np.histogram(easy_ious, bins=np.asarray(thresholds.bin_edges, dtype=np.float64))
    num_easy = int(easy.sum())
    shares = (counts / num_easy).tolist() if num_easy else [None] * len(counts)
    hs = harmony_score_np(scores, ious)
    share_at = {
        f"{t:g}": (float((easy_ious >= t).mean()) if num_easy else None)
        for t in thresholds.reported_iou_thresholds
    }
    return {
        **thresholds.as_dict(),
        "num_images": int(num_images),
        "num_gt": int(num_gt),
        "num_predictions": int(scores.size),
        "num_easy": num_easy,
        "num_harmonious": int((easy_ious >= thresholds.iou_thresh).sum()),
        "harmonious_share": share_at[f"{thresholds.iou_thresh:g}"],
        "harmonious_share_at": share_at,
        "easy_iou_counts": [int(c) for c in counts],
        "easy_iou_shares": shares,
        "mean_iou_easy": _mean_or_none(easy_ious),
        "mean_hs": _mean_or_none(hs),
        "mean_hs_easy": _mean_or_none(hs[easy]),
    }


#: the keys of a summary that hold its thresholds (:meth:`HarmonyThresholds.as_dict`)
THRESHOLD_KEYS = (
    "score_thresh",
    "iou_thresh",
    "score_floor",
    "bin_edges",
    "class_agnostic",
    "reported_iou_thresholds",
)


def thresholds_of(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The thresholds a summary was measured with."""
    return {k: summary[k] for k in THRESHOLD_KEYS}


def bin_labels(edges: Sequence[float]) -> list[str]:
    """``"0.0-0.1"``-style labels of the bins between ``edges``."""
    return [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]


def detectron2_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """A flat ``{name: float}`` view of :func:`summarize`'s dict for Detectron2's machinery.

    ``EventStorage.put_scalars`` and ``print_csv_format`` need plain numbers: undefined values
    become NaN; per-bin shares use Detectron2's ``"name-detail"`` convention (like ``AP-person``),
    which ``print_csv_format`` leaves out of its summary line.
    """
    t = summary

    def num(v: Any) -> float:
        return float("nan") if v is None else float(v)

    out: dict[str, float] = {
        "harmonious_share": num(summary["harmonious_share"]),
        **{f"harmonious_share@{k}": num(v) for k, v in summary["harmonious_share_at"].items()},
        "mean_hs": num(summary["mean_hs"]),
        "mean_hs_easy": num(summary["mean_hs_easy"]),
        "mean_iou_easy": num(summary["mean_iou_easy"]),
        "num_easy": float(summary["num_easy"]),
        "num_predictions": float(summary["num_predictions"]),
        "score_thresh": float(t["score_thresh"]),
        "iou_thresh": float(t["iou_thresh"]),
        "score_floor": float(t["score_floor"]),
    }
    for label, share in zip(bin_labels(t["bin_edges"]), summary["easy_iou_shares"]):
        out[f"easy_iou_share-{label}"] = num(share)
    return out


def _gt_index(dataset_dicts: Iterable[Mapping[str, Any]]) -> dict[Any, tuple[Tensor, Tensor]]:
    """``image_id -> (boxes [G, 4] XYXY_ABS, classes [G])`` of the non-crowd annotations."""
    index: dict[Any, tuple[Tensor, Tensor]] = {}
    for d in dataset_dicts:
        anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = np.zeros((len(anns), 4), dtype=np.float64)
        for mode in {a.get("bbox_mode", BoxMode.XYWH_ABS) for a in anns}:
            rows = [i for i, a in enumerate(anns) if a.get("bbox_mode", BoxMode.XYWH_ABS) == mode]
            raw = np.asarray([anns[i]["bbox"] for i in rows], dtype=np.float64).reshape(-1, 4)
            boxes[rows] = BoxMode.convert(raw, mode, BoxMode.XYXY_ABS)
        classes = torch.as_tensor([int(a["category_id"]) for a in anns], dtype=torch.int64)
        index[d["image_id"]] = (torch.as_tensor(boxes, dtype=torch.float32), classes)
    return index


# ---------------------------------------------------------------------------------------------
class HarmonyEvaluator(DatasetEvaluator):
    """Detectron2 evaluator of the harmonious-prediction ratio of a detector on a dataset.

    Use it like ``COCOEvaluator``: ``inference_on_dataset(model, test_loader, evaluator)``, alone
    or in ``DatasetEvaluators``. ``evaluate()`` returns ``{"harmony": {name: float}}`` (see
    :func:`detectron2_metrics`) on the main process and ``{}`` elsewhere; the full result of
    :func:`summarize` (histogram, thresholds, counts) is kept in ``self.summary``.

    Args:
        dataset_name: registered dataset whose dicts hold the ground truth (``DatasetCatalog``).
        thresholds: the measurement's thresholds (defaults: :class:`HarmonyThresholds`).
        dataset_dicts: the dataset's dicts, if already loaded (skips a second ``DatasetCatalog.get``).
        result_key: the key of the results (``"harmony"``); two evaluators with other thresholds
            in one ``DatasetEvaluators`` need two keys.
    """

    def __init__(
        self,
        dataset_name: str,
        thresholds: HarmonyThresholds | None = None,
        dataset_dicts: Sequence[Mapping[str, Any]] | None = None,
        result_key: str = "harmony",
    ) -> None:
        self.dataset_name = dataset_name
        self.result_key = result_key
        self.thresholds = thresholds or HarmonyThresholds()
        self._dicts = dataset_dicts
        self._gt: dict[Any, tuple[Tensor, Tensor]] | None = None
        self.summary: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self._scores: list[np.ndarray] = []
        self._ious: list[np.ndarray] = []
        self._num_images = 0
        self._num_gt = 0

    def _ground_truth(self) -> dict[Any, tuple[Tensor, Tensor]]:
        if self._gt is None:
            if self._dicts is None:
                from detectron2.data import DatasetCatalog

                self._dicts = DatasetCatalog.get(self.dataset_name)
            self._gt = _gt_index(self._dicts)
        return self._gt

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        gt = self._ground_truth()
        for inp, out in zip(inputs, outputs):
            image_id = inp["image_id"]
            if image_id not in gt:
                raise KeyError(f"image_id {image_id!r} is not in dataset {self.dataset_name!r}")
            gt_boxes, gt_classes = gt[image_id]
            inst = out["instances"].to("cpu")
            scores = inst.scores.float()
            keep = scores >= self.thresholds.score_floor
            boxes = inst.pred_boxes.tensor[keep]
            ious = best_match_iou(
                boxes, inst.pred_classes[keep], gt_boxes, gt_classes, self.thresholds.class_agnostic
            )
            self._scores.append(scores[keep].numpy().astype(np.float32))
            self._ious.append(ious.numpy().astype(np.float32))
            self._num_images += 1
            self._num_gt += int(gt_boxes.shape[0])

    def evaluate(self) -> OrderedDict[str, dict[str, float]] | dict:
        if comm.get_world_size() > 1:
            comm.synchronize()
            scores = list(itertools.chain(*comm.gather(self._scores, dst=0)))
            ious = list(itertools.chain(*comm.gather(self._ious, dst=0)))
            num_images = sum(comm.gather(self._num_images, dst=0))
            num_gt = sum(comm.gather(self._num_gt, dst=0))
            if not comm.is_main_process():
                return {}
        else:
            scores, ious = self._scores, self._ious
            num_images, num_gt = self._num_images, self._num_gt
        if num_images == 0:
            logger.warning("HarmonyEvaluator: no image was processed")
        all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        all_ious = np.concatenate(ious) if ious else np.zeros(0, np.float32)
        self.summary = summarize(all_scores, all_ious, self.thresholds, num_images, num_gt)
        return OrderedDict({self.result_key: detectron2_metrics(self.summary)})


# ---------------------------------------------------------------------------------------------
def build_harmony_loader(
    cfg: Any, dataset_name: str, max_images: int | None = None
) -> tuple[Any, list[dict[str, Any]]]:
    """Detectron2's test loader (``DatasetMapper(cfg, False)``) on the first ``max_images`` images."""
    from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts

    dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be positive, got {max_images}")
        dicts = dicts[:max_images]
    loader = build_detection_test_loader(
        dataset=dicts, mapper=DatasetMapper(cfg, False), num_workers=cfg.DATALOADER.NUM_WORKERS
    )
    return loader, dicts


def measure_harmony(
    cfg: Any,
    model: torch.nn.Module,
    dataset_name: str,
    *,
    score_thresh: float = 0.5,
    iou_thresh: float = 0.7,
    score_floor: float = 0.05,
    bin_edges: Sequence[float] | None = None,
    class_agnostic: bool = False,
    max_images: int | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``dataset_name`` and return :func:`summarize`'s dict (``{}`` off the main process).

    ``model`` is any Detectron2 detector (a ``TBDistiller`` in eval mode runs its student). The
    test loader is built from ``cfg`` (``INPUT.MIN_SIZE_TEST``, ``DATALOADER.NUM_WORKERS``).
    """
    from detectron2.evaluation import inference_on_dataset

    thresholds = HarmonyThresholds(
        score_thresh=score_thresh,
        iou_thresh=iou_thresh,
        score_floor=score_floor,
        bin_edges=tuple(bin_edges) if bin_edges is not None else default_bin_edges(),
        class_agnostic=class_agnostic,
    )
    loader, dicts = build_harmony_loader(cfg, dataset_name, max_images)
    evaluator = HarmonyEvaluator(dataset_name, thresholds, dataset_dicts=dicts)
    inference_on_dataset(model, loader, evaluator)
    if not comm.is_main_process():
        return {}
    summary = dict(evaluator.summary)
    summary["dataset"] = dataset_name
    return summary
