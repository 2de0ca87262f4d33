"""How the distillation terms' weight changes over the schedule (``DISTILL.WEIGHT_SCHEDULE``).

``constant`` is the paper's TBD: alpha and beta hold for the whole run. The others multiply every
distillation term (HD, TFD, a peer's mimic loss) by ``m(t)`` at iteration ``t``:

- ``lr_steps``: ``m = SOLVER.GAMMA ** k`` with ``k`` the learning-rate steps passed (``SOLVER.STEPS``):
  the distillation share falls with each learning-rate drop, so the low-learning-rate end of the
  schedule, where the student settles its own boxes and scores, is driven by its detection loss;
- ``cosine``: ``m = (1 + cos(pi * t / SOLVER.MAX_ITER)) / 2``, from 1 to 0 over the run.

Why (docs/METHODS.md, "Why a strong teacher can hurt"): with an ImageNet-initialised student the
distilled student led its baseline until the first learning-rate drop and fell behind after it.
No state: ``m`` is a function of the iteration, so a resumed run continues it exactly.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

WEIGHT_SCHEDULES = ("constant", "lr_steps", "cosine")


def weight_multiplier(
    schedule: str, iteration: int, max_iter: int, steps: Sequence[int] = (), gamma: float = 0.1
) -> float:
    """``m(t)`` of ``schedule`` at ``iteration`` (0-based, as Detectron2's ``EventStorage.iter``)."""
    if schedule == "constant":
        return 1.0
    if schedule == "lr_steps":
        # WarmupMultiStepLR: the rate is multiplied by gamma from iteration `step` on
        return float(gamma) ** bisect.bisect_right(sorted(steps), iteration)
    if schedule == "cosine":
        t = min(max(iteration, 0), max_iter) / max(max_iter, 1)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown DISTILL.WEIGHT_SCHEDULE {schedule!r}; expected one of {WEIGHT_SCHEDULES}")
