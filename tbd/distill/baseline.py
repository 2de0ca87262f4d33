"""The student trained alone, side by side with the distilled one (``DISTILL.WITH_BASELINE``).

The only honest yardstick of a distillation is the same student trained without it: same initial
weights, same batches in the same order, same schedule. With ``DISTILL.WITH_BASELINE`` the
:class:`~tbd.distill.TBDistiller` holds ``baseline``, a copy of its student, and returns the
baseline's detection losses under :data:`BASELINE_PREFIX` beside the distilled student's; its
parameters are disjoint from everything else, so a per-parameter optimizer (SGD, AdamW) updates it
exactly as if it trained alone. What would couple the two is kept apart:

* random numbers: the baseline's forward replays the generator state the student's started from
  (:class:`RngSnapshot`), so e.g. R-CNN proposal sampling draws the same samples;
* non-finite steps: :class:`tbd.engine.trainer.GuardedTrainer` checks the two loss sets and
  gradient sets apart (one side's bad step does not skip the other's);
* full-model gradient clipping: clipped per group (``TBDistiller.gradient_clip_groups``);
* initial weights: copied from the student after ``MODEL.WEIGHTS`` is loaded
  (``TBDistiller.sync_baseline``); checkpoints hold ``baseline.*``, exports the student only.

:class:`BaselineHook` evaluates the baseline whenever the student is evaluated, logs both
(``baseline/...`` scalars next to the student's), the teacher once at the start (``teacher/...``),
warns when the distilled student is behind by more than ``DISTILL.BASELINE_MARGIN`` AP and, with
``DISTILL.BASELINE_GUARD "scale"``, scales the distillation terms down for the rest of the run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm
from torch import nn

logger = logging.getLogger(__name__)

#: prefix of the baseline's losses and metrics
BASELINE_PREFIX = "baseline/"
#: prefix of the teacher's metrics (logged once, at the start)
TEACHER_PREFIX = "teacher/"
#: the harmony measurements of every comparison: (result key, score threshold of "easily classified")
HARMONY_KEYS = (("harmony_score0.5", 0.5), ("harmony_score0.3", 0.3))


@dataclass
class RngSnapshot:
    """The CPU (and the device's CUDA) generator state at one moment, to replay a forward's draws."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def take(cls, device: torch.device) -> RngSnapshot:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def split_losses(
    loss_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(the distilled model's losses, the baseline's)``; the second is empty without a baseline."""
    main = {k: v for k, v in loss_dict.items() if not k.startswith(BASELINE_PREFIX)}
    alone = {k: v for k, v in loss_dict.items() if k.startswith(BASELINE_PREFIX)}
    return main, alone


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def baseline_of(model: nn.Module) -> nn.Module | None:
    """The baseline student of a (wrapped) distiller, or ``None``."""
    found = getattr(unwrap_model(model), "baseline", None)
    return found if isinstance(found, nn.Module) else None


def sync_baseline(model: nn.Module) -> None:
    """Copy the student's weights into the baseline of a (wrapped) distiller; no-op otherwise."""
    inner = unwrap_model(model)
    if baseline_of(inner) is not None:
        inner.sync_baseline()


def with_harmony(evaluator: Any, dataset_name: str) -> Any:
    """``evaluator`` plus the harmony measurements of :data:`HARMONY_KEYS` (one inference pass)."""
    from detectron2.evaluation import DatasetEvaluators

    from tbd.analysis.harmony import HarmonyEvaluator, HarmonyThresholds

    harmony = [
        HarmonyEvaluator(dataset_name, HarmonyThresholds(score_thresh=score), result_key=key)
        for key, score in HARMONY_KEYS
    ]
    return DatasetEvaluators([evaluator, *harmony])


#: the ``lead_ap`` buffer before the teacher was evaluated (an AP is never negative)
NOT_MEASURED_AP = -1.0


def measured_ap(results: Mapping[str, Any] | None) -> float | None:
    """The AP of an evaluation for the rule: a model that detected nothing (COCO AP NaN) has AP 0;
    ``None`` when there is no bbox result at all (not evaluated here, e.g. off the main process)."""
    if ((results or {}).get("bbox") or {}).get("AP") is None:
        return None
    return ap_of(results) or 0.0  # ap_of: None for NaN


def put_results(storage: Any, prefix: str, results: Mapping[str, Any]) -> None:
    """Every number of an evaluation's results as a scalar ``prefix + key`` of the ``EventStorage``
    (``metrics.json``, TensorBoard); nothing for empty results (off the main process)."""
    if not results:
        return
    flat = {prefix + k: float(v) for k, v in flatten_results_dict(dict(results)).items()}
    storage.put_scalars(**flat, smoothing_hint=False)


def is_periodic_evaluation(next_iter: int, period: int, max_iter: int) -> bool:
    """Whether Detectron2's ``EvalHook`` evaluates after the step that ends at ``next_iter`` (its
    own test, the last iteration excluded: ``after_train`` evaluates that one)."""
    return period > 0 and next_iter % period == 0 and next_iter != max_iter


def missed_evaluation(start_iter: int, period: int, checked_iter: int) -> bool:
    """Whether a run resumed at ``start_iter`` starts from the periodic checkpoint written just before
    the evaluation of iteration ``start_iter - 1``, which the hook's last comparison
    (``checked_iter``) does not include: the comparison must be redone to resume exactly."""
    return period > 0 and start_iter > 0 and start_iter % period == 0 and checked_iter != start_iter - 1


def evaluate_model(trainer: Any, cfg: CfgNode, model: nn.Module) -> dict[str, Any]:
    """``trainer.test(cfg, model)`` in eval mode (the model's mode is restored); ``{}`` off the main
    process."""
    was_training = model.training
    model.eval()
    try:
        return dict(trainer.test(cfg, model) or {})
    finally:
        model.train(was_training)


def evaluate_teacher(trainer: Any, cfg: CfgNode, distiller: nn.Module, log: bool = True) -> dict[str, Any]:
    """The teacher's results on the student's test set at the student's test size, logged under
    :data:`TEACHER_PREFIX` (``log``) and kept in the distiller's ``lead_ap`` buffer when it has one
    (``DISTILL.LEAD_HD_WEIGHT``)."""
    from tbd.config_keys import teacher_config

    t_cfg = teacher_config(cfg)
    t_cfg.defrost()
    t_cfg.DATASETS.TEST = cfg.DATASETS.TEST
    t_cfg.INPUT.MIN_SIZE_TEST = cfg.INPUT.MIN_SIZE_TEST
    t_cfg.INPUT.MAX_SIZE_TEST = cfg.INPUT.MAX_SIZE_TEST
    t_cfg.DISTILL.WITH_BASELINE = True  # tbd's evaluators then add the harmony measurements
    t_cfg.OUTPUT_DIR = str(Path(cfg.OUTPUT_DIR) / "teacher_eval")
    results = evaluate_model(trainer, t_cfg, distiller.teacher)
    if log:
        put_results(trainer.storage, TEACHER_PREFIX, results)
    if hasattr(distiller, "lead_ap"):
        ap = comm.all_gather(measured_ap(results))[0]  # the main process evaluated
        distiller.lead_ap.fill_(NOT_MEASURED_AP if ap is None else ap)
    comm.synchronize()
    return results


# ---------------------------------------------------------------------------------------------
def ap_of(results: Mapping[str, Any] | None) -> float | None:
    """``results["bbox"]["AP"]`` when it is a number (NaN: nothing detected, no claim)."""
    value = ((results or {}).get("bbox") or {}).get("AP")
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def is_behind(distilled_ap: float | None, alone_ap: float | None, margin: float) -> bool:
    """Whether the distilled student's AP is below the student alone's by more than ``margin``."""
    if distilled_ap is None or alone_ap is None:
        return False
    return distilled_ap < alone_ap - margin


def behind_message(
    distilled_ap: float, alone_ap: float, iteration: int, margin: float, scaled: float | None
) -> str:
    text = (
        f"iteration {iteration + 1}: the distilled student ({distilled_ap:.1f} AP) is behind the same "
        f"student trained alone ({alone_ap:.1f} AP) by {alone_ap - distilled_ap:.1f} AP (margin "
        f"{margin:g}): distillation is hurting it. Try a stronger teacher, smaller distillation "
        "weights (DISTILL.HD_WEIGHT / TFD_WEIGHT / MIMIC_WEIGHT) or DISTILL.GATE"
    )
    if scaled is not None:
        text += f"; BASELINE_GUARD 'scale': distillation terms now x{scaled:g} for the rest of the run"
    return text


class BaselineHook(HookBase):
    """Evaluate the student trained alone whenever the distilled student is evaluated.

    Place it right after Detectron2's ``EvalHook`` (:func:`tbd.distill.hooks.insert_distill_hooks`): it runs at the
    same iterations, reads the distilled student's results from ``trainer._last_eval_results``
    (``DefaultTrainer``'s), evaluates the baseline with ``trainer.test`` and puts its metrics in
    the ``EventStorage`` under ``baseline/`` (``metrics.json``, TensorBoard), with
    ``baseline/gain_AP`` = distilled AP − alone AP. The teacher is evaluated once, before the first
    iteration (``teacher/...``).
    """

    def __init__(self, cfg: CfgNode, eval_period: int) -> None:
        self.cfg = cfg
        self._period = int(eval_period)
        self.margin = float(cfg.DISTILL.BASELINE_MARGIN)
        self.guard = str(cfg.DISTILL.BASELINE_GUARD)
        self.factor = float(cfg.DISTILL.BASELINE_GUARD_FACTOR)
        self.warnings: list[str] = []

    # --- evaluation ----------------------------------------------------------------------------
    def _distiller(self) -> nn.Module:
        return unwrap_model(self.trainer.model)

    def _evaluate(self, cfg: CfgNode, model: nn.Module) -> dict[str, Any]:
        return evaluate_model(self.trainer, cfg, model)

    def before_train(self) -> None:
        distiller = self._distiller()
        if self.trainer.start_iter > 0:  # resumed: the teacher was logged by the first run
            self._maybe_recheck_after_resume(distiller)
            return
        evaluate_teacher(self.trainer, self.cfg, distiller)

    def _maybe_recheck_after_resume(self, distiller: nn.Module) -> None:
        """A periodic checkpoint is written before the evaluation of its iteration: when the guard
        scales, redo a comparison the checkpoint does not know about (exact resume)."""
        start = self.trainer.start_iter
        checked = int(distiller.guard_checked_iter) if hasattr(distiller, "guard_checked_iter") else -1
        if self.guard == "scale" and missed_evaluation(start, self._period, checked):
            self._compare(start - 1, log=False)

    def _compare(self, iteration: int, log: bool = True) -> None:
        """Evaluate the baseline, log it (``log``), warn and guard. With ``log`` the distilled
        student's results are the EvalHook's of this iteration; without, it is evaluated here."""
        distiller = self._distiller()
        baseline = baseline_of(distiller)
        if baseline is None:
            return
        if log:  # empty off the main process, which decides
            student = getattr(self.trainer, "_last_eval_results", None) or {}
        else:
            student = self._evaluate(self.cfg, distiller)
        alone = self._evaluate(self.cfg, baseline)
        distilled_ap, alone_ap = ap_of(student), ap_of(alone)
        if log:
            put_results(self.trainer.storage, BASELINE_PREFIX, alone)
            if distilled_ap is not None and alone_ap is not None:
                self.trainer.storage.put_scalar(
                    BASELINE_PREFIX + "gain_AP", distilled_ap - alone_ap, smoothing_hint=False
                )
        behind = is_behind(distilled_ap, alone_ap, self.margin)
        behind = bool(comm.all_gather(behind)[0])  # the main process evaluated: its decision
        scaled = None
        if behind and self.guard == "scale":
            distiller.distill_scale.mul_(self.factor)
            scaled = float(distiller.distill_scale)
        if hasattr(distiller, "guard_checked_iter"):
            distiller.guard_checked_iter.fill_(iteration)
        if behind and comm.is_main_process() and distilled_ap is not None and alone_ap is not None:
            message = behind_message(distilled_ap, alone_ap, iteration, self.margin, scaled)
            self.warnings.append(message)
            logger.warning(message)
            _console_warning(message)
        comm.synchronize()

    def after_step(self) -> None:
        if is_periodic_evaluation(self.trainer.iter + 1, self._period, self.trainer.max_iter):
            self._compare(self.trainer.iter)

    def after_train(self) -> None:
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            # Detectron2 leaves trainer.iter at max_iter after the loop: the final evaluation is
            # that of the last iteration, max_iter - 1 (0-based)
            self._compare(self.trainer.max_iter - 1)


def _console_warning(message: str) -> None:
    from tbd.ui import console

    console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


# ---------------------------------------------------------------------------------------------
def metrics_rows(metrics_json: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.json`` (one JSON object per line); a line cut by a killed writer
    is skipped, a missing file has none."""
    path = Path(metrics_json)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_last_comparison(metrics_json: str | Path) -> dict[str, Any]:
    """The last baseline evaluation in a run's ``metrics.json``: ``{"bbox": {...}, "harmony_score0.5":
    {...}, ..., "gain_AP": float, "iteration": int}``; ``{}`` when the run has none."""
    last: dict[str, Any] = {}
    for row in metrics_rows(metrics_json):
        if BASELINE_PREFIX + "bbox/AP" in row:
            last = row
    if not last:
        return {}
    out: dict[str, Any] = {"iteration": last.get("iteration")}
    for key, value in last.items():
        if not key.startswith(BASELINE_PREFIX) or "loss" in key:
            continue
        parts = key[len(BASELINE_PREFIX) :].split("/", 1)
        if len(parts) == 1:
            out[parts[0]] = value
        else:
            out.setdefault(parts[0], {})[parts[1]] = value
    return out


def gain_note(
    distilled: Mapping[str, Any],
    alone: Mapping[str, Any] | None,
    margin: float,
    teacher: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """``(level, text)`` of the end-of-run comparison; level is ``"warning"`` or ``"note"``.

    ``distilled``, ``alone`` and ``teacher`` are COCO ``bbox`` results, all at the student's input.
    Without ``alone`` (no ``--with-baseline``) the gain is unknown and the note says how to measure it.
    When distillation gained no more than ``margin`` and the student alone ended above the teacher,
    the note says so (:func:`passed_teacher_hint`).
    """
    if not alone:
        return (
            "note",
            "the gain of distillation is unknown: the student trained alone was not measured. Run again "
            "with --with-baseline (DISTILL.WITH_BASELINE True) to train it side by side on the same "
            "batches, or train it with `tbd train` on the same data and schedule; a teacher's AP says "
            "nothing about it (docs/BENCHMARKS.md §1b: an ImageNet-initialised student lost 13.7 AP)",
        )
    d, a = ap_of({"bbox": distilled}), ap_of({"bbox": alone})
    if d is None or a is None:
        return "note", "the gain of distillation cannot be measured here: a student detected nothing (AP NaN)"
    gain = d - a
    hint = passed_teacher_hint(a, ap_of({"bbox": teacher})) if gain <= margin else ""
    if is_behind(d, a, margin):
        return (
            "warning",
            f"distillation cost the student {-gain:.1f} AP ({d:.1f} distilled vs {a:.1f} trained alone, "
            f"margin {margin:g}): the distillation terms fight its own task. Use a stronger teacher, "
            f"smaller distillation weights, DISTILL.GATE, or the student trained alone{hint}",
        )
    verdict = "gained" if gain > margin else "within the margin of"
    return (
        "note",
        f"distillation {verdict} {gain:+.1f} AP over the student trained alone ({d:.1f} vs {a:.1f}){hint}",
    )


def passed_teacher_hint(alone_ap: float, teacher_ap: float | None) -> str:
    """A sentence for the end-of-run note when the student trained alone ended above the teacher's AP
    at the student's input ("" otherwise): such a teacher was measured to be worth about nothing at
    the end of a schedule (docs/BENCHMARKS.md §1j, §1k)."""
    if teacher_ap is None or alone_ap <= teacher_ap:
        return ""
    return (
        f". The student trained alone ({alone_ap:.1f} AP) ended above the teacher at the student's input "
        f"({teacher_ap:.1f} AP): a teacher the student passes on its own was measured to give about nothing "
        "at the end of a schedule (docs/BENCHMARKS.md §1j; one ahead of it gave +0.8 AP on average at 1500 "
        "iterations and -1.3 at 3000, §1k). A lead at an earlier evaluation (metrics.json) is a gain in "
        "training time"
    )
