"""α that follows the teacher's lead over the distilled student (``DISTILL.LEAD_HD_WEIGHT``).

Measured on real data (docs/BENCHMARKS.md §1g): with a teacher clearly ahead of the student, a larger
harmony weight α (3) gained more on every seed than α = 1; with a teacher *behind* the student the
same α 3 threw away the gain α = 1 gave. So the weight of the harmony term is chosen from the one
comparison that separates the two cases, at every periodic evaluation of the distilled student:

    α = LEAD_HD_WEIGHT   if  AP(teacher) − AP(distilled student) > LEAD_MARGIN
    α = HD_WEIGHT        otherwise (also before the first evaluation, and when an AP is unknown)

The teacher is evaluated once, before the first iteration (on the same test set and input size as
the student). The rule needs no baseline: it compares the teacher with the student being taught. The
current α and the last compared iteration are buffers of the distiller, so checkpoints hold them and a
resumed run continues with the α it had (:class:`TeacherLeadHook` redoes a comparison that a
checkpoint written just before its evaluation does not know about).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

from .baseline import (
    evaluate_model,
    evaluate_teacher,
    is_periodic_evaluation,
    measured_ap,
    missed_evaluation,
    unwrap_model,
)

logger = logging.getLogger(__name__)


def lead_alpha(
    teacher_ap: float | None, student_ap: float | None, hd_weight: float, lead_hd_weight: float, margin: float
) -> float:
    """α for the next iterations: ``lead_hd_weight`` when the teacher's AP exceeds the distilled
    student's by more than ``margin`` AP points, ``hd_weight`` otherwise (or when either AP is unknown,
    or the rule is off: ``lead_hd_weight`` <= 0)."""
    if lead_hd_weight <= 0 or teacher_ap is None or student_ap is None:
        return hd_weight
    return lead_hd_weight if teacher_ap - student_ap > margin else hd_weight


#: comparisons per run that ``tbd distill`` schedules for the rule when the run would otherwise be
#: evaluated only at the end and the user chose no evaluation period
RULE_EVALUATIONS = 4


def rule_eval_period(cfg: CfgNode) -> int | None:
    """The ``TEST.EVAL_PERIOD`` that lets the rule compare ``RULE_EVALUATIONS`` times in the run, when
    it is on (``LEAD_HD_WEIGHT`` > 0 with HD on and ``METHOD`` tbd) and the run has no periodic
    evaluation; ``None`` when nothing is to change (the caller keeps a period the user chose, 0 included)."""
    d = cfg.DISTILL
    if d.LEAD_HD_WEIGHT <= 0 or d.HD_WEIGHT <= 0 or d.METHOD != "tbd" or cfg.TEST.EVAL_PERIOD > 0:
        return None
    period = int(cfg.SOLVER.MAX_ITER) // RULE_EVALUATIONS
    return period if period > 0 else None


def _teacher_ap(buffer: torch.Tensor) -> float | None:
    value = float(buffer)
    return None if value < 0 else value


class TeacherLeadHook(HookBase):
    """Set the distiller's α from the teacher's lead at every periodic evaluation of the student.

    Place it after Detectron2's ``EvalHook`` (and after a ``BaselineHook``, which shares the
    teacher's evaluation): it reads the distilled student's results of that iteration from
    ``trainer._last_eval_results``. The choice is logged as the scalar ``tbd/hd_weight``.
    """

    def __init__(self, cfg: CfgNode, eval_period: int) -> None:
        self.cfg = cfg
        self._period = int(eval_period)
        self.hd_weight = float(cfg.DISTILL.HD_WEIGHT)
        self.lead_hd_weight = float(cfg.DISTILL.LEAD_HD_WEIGHT)
        self.margin = float(cfg.DISTILL.LEAD_MARGIN)

    def _distiller(self) -> nn.Module:
        return unwrap_model(self.trainer.model)

    def before_train(self) -> None:
        distiller = self._distiller()
        if _teacher_ap(distiller.lead_ap) is None:  # a fresh run, unless the BaselineHook measured it
            evaluate_teacher(self.trainer, self.cfg, distiller, log=self.trainer.start_iter == 0)
        start = self.trainer.start_iter
        if missed_evaluation(start, self._period, int(distiller.lead_checked_iter)):
            self._decide(start - 1, evaluate_model(self.trainer, self.cfg, distiller))

    def _decide(self, iteration: int, student_results: Any) -> None:
        distiller = self._distiller()
        teacher_ap = _teacher_ap(distiller.lead_ap)
        student_ap = comm.all_gather(measured_ap(student_results))[0]  # the main process evaluated
        alpha = lead_alpha(teacher_ap, student_ap, self.hd_weight, self.lead_hd_weight, self.margin)
        previous = float(distiller.hd_alpha)
        distiller.hd_alpha.fill_(alpha)
        distiller.lead_checked_iter.fill_(iteration)
        if self.trainer.storage is not None:
            self.trainer.storage.put_scalar("tbd/hd_weight", alpha, smoothing_hint=False)
        if alpha != previous and comm.is_main_process():
            logger.info(lead_message(iteration, teacher_ap, student_ap, previous, alpha, self.margin))

    def after_step(self) -> None:
        if is_periodic_evaluation(self.trainer.iter + 1, self._period, self.trainer.max_iter):
            self._decide(self.trainer.iter, getattr(self.trainer, "_last_eval_results", None) or {})


def lead_message(
    iteration: int,
    teacher_ap: float | None,
    student_ap: float | None,
    before: float,
    after: float,
    margin: float,
) -> str:
    t = "?" if teacher_ap is None else f"{teacher_ap:.1f}"
    s = "?" if student_ap is None else f"{student_ap:.1f}"
    why = "leads" if after > before else "no longer leads"
    return (
        f"iteration {iteration + 1}: the teacher ({t} AP) {why} the distilled student ({s} AP) by more "
        f"than {margin:g} AP: DISTILL.HD_WEIGHT (alpha) {before:g} -> {after:g} (DISTILL.LEAD_HD_WEIGHT)"
    )
