"""``DISTILL.*``: every key of Task-Balanced Distillation, with its documented default.

See ``docs/CONFIG.md`` for the reasoning behind each default.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN

# the choices live in .keys (below the losses and peers, which name them too); imported here
# under their old names, tbd.distill.config.PC_MODES etc.
from .keys import (  # noqa: F401
    ADAPTERS,
    BASELINE_GUARDS,
    FEATURE_NORMS,
    GATES,
    HD_MODES,
    METHODS,
    PC_MODES,
    TEACHER_AMP_MODES,
    TFD_MODES,
)
from .schedule import WEIGHT_SCHEDULES

#: beta for a student that starts from pretrained (ImageNet) weights in Detectron2's own setting
#: (FrozenBN, frozen stem, SGD: the coco/custom profiles and a user's train_net.py): DISTILL.TFD_WEIGHT's
#: default (measured on real data: docs/BENCHMARKS.md §1f; 0.1 cost AP there)
PRETRAINED_TFD_WEIGHT = 0.01
#: beta for a pretrained student on tbd's embedded profile (trainable BatchNorm, AdamW), set by tbd
#: distill when the key is untouched (measured: docs/BENCHMARKS.md §1d-§1e)
EMBEDDED_PRETRAINED_TFD_WEIGHT = 0.1
#: beta for a student from scratch (MODEL.WEIGHTS empty), set by tbd distill when the key is untouched
SCRATCH_TFD_WEIGHT = 0.4
#: alpha while the teacher leads the distilled student, for a pretrained student in Detectron2's setting:
#: DISTILL.LEAD_HD_WEIGHT's default (measured on real data: docs/BENCHMARKS.md §1h; with a teacher
#: behind the student it never applies, so that teacher's gain is kept to the last digit)
PRETRAINED_LEAD_HD_WEIGHT = 3.0
#: DISTILL.LEAD_HD_WEIGHT that turns the teacher-lead rule off (alpha stays HD_WEIGHT), set by tbd
#: distill when the key is untouched on the embedded profile (measured there: it hurt, docs/BENCHMARKS.md
#: §1i: an early evaluation finds every teacher ahead of a student that will pass it) and for students
#: from scratch (not measured)
LEAD_RULE_OFF = 0.0
#: DISTILL.GATE's default: the paper's ungated TBD, measured with PRETRAINED_TFD_WEIGHT on real data
#: (docs/BENCHMARKS.md §1f) and for students from scratch (§1)
DEFAULT_GATE = "none"
#: gate for a pretrained student on the embedded profile, set by tbd distill when the key is untouched
#: (measured: docs/BENCHMARKS.md §1e: it turned a weaker teacher's losses there into gains)
EMBEDDED_PRETRAINED_GATE = "harmony"


def student_tfd_weight(cfg: CN) -> None:
    """β measured for the student's setting, where ``DISTILL.TFD_WEIGHT`` still holds its default
    (:data:`PRETRAINED_TFD_WEIGHT`): :data:`SCRATCH_TFD_WEIGHT` for a student from scratch
    (``MODEL.WEIGHTS`` empty), :data:`EMBEDDED_PRETRAINED_TFD_WEIGHT` for a pretrained one on the
    embedded profile (``TBD.PROFILE``). A value set by the user is kept."""
    if cfg.DISTILL.TFD_WEIGHT != PRETRAINED_TFD_WEIGHT:
        return
    if not cfg.MODEL.WEIGHTS:
        cfg.DISTILL.TFD_WEIGHT = SCRATCH_TFD_WEIGHT
    elif _profile(cfg) == "embedded":
        cfg.DISTILL.TFD_WEIGHT = EMBEDDED_PRETRAINED_TFD_WEIGHT


def student_defaults(cfg: CN) -> None:
    """The settings measured for the student's setting, where a key still holds its default: β
    (:func:`student_tfd_weight`); for a pretrained student on the embedded profile, the gate
    (:data:`EMBEDDED_PRETRAINED_GATE`); the teacher-lead rule only where it was measured (a
    pretrained student in Detectron2's setting; off (:data:`LEAD_RULE_OFF`) elsewhere). A value
    set by the user is kept (apply the user's overrides after this)."""
    student_tfd_weight(cfg)
    embedded = _profile(cfg) == "embedded"
    if cfg.MODEL.WEIGHTS and embedded and cfg.DISTILL.GATE == DEFAULT_GATE:
        cfg.DISTILL.GATE = EMBEDDED_PRETRAINED_GATE
    if (not cfg.MODEL.WEIGHTS or embedded) and cfg.DISTILL.LEAD_HD_WEIGHT == PRETRAINED_LEAD_HD_WEIGHT:
        cfg.DISTILL.LEAD_HD_WEIGHT = LEAD_RULE_OFF


def _profile(cfg: CN) -> str:
    """``TBD.PROFILE`` (set by tbd's commands; empty in a user's own config)."""
    return str(cfg.TBD.get("PROFILE", "")) if "TBD" in cfg else ""


def add_tbd_config(cfg: CN) -> None:
    """Add the ``DISTILL`` node to ``cfg`` (idempotent: an existing node is left untouched)."""
    if "DISTILL" in cfg:
        return
    d = cfg.DISTILL = CN()
    # --- the pair -------------------------------------------------------------------------------
    # Meta-architecture of the student when MODEL.META_ARCHITECTURE is "TBDistiller"; the student
    # is built from this same config with MODEL.META_ARCHITECTURE replaced by this name.
    d.STUDENT_META_ARCHITECTURE = ""
    # Teacher: a YAML config (path, or a name under configs/) and a checkpoint loaded with
    # Detectron2's DetectionCheckpointer. Empty weights leave the teacher randomly initialised
    # (a warning is logged: only useful for tests).
    d.TEACHER_CONFIG = ""
    d.TEACHER_WEIGHTS = ""
    # Extra "KEY VALUE" overrides applied to the teacher config after TEACHER_CONFIG.
    d.TEACHER_OPTS = []
    # Teacher forward precision: "" (float32), "bf16" or "fp16" (torch.autocast).
    d.TEACHER_AMP = ""
    # Refuse pairs whose class counts differ (the RPN of a two-stage teacher is compared through
    # its ROI_HEADS.NUM_CLASSES). Set False only if both label spaces are known to be aligned.
    d.CHECK_NUM_CLASSES = True
    # FPN strides distilled; empty = every stride both models have (others skipped, one warning).
    d.STRIDES = []
    # Which distillation: "tbd" (HD + TFD), or a peer baseline (tbd.distill.peers):
    # "mimic_mse" (plain FPN mimicking) or "cls_mask_mimic" (teacher-p_c-masked mimicking, the
    # paper's eq. 1). Peers return ``loss_mimic = MIMIC_WEIGHT * L`` and no HD/TFD.
    d.METHOD = "tbd"
    # Weight of a peer's loss: SCRATCH_TFD_WEIGHT, beta of the from-scratch students the peers were
    # measured with (docs/BENCHMARKS.md §1); compare a pretrained student's peers at its own beta.
    d.MIMIC_WEIGHT = 0.4
    # --- losses ---------------------------------------------------------------------------------
    d.HD_WEIGHT = 1.0  # alpha
    # alpha while the teacher leads: at every periodic evaluation (TEST.EVAL_PERIOD) alpha becomes
    # LEAD_HD_WEIGHT when the teacher's AP (evaluated once, at the start) exceeds the distilled
    # student's by more than LEAD_MARGIN AP points, and HD_WEIGHT otherwise (tbd/distill/lead.py,
    # METHODS.md §1.10). 0 = off (alpha stays HD_WEIGHT). The default is the one measured for a
    # pretrained student in Detectron2's setting; tbd distill switches it off where it was not
    # measured (embedded profile, students from scratch: student_defaults).
    d.LEAD_HD_WEIGHT = PRETRAINED_LEAD_HD_WEIGHT
    d.LEAD_MARGIN = 1.0
    # beta, for a pretrained (ImageNet) student in Detectron2's setting (FrozenBN, SGD), what real
    # users have; tbd distill sets SCRATCH_TFD_WEIGHT for a student from scratch and
    # EMBEDDED_PRETRAINED_TFD_WEIGHT for a pretrained one on the embedded profile (measured:
    # docs/CONFIG.md "How alpha and beta were chosen", docs/BENCHMARKS.md §1f)
    d.TFD_WEIGHT = PRETRAINED_TFD_WEIGHT
    # Scale of every feature distance (TFD and the peers): "teacher_energy" divides it by the
    # teacher's mean feature energy on that level and image (a relative error, so beta does not
    # depend on the teacher's feature scale); "none" is the notes' raw squared distance.
    d.FEATURE_NORM = "teacher_energy"
    d.HD_MODE = "iou_guided"
    d.PC_MODE = "sigmoid"
    d.TFD_MODE = "twg"
    # Fixed task weights omega_c, omega_r (TFD_MODE "fixed"); they sum to 1 like TWG's output.
    d.TFD_CLS_WEIGHT = 0.5
    d.TFD_REG_WEIGHT = 0.5
    # Student-feature adaptation phi, one per distilled level: "conv1x1" or "identity" (the
    # latter needs equal channel counts).
    d.ADAPTER = "conv1x1"
    # --- task-collaborative weight generation ---------------------------------------------------
    d.TWG = CN()
    d.TWG.HIDDEN_DIM = 16
    # Floor on each task weight: T = m + (1 - 2m) * softmax(...). Trained only by L_TFD, the
    # softmax drifts towards the smaller term; the floor keeps both tasks in the loss.
    d.TWG.MIN_WEIGHT = 0.1
    # The probability maps fed to TWG are detached (TWG is a weighting, not a path for gradient
    # into the student's heads).
    d.TWG.DETACH_INPUTS = True
    # --- student-aware gating (METHODS.md §1.7) ---------------------------------------------------
    # A detached per-location weight g in [0, 1] on every distillation term (HD, TFD, the peers):
    # "none" (g = 1: the paper's TBD), "harmony" (g = clamp((HS^t - HS^s + m) / 2m, 0, 1): distil
    # where the teacher is more harmonious than the student), "iou" (the same ramp on p_r^t - p_r^s:
    # where the teacher's boxes fit the ground truth better), "quality" (the ramp on q^t - q^s with
    # q = sqrt(p_c p_r): where the teacher's prediction is both better scored and better placed).
    # "none" is the default (measured with the default beta on real data: BENCHMARKS.md §1f); tbd
    # distill sets EMBEDDED_PRETRAINED_GATE ("harmony") for a pretrained student on the embedded
    # profile when the key is untouched (student_defaults; measured: BENCHMARKS.md §1e).
    d.GATE = DEFAULT_GATE
    d.GATE_MARGIN = 0.05  # m: half-width of the ramp (m -> 0: a hard step at equality)
    # --- the student trained alone, side by side (METHODS.md §1.8) ------------------------------
    # Train a second copy of the student without distillation on the same batches, from the same
    # initial weights, with the same schedule; its losses are logged under "baseline/", its AP and
    # harmonious share at every evaluation. Costs one more student forward and backward per step.
    d.WITH_BASELINE = False
    # The distilled student is "behind" when its AP is below the student alone's by more than this
    # (AP points): a warning at that evaluation.
    d.BASELINE_MARGIN = 0.5
    # "warn", or "scale": also multiply every distillation term by BASELINE_GUARD_FACTOR each time
    # the distilled student is behind (for the rest of the run).
    d.BASELINE_GUARD = "warn"
    d.BASELINE_GUARD_FACTOR = 0.5
    # --- the distillation weight over the schedule (tbd/distill/schedule.py, docs/METHODS.md) ----
    # "constant": the paper's TBD; "lr_steps": every distillation term times SOLVER.GAMMA per
    # learning-rate step passed; "cosine": times (1 + cos(pi t / MAX_ITER)) / 2
    d.WEIGHT_SCHEDULE = "constant"


def validate_tbd_config(cfg: CN) -> None:
    """Raise ``ValueError`` naming the key when a ``DISTILL`` value is not one of its choices."""
    d = cfg.DISTILL
    for key, choices in (
        ("METHOD", METHODS),
        ("PC_MODE", PC_MODES),
        ("HD_MODE", HD_MODES),
        ("TFD_MODE", TFD_MODES),
        ("ADAPTER", ADAPTERS),
        ("FEATURE_NORM", FEATURE_NORMS),
        ("TEACHER_AMP", TEACHER_AMP_MODES),
        ("GATE", GATES),
        ("BASELINE_GUARD", BASELINE_GUARDS),
        ("WEIGHT_SCHEDULE", WEIGHT_SCHEDULES),
    ):
        if d[key] not in choices:
            raise ValueError(f"DISTILL.{key} = {d[key]!r}; expected one of {choices}")
    if not 0.0 <= d.TWG.MIN_WEIGHT < 0.5:
        raise ValueError(f"DISTILL.TWG.MIN_WEIGHT = {d.TWG.MIN_WEIGHT}; expected 0 <= m < 0.5")
    if d.HD_WEIGHT < 0 or d.TFD_WEIGHT < 0 or d.MIMIC_WEIGHT < 0:
        raise ValueError(
            "DISTILL.HD_WEIGHT, DISTILL.TFD_WEIGHT and DISTILL.MIMIC_WEIGHT must be non-negative"
        )
    if d.LEAD_HD_WEIGHT < 0 or d.LEAD_MARGIN < 0:
        raise ValueError(
            f"DISTILL.LEAD_HD_WEIGHT = {d.LEAD_HD_WEIGHT}, DISTILL.LEAD_MARGIN = {d.LEAD_MARGIN}: both must "
            "be non-negative (LEAD_HD_WEIGHT 0 switches the teacher-lead rule off)"
        )
    if d.GATE_MARGIN < 0:
        raise ValueError(f"DISTILL.GATE_MARGIN = {d.GATE_MARGIN}; expected m >= 0")
    if d.BASELINE_MARGIN < 0:
        raise ValueError(f"DISTILL.BASELINE_MARGIN = {d.BASELINE_MARGIN}; expected AP points >= 0")
    if not 0.0 <= d.BASELINE_GUARD_FACTOR < 1.0:
        raise ValueError(
            f"DISTILL.BASELINE_GUARD_FACTOR = {d.BASELINE_GUARD_FACTOR}; expected 0 <= factor < 1 "
            "(the distillation terms are multiplied by it each time the guard fires)"
        )
    if d.BASELINE_GUARD == "scale" and not d.WITH_BASELINE:
        raise ValueError(
            "DISTILL.BASELINE_GUARD 'scale' compares with the student trained alone: set "
            "DISTILL.WITH_BASELINE True (tbd distill --with-baseline)"
        )
