"""The training hooks a distillation run needs, inserted into a trainer's hook list in one call.

In a ``DefaultTrainer`` subclass::

    def build_hooks(self):
        return insert_distill_hooks(self, super().build_hooks(), self.cfg)

Both hooks go right after Detectron2's ``EvalHook`` (before the writers, so their scalars reach
``metrics.json`` and TensorBoard with that iteration), in this order:

* :class:`~tbd.distill.baseline.BaselineHook`, when the model trains the student alone beside the
  distilled one (``DISTILL.WITH_BASELINE``);
* :class:`~tbd.distill.lead.TeacherLeadHook`, when ``DISTILL.LEAD_HD_WEIGHT`` > 0 and the run is
  evaluated periodically (``TEST.EVAL_PERIOD`` > 0, a test set): α follows the teacher's lead; it
  reuses the teacher's evaluation of the ``BaselineHook``. Without periodic evaluation the rule never
  compares, α stays ``DISTILL.HD_WEIGHT`` and the teacher is not evaluated for it.
"""

from __future__ import annotations

from typing import Any

from detectron2.config import CfgNode
from detectron2.engine import HookBase

from .baseline import BaselineHook, baseline_of, unwrap_model
from .lead import TeacherLeadHook


def insert_distill_hooks(trainer: Any, hooks: list[HookBase], cfg: CfgNode) -> list[HookBase]:
    """``hooks`` with the distillation hooks the trainer's model needs right after the ``EvalHook``;
    ``hooks`` unchanged for a model that needs none (e.g. a plain detector)."""
    from detectron2.engine.hooks import EvalHook

    extra: list[HookBase] = []
    if baseline_of(trainer.model) is not None:
        extra.append(BaselineHook(cfg, cfg.TEST.EVAL_PERIOD))
    if hasattr(unwrap_model(trainer.model), "hd_alpha") and cfg.TEST.EVAL_PERIOD > 0 and cfg.DATASETS.TEST:
        extra.append(TeacherLeadHook(cfg, cfg.TEST.EVAL_PERIOD))
    if not extra:
        return hooks
    at = next((i + 1 for i, h in enumerate(hooks) if isinstance(h, EvalHook)), len(hooks))
    return [*hooks[:at], *extra, *hooks[at:]]
