"""The choices of the ``DISTILL.*`` keys, shared by the config and the distillation modules.

Below every other module of :mod:`tbd.distill` (it imports none of them), so the config, the
losses, the peers and the distiller can all name the same tuples without importing each other.
"""

from __future__ import annotations

#: the loss keys the distiller adds to the student's own (``tbd`` and the peer methods): every other
#: ``loss_*`` of a distillation step is the detector's, from its own targets
DISTILL_LOSSES = ("loss_hd", "loss_tfd", "loss_mimic")
#: p_c modes (METHODS.md §1.1): how the per-location max logit becomes a probability map
PC_MODES = ("sigmoid", "softmax_max1", "spatial_softmax")
#: harmony distillation forms (METHODS.md §1.2)
HD_MODES = ("iou_guided", "plain")
#: task-decoupled feature distillation weighting (METHODS.md §1.3)
TFD_MODES = ("twg", "fixed")
#: how a feature distance is scaled (METHODS.md §1.3, docs/CONFIG.md)
FEATURE_NORMS = ("teacher_energy", "none")
#: student-feature adaptation layer phi
ADAPTERS = ("conv1x1", "identity")
#: teacher precision
TEACHER_AMP_MODES = ("", "bf16", "fp16")
#: student-aware gates of the distillation terms (METHODS.md §1.7); "none" is the paper's TBD
GATES = ("none", "harmony", "iou", "quality")
#: what happens when the distilled student falls behind the student trained alone (§1.8)
BASELINE_GUARDS = ("warn", "scale")
#: DISTILL.METHOD choices: TBD itself and the peer baselines (tbd.distill.peers)
METHODS = ("tbd", "mimic_mse", "cls_mask_mimic")
PEER_METHODS = METHODS[1:]
