"""``TBDistiller``: a Detectron2 meta-architecture that trains a student with Task-Balanced Distillation.

Training forward: the student's own loss dict (its ordinary forward, probed by a hook) plus
``loss_hd = alpha * L_HD`` and ``loss_tfd = beta * L_TFD``. Eval forward: the student's.
The teacher is frozen, in eval mode, run under ``no_grad`` only as far as its dense head, and is
not a registered sub-module: it is absent from ``parameters()`` and ``state_dict()``.

With ``DISTILL.WITH_BASELINE`` a second copy of the student, ``baseline``, trains without
distillation on the same batches (its losses come back under ``baseline/``); see
:mod:`tbd.distill.baseline` and METHODS.md §1.8.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Sequence

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from tbd.config_keys import teacher_config  # noqa: F401  (also tbd.distill.distiller.teacher_config)
from tbd.ops.boxes import pad_boxes

from .adapters import FeatureAdapters
from .baseline import BASELINE_PREFIX, RngSnapshot, unwrap_model
from .config import validate_tbd_config
from .gate import level_gates, mean_gate
from .keys import FEATURE_NORMS, GATES, METHODS
from .losses import TaskMaps, feature_distance, harmony_distillation_loss, teacher_energy, tfd_loss
from .peers import peer_loss
from .probes import LevelPrediction, Probe, get_probe_adapter
from .schedule import WEIGHT_SCHEDULES, weight_multiplier
from .task_probs import classification_probability, regression_probability
from .twg import TaskWeightGenerator

logger = logging.getLogger(__name__)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_SWAPPABLE_FORMATS = {"BGR", "RGB"}


def _model_input_format(model: nn.Module) -> str | None:
    fmt = getattr(model, "input_format", None)
    return str(fmt) if fmt else None


@META_ARCH_REGISTRY.register()
class TBDistiller(nn.Module):
    """Teacher -> student Task-Balanced Distillation around any two probed Detectron2 detectors.

    Args:
        teacher, student: Detectron2 models with a registered probe adapter (RetinaNet, FCOS,
            GeneralizedRCNN, ...). The teacher is frozen here.
        hd_weight, tfd_weight: alpha and beta.
        lead_hd_weight: alpha while the teacher leads the student by more than ``DISTILL.LEAD_MARGIN``
            AP at an evaluation (:mod:`tbd.distill.lead`); 0: alpha stays ``hd_weight``.
        hd_mode: ``"iou_guided"`` or ``"plain"``; pc_mode: see
            :func:`tbd.distill.task_probs.classification_probability`.
        tfd_mode: ``"twg"`` (learned task weights) or ``"fixed"`` (``tfd_cls_weight``,
            ``tfd_reg_weight``).
        adapter: ``"conv1x1"`` or ``"identity"`` (phi on the student's FPN features). With
            ``tfd_weight`` 0 (the HD-only ablation) neither the adapters nor TWG are built.
        strides: FPN strides to distill; empty: every stride both models have.
        teacher_amp: ``""``, ``"bf16"`` or ``"fp16"``.
        teacher_input_format, student_input_format: ``"BGR"``/``"RGB"``; when they differ the
            channels are flipped for the teacher. Default: the models' ``input_format``.
        check_num_classes: refuse pairs with different class counts.
        method: ``"tbd"`` (HD + TFD) or a peer baseline of :mod:`tbd.distill.peers`
            (``"mimic_mse"``, ``"cls_mask_mimic"``), which returns ``loss_mimic`` instead.
        mimic_weight: the weight of a peer's loss.
        feature_norm: ``"teacher_energy"`` (feature distances relative to the teacher's feature
            energy per level and image) or ``"none"`` (raw squared distances).
        gate, gate_margin: the student-aware gate of every distillation term
            (:mod:`tbd.distill.gate`; ``"none"``: the paper's TBD).
        with_baseline: keep ``baseline``, a copy of the student trained without distillation on the
            same batches (:mod:`tbd.distill.baseline`).
    """

    @configurable
    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        hd_weight: float = 1.0,
        lead_hd_weight: float = 0.0,
        tfd_weight: float = 0.4,
        hd_mode: str = "iou_guided",
        pc_mode: str = "sigmoid",
        tfd_mode: str = "twg",
        tfd_cls_weight: float = 0.5,
        tfd_reg_weight: float = 0.5,
        adapter: str = "conv1x1",
        twg_hidden_dim: int = 16,
        twg_min_weight: float = 0.1,
        twg_detach_inputs: bool = True,
        strides: Sequence[int] = (),
        teacher_amp: str = "",
        teacher_input_format: str | None = None,
        student_input_format: str | None = None,
        check_num_classes: bool = True,
        method: str = "tbd",
        mimic_weight: float = 0.4,
        feature_norm: str = "teacher_energy",
        gate: str = "none",
        gate_margin: float = 0.05,
        with_baseline: bool = False,
        weight_schedule: str = "constant",
        max_iter: int = 0,
        lr_steps: Sequence[int] = (),
        lr_gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(student, TBDistiller) or isinstance(teacher, TBDistiller):
            raise TypeError("TBDistiller cannot wrap another TBDistiller")
        self.student = student
        teacher.eval()
        teacher.requires_grad_(False)
        # Reason: held outside nn.Module's registry so that parameters(), state_dict(), the
        # optimizer and DDP never see it; _apply() still moves it with the distiller.
        object.__setattr__(self, "_teacher", teacher)

        self.teacher_adapter = get_probe_adapter(teacher)
        self.student_adapter = get_probe_adapter(student)
        self._check_classes(check_num_classes)
        self._flip_teacher_channels = self._resolve_formats(
            teacher_input_format or _model_input_format(teacher),
            student_input_format or _model_input_format(student),
        )
        self.strides = self._match_strides(strides)

        if method not in METHODS:
            raise ValueError(f"unknown distillation method {method!r}; expected one of {METHODS}")
        self.method = method
        # Reason: a parameter no loss uses never gets a gradient, which DistributedDataParallel
        # (find_unused_parameters=False) refuses at the second step; so with the feature term off
        # (TFD_WEIGHT 0, the HD-only ablation) there are no adapters and no TWG.
        uses_features = method != "tbd" or tfd_weight > 0
        t_ch = dict(zip(self.teacher_adapter.strides(teacher), self.teacher_adapter.channels(teacher)))
        s_ch = dict(zip(self.student_adapter.strides(student), self.student_adapter.channels(student)))
        feature_strides = self.strides if uses_features else []
        self.adapters = FeatureAdapters(
            {s: s_ch[s] for s in feature_strides}, {s: t_ch[s] for s in feature_strides}, kind=adapter
        )
        self.mimic_weight = float(mimic_weight)
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(
                f"unknown feature normalisation {feature_norm!r}; expected one of {FEATURE_NORMS}"
            )
        self.feature_norm = feature_norm
        # a peer baseline has no TWG either (no parameter that never gets a gradient)
        self.twg = (
            TaskWeightGenerator(twg_hidden_dim, twg_min_weight, twg_detach_inputs)
            if tfd_mode == "twg" and method == "tbd" and uses_features
            else None
        )
        if tfd_mode not in ("twg", "fixed"):
            raise ValueError(f"unknown TFD mode {tfd_mode!r}; expected 'twg' or 'fixed'")
        self.register_buffer(
            "fixed_task_weights", torch.tensor([tfd_cls_weight, tfd_reg_weight], dtype=torch.float32), False
        )
        self.hd_weight = float(hd_weight)
        if lead_hd_weight < 0:
            raise ValueError(f"the lead harmony weight must be non-negative, got {lead_hd_weight}")
        # nothing for the rule to weight with a peer method (no harmony term) or with HD switched off
        # (HD_WEIGHT 0, the TFD-only ablation: the rule does not switch it back on)
        self.lead_hd_weight = float(lead_hd_weight) if method == "tbd" and hd_weight > 0 else 0.0
        if self.lead_hd_weight > 0:
            # DISTILL.LEAD_HD_WEIGHT (tbd/distill/lead.py): the alpha in use, set by TeacherLeadHook at
            # each evaluation, the teacher's AP it compares with, and the last iteration compared;
            # checkpointed, so a resumed run keeps them
            self.register_buffer("hd_alpha", torch.tensor(self.hd_weight, dtype=torch.float32))
            self.register_buffer("lead_ap", torch.tensor(-1.0, dtype=torch.float32))  # -1: not yet
            self.register_buffer("lead_checked_iter", torch.tensor(-1, dtype=torch.int64))
        self.tfd_weight = float(tfd_weight)
        self.hd_mode = hd_mode
        self.pc_mode = pc_mode
        if teacher_amp not in ("", *_AMP_DTYPES):
            raise ValueError(f"unknown teacher precision {teacher_amp!r}; expected '', 'bf16' or 'fp16'")
        self.teacher_amp = teacher_amp
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")
        if gate_margin < 0:
            raise ValueError(f"the gate margin must be non-negative, got {gate_margin}")
        self.gate = gate
        self.gate_margin = float(gate_margin)
        if weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(
                f"unknown weight schedule {weight_schedule!r}; expected one of {WEIGHT_SCHEDULES}"
            )
        if weight_schedule != "constant" and max_iter <= 0:
            raise ValueError(f"the weight schedule {weight_schedule!r} needs max_iter > 0 (SOLVER.MAX_ITER)")
        self.weight_schedule = weight_schedule
        self.max_iter = int(max_iter)
        self.lr_steps = tuple(int(s) for s in lr_steps)
        self.lr_gamma = float(lr_gamma)
        # Reason: a copy of the student made before its probe hook exists, so the copy has none
        self.baseline: nn.Module | None = copy.deepcopy(student) if with_baseline else None
        if with_baseline:
            # multiplies every distillation term; lowered by the guard (BASELINE_GUARD "scale"),
            # checkpointed so a resumed run keeps it
            self.register_buffer("distill_scale", torch.ones((), dtype=torch.float32))
            # the last iteration whose evaluation the guard compared (exact resume of the guard)
            self.register_buffer("guard_checked_iter", torch.tensor(-1, dtype=torch.int64))
        self._probe = Probe(student, self.student_adapter)
        self._loaded_baseline = False
        self.register_load_state_dict_pre_hook(_accept_plain_student_checkpoint)
        self.register_load_state_dict_post_hook(_sync_baseline_after_load)

    # ------------------------------------------------------------------ construction from cfg
    @classmethod
    def from_config(
        cls, cfg: CfgNode, student: nn.Module | None = None, teacher: nn.Module | None = None
    ) -> dict[str, Any]:
        validate_tbd_config(cfg)
        d = cfg.DISTILL
        # the student first: its random parts (FPN, head) then depend on the seed and its own config
        # only, so it starts as `tbd train` of the same student and seed would, whatever the teacher
        if student is None:
            student = build_student(cfg)
        if teacher is None:
            teacher, teacher_format = build_teacher(cfg)
        else:
            teacher_format = _model_input_format(teacher)
        return {
            "teacher": teacher,
            "student": student,
            "hd_weight": d.HD_WEIGHT,
            "lead_hd_weight": d.LEAD_HD_WEIGHT,
            "tfd_weight": d.TFD_WEIGHT,
            "hd_mode": d.HD_MODE,
            "pc_mode": d.PC_MODE,
            "tfd_mode": d.TFD_MODE,
            "tfd_cls_weight": d.TFD_CLS_WEIGHT,
            "tfd_reg_weight": d.TFD_REG_WEIGHT,
            "adapter": d.ADAPTER,
            "twg_hidden_dim": d.TWG.HIDDEN_DIM,
            "twg_min_weight": d.TWG.MIN_WEIGHT,
            "twg_detach_inputs": d.TWG.DETACH_INPUTS,
            "strides": list(d.STRIDES),
            "teacher_amp": d.TEACHER_AMP,
            "teacher_input_format": teacher_format,
            "student_input_format": cfg.INPUT.FORMAT,
            "check_num_classes": d.CHECK_NUM_CLASSES,
            "method": d.METHOD,
            "mimic_weight": d.MIMIC_WEIGHT,
            "feature_norm": d.FEATURE_NORM,
            "gate": d.GATE,
            "gate_margin": d.GATE_MARGIN,
            "with_baseline": d.WITH_BASELINE,
            "weight_schedule": d.WEIGHT_SCHEDULE,
            "max_iter": cfg.SOLVER.MAX_ITER,
            "lr_steps": list(cfg.SOLVER.STEPS),
            "lr_gamma": cfg.SOLVER.GAMMA,
        }

    @classmethod
    def from_student(cls, cfg: CfgNode, student: nn.Module) -> TBDistiller:
        """Wrap an already built student (e.g. in ``DefaultTrainer.build_model``); teacher from ``cfg``."""
        model = cls(cfg, student=student)
        return model.to(student.device)

    # ------------------------------------------------------------------ checks
    def _check_classes(self, enabled: bool) -> None:
        n_t = self.teacher_adapter.num_classes(self._teacher)
        n_s = self.student_adapter.num_classes(self.student)
        if enabled and n_t is not None and n_s is not None and n_t != n_s:
            raise ValueError(
                f"teacher has {n_t} classes, student {n_s}: TBD needs one label space. Retrain the "
                "teacher on the student's classes, or set DISTILL.CHECK_NUM_CLASSES False if the "
                "label spaces are known to be aligned."
            )

    @staticmethod
    def _resolve_formats(teacher_fmt: str | None, student_fmt: str | None) -> bool:
        if teacher_fmt is None or student_fmt is None or teacher_fmt == student_fmt:
            return False
        if {teacher_fmt, student_fmt} <= _SWAPPABLE_FORMATS:
            logger.info(
                "TBD: teacher expects %s, student data is %s: flipping channels", teacher_fmt, student_fmt
            )
            return True
        raise ValueError(
            f"teacher input format {teacher_fmt!r} and student input format {student_fmt!r} cannot be "
            "converted (only BGR <-> RGB is handled)"
        )

    def _match_strides(self, requested: Sequence[int]) -> list[int]:
        t = set(self.teacher_adapter.strides(self._teacher))
        s = set(self.student_adapter.strides(self.student))
        common = sorted(t & s)
        if not common:
            raise ValueError(f"teacher strides {sorted(t)} and student strides {sorted(s)} share no level")
        if requested:
            missing = [r for r in requested if r not in common]
            if missing:
                raise ValueError(f"DISTILL.STRIDES {missing} not present in both models (common: {common})")
            return sorted(int(r) for r in requested)
        skipped = sorted((t | s) - set(common))
        if skipped:
            logger.warning(
                "TBD: FPN strides %s exist on one side only and are not distilled (teacher %s, student %s)",
                skipped,
                sorted(t),
                sorted(s),
            )
        return common

    # ------------------------------------------------------------------ nn.Module plumbing
    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    @property
    def device(self) -> torch.device:
        return self.student.device

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> TBDistiller:
        super()._apply(fn, *args, **kwargs)
        self._teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> TBDistiller:
        super().train(mode)
        self._teacher.eval()
        return self

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's own state dict: what to export (loads into the plain student model)."""
        return self.student.state_dict()

    # ------------------------------------------------------------------ the student trained alone
    def sync_baseline(self) -> None:
        """Give the baseline the student's current weights and buffers (no-op without a baseline).

        Called after the student's initial weights are loaded (``MODEL.WEIGHTS``), so both start
        from the same point; a load of a whole distiller state dict with ``baseline.*`` keys (a
        resumed run) keeps the baseline's own.
        """
        if self.baseline is None:
            return
        self.baseline.load_state_dict(self.student.state_dict())
        for name, module in self.student.named_modules():  # running values kept as attributes
            values = {k: v for k, v in vars(module).items() if k.startswith("loss_normalizer")}
            if values:
                vars(self.baseline.get_submodule(name)).update(values)

    def rebuild_baseline(self) -> None:
        """Copy the student anew, e.g. after modules were attached to it (the auxiliary heads).

        The optimizer must be built after this (Detectron2 builds it after ``build_model``).
        """
        if self.baseline is None:
            return
        self._probe.remove()
        try:
            baseline = copy.deepcopy(self.student)
        finally:
            self._probe = Probe(self.student, self.student_adapter)
        self.baseline = baseline

    def param_lr_factors(self) -> list[tuple[nn.Parameter, float]]:
        """The LR multipliers the student names (e.g. CoDETR's backbone), for it and its baseline."""
        out: list[tuple[nn.Parameter, float]] = []
        for model in (self.student, self.baseline):
            factors = getattr(model, "param_lr_factors", None)
            if model is not None and callable(factors):
                out.extend(factors())
        return out

    def gradient_clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter sets whose gradient norms are clipped apart (``CLIP_TYPE full_model``): the
        baseline on its own, as if it trained alone; everything else together."""
        if self.baseline is None:
            return [list(self.parameters())]
        own = {id(p) for p in self.baseline.parameters()}
        return [[p for p in self.parameters() if id(p) not in own], list(self.baseline.parameters())]

    def export_student(self, path: str | os.PathLike) -> None:
        """Write a plain student checkpoint (``{"model": ...}``, DetectionCheckpointer's format).

        Under DistributedDataParallel use :func:`export_student` (the wrapper hides this method).
        """
        export_student(self, path)

    # ------------------------------------------------------------------ forward
    def forward(self, batched_inputs: list[dict[str, Any]]) -> Any:
        if not self.training:
            return self.student(batched_inputs)
        # the baseline replays the random numbers the student drew (e.g. R-CNN proposal sampling)
        rng = RngSnapshot.take(self.device) if self.baseline is not None else None
        with self._probe.capture():
            losses = self.student(batched_inputs)
        student_levels = self._probe.levels()
        teacher_levels = self.teacher_levels(batched_inputs)
        gt = [x["instances"].gt_boxes.tensor.to(self.device) for x in batched_inputs]
        gt_boxes, _, gt_mask = pad_boxes(gt)
        distill = self.distillation_losses(teacher_levels, student_levels, gt_boxes, gt_mask)
        if self.weight_schedule != "constant":
            m = self.schedule_multiplier()
            distill = {k: v * m for k, v in distill.items()}
            _put_scalars({"tbd/weight_schedule": m})
        if self.baseline is not None:
            scale = self.distill_scale
            distill = {k: v * scale.to(v.dtype) for k, v in distill.items()}
            _put_scalars({"tbd/distill_scale": float(scale)})
            assert rng is not None
            rng.restore()
            alone = self.baseline(batched_inputs)
            losses.update({BASELINE_PREFIX + k: v for k, v in alone.items()})
        losses.update(distill)
        return losses

    def schedule_multiplier(self) -> float:
        """``DISTILL.WEIGHT_SCHEDULE``'s multiplier at the trainer's current iteration (1 outside one)."""
        try:
            iteration = get_event_storage().iter
        except AssertionError:  # no EventStorage: not inside a trainer
            return 1.0
        return weight_multiplier(self.weight_schedule, iteration, self.max_iter, self.lr_steps, self.lr_gamma)

    @torch.no_grad()
    def teacher_levels(self, batched_inputs: list[dict[str, Any]]) -> list[LevelPrediction]:
        """The teacher's FPN features and dense predictions: no grad, optional autocast, no NMS."""
        inputs = batched_inputs
        if self._flip_teacher_channels:
            inputs = [{**x, "image": x["image"].flip(0)} for x in batched_inputs]
        if self.teacher_amp:
            with torch.autocast(device_type=self.device.type, dtype=_AMP_DTYPES[self.teacher_amp]):
                return self.teacher_adapter.run_dense(self._teacher, inputs)
        return self.teacher_adapter.run_dense(self._teacher, inputs)

    def matched_levels(
        self, teacher_levels: Sequence[LevelPrediction], student_levels: Sequence[LevelPrediction]
    ) -> tuple[list[LevelPrediction], list[LevelPrediction]]:
        """The distilled levels of both models in ``strides`` order, cropped to their common size."""
        t_by_stride = {lv.stride: lv for lv in teacher_levels}
        s_by_stride = {lv.stride: lv for lv in student_levels}
        t_levels, s_levels = [], []
        for stride in self.strides:
            t, s = t_by_stride[stride], s_by_stride[stride]
            h, w = min(t.size[0], s.size[0]), min(t.size[1], s.size[1])
            t_levels.append(t.crop(h, w))
            s_levels.append(s.crop(h, w))
        return t_levels, s_levels

    @torch.no_grad()
    def probe_task_maps(self, batched_inputs: list[dict[str, Any]]) -> tuple[list[TaskMaps], list[TaskMaps]]:
        """The teacher's and the student's task maps per distilled level, as the training step sees
        them (the student in its current mode; no loss, no gradient): for diagnostics, e.g.
        ``scripts/gate_probe.py``."""
        with self._probe.capture():
            self.student(batched_inputs)
        student_levels = self._probe.levels()
        teacher_levels = self.teacher_levels(batched_inputs)
        gt = [x["instances"].gt_boxes.tensor.to(self.device) for x in batched_inputs]
        gt_boxes, _, gt_mask = pad_boxes(gt)
        t_levels, s_levels = self.matched_levels(teacher_levels, student_levels)
        return self.task_maps(t_levels, gt_boxes, gt_mask), self.task_maps(s_levels, gt_boxes, gt_mask)

    def task_maps(
        self, levels: Sequence[LevelPrediction], gt_boxes: Tensor, gt_mask: Tensor
    ) -> list[TaskMaps]:
        return [
            TaskMaps(
                classification_probability(lv.logits, self.pc_mode),
                regression_probability(lv.boxes, gt_boxes, gt_mask),
            )
            for lv in levels
        ]

    def distillation_losses(
        self,
        teacher_levels: Sequence[LevelPrediction],
        student_levels: Sequence[LevelPrediction],
        gt_boxes: Tensor,
        gt_mask: Tensor,
    ) -> dict[str, Tensor]:
        """``loss_hd`` and ``loss_tfd`` (weighted by alpha, beta) for probed teacher/student levels."""
        t_levels, s_levels = self.matched_levels(teacher_levels, student_levels)
        gates = None
        if self.gate != "none":
            gates = level_gates(
                self.gate,
                self.task_maps(t_levels, gt_boxes, gt_mask),
                self.task_maps(s_levels, gt_boxes, gt_mask),
                self.gate_margin,
            )
            _put_scalars({"tbd/gate_mean": mean_gate(gates or [])})
        if self.method != "tbd":
            return self.peer_losses(t_levels, s_levels, gates)
        t_maps = self.task_maps(t_levels, gt_boxes, gt_mask)
        s_maps = self.task_maps(s_levels, gt_boxes, gt_mask)
        # a term switched off (weight 0) is a constant: even a zero-valued branch of the graph would
        # change the last bits of the student's gradients (autograd's accumulation order)
        zero = s_levels[0].feature.new_zeros(())
        scalars: dict[str, float] = {}

        hd = zero
        if self.hd_weight > 0:
            hd = harmony_distillation_loss(t_maps, s_maps, self.hd_mode, gates)
            scalars["tbd/hd"] = hd.item()

        tfd = zero
        if self.tfd_weight > 0:
            distances = self.feature_distances(t_levels, s_levels)
            weights = (
                self.twg.weights_for(t_maps, s_maps) if self.twg is not None else self.fixed_task_weights
            )
            terms = tfd_loss(distances, t_maps, weights, gates)
            tfd = terms.loss
            scalars.update(
                {"tbd/tfd": tfd.item(), "tbd/tfd_cls": terms.cls.item(), "tbd/tfd_reg": terms.reg.item()}
            )
            if self.twg is not None:
                for stride, w_cls in zip(self.strides, weights[..., 0].mean(dim=0).tolist()):
                    scalars[f"tbd/twg_w_cls_s{stride}"] = w_cls
        _put_scalars(scalars)
        alpha = self.hd_alpha.to(hd.dtype) if self.lead_hd_weight > 0 else self.hd_weight
        return {"loss_hd": alpha * hd, "loss_tfd": self.tfd_weight * tfd}

    def feature_distances(
        self, t_levels: Sequence[LevelPrediction], s_levels: Sequence[LevelPrediction]
    ) -> list[Tensor]:
        """Per matched level, ``d = sum_c (F^t - phi(F^s))^2`` scaled by ``feature_norm`` (TFD and peers)."""
        if self.feature_norm != "teacher_energy":
            return [
                feature_distance(t.feature, self.adapters(s.feature, s.stride), self.feature_norm)
                for t, s in zip(t_levels, s_levels)
            ]
        energies = [teacher_energy(t.feature) for t in t_levels]
        max_energy = torch.stack(energies).amax(dim=0)
        return [
            feature_distance(t.feature, self.adapters(s.feature, s.stride), self.feature_norm, max_energy, e)
            for t, s, e in zip(t_levels, s_levels, energies)
        ]

    def peer_losses(
        self,
        t_levels: Sequence[LevelPrediction],
        s_levels: Sequence[LevelPrediction],
        gates: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """``loss_mimic`` of a peer baseline (``DISTILL.METHOD``) on already matched, cropped levels."""
        distances = self.feature_distances(t_levels, s_levels)
        teacher_pc = None
        if self.method == "cls_mask_mimic":
            teacher_pc = [classification_probability(t.logits, self.pc_mode) for t in t_levels]
        loss = peer_loss(self.method, distances, teacher_pc, gates)
        _put_scalars({f"tbd/{self.method}": loss.item()})
        return {"loss_mimic": self.mimic_weight * loss}


def _put_scalars(scalars: dict[str, float]) -> None:
    if not scalars:
        return
    try:
        storage = get_event_storage()
    except AssertionError:  # no EventStorage active (e.g. a bare forward in a test)
        return
    storage.put_scalars(**scalars, smoothing_hint=True)


def _accept_plain_student_checkpoint(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: a checkpoint without ``student.`` keys is a plain student one.

    Also notes whether the state holds the baseline's own tensors (a resumed run's checkpoint).
    """
    module._loaded_baseline = any(k.startswith(prefix + "baseline.") for k in state_dict)
    own = prefix + "student."
    if any(k.startswith(own) for k in state_dict):
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[own + key[len(prefix) :]] = state_dict.pop(key)


def _sync_baseline_after_load(module: nn.Module, incompatible: Any) -> None:
    """Load-state-dict post-hook: a state without ``baseline.*`` keys loaded the student's initial
    weights; the baseline starts from the same ones."""
    if not module._loaded_baseline:
        module.sync_baseline()


# ---------------------------------------------------------------------- building from a config
def build_student(cfg: CfgNode) -> nn.Module:
    """The student: ``cfg`` with ``MODEL.META_ARCHITECTURE = DISTILL.STUDENT_META_ARCHITECTURE``."""
    name = cfg.DISTILL.STUDENT_META_ARCHITECTURE
    if not name or name == "TBDistiller":
        raise ValueError(
            "MODEL.META_ARCHITECTURE is 'TBDistiller': set DISTILL.STUDENT_META_ARCHITECTURE to the "
            "student's meta-architecture (e.g. 'RetinaNet')"
        )
    student_cfg = cfg.clone()
    student_cfg.defrost()
    student_cfg.MODEL.META_ARCHITECTURE = name
    model = META_ARCH_REGISTRY.get(name)(student_cfg)
    return model.to(torch.device(cfg.MODEL.DEVICE))


def load_teacher_weights(teacher: nn.Module, weights: str) -> None:
    """Load a teacher checkpoint (local file or URL) and refuse one that does not fit the model."""
    from tbd.engine.checkpoint import load_weights_checked

    is_url = "://" in weights
    if not is_url and not os.path.isfile(weights):
        raise FileNotFoundError(
            f"teacher weights {weights!r} do not exist (DISTILL.TEACHER_WEIGHTS / --teacher-weights)"
        )
    try:
        local = weights
        if is_url:
            from detectron2.utils.file_io import PathManager

            local = PathManager.get_local_path(weights)
    except Exception as err:
        raise RuntimeError(
            f"could not download the teacher weights {weights} ({type(err).__name__}: {err}). "
            "Without network access, fetch that file on another machine and pass it with "
            "--teacher-weights /path/to/file (DISTILL.TEACHER_WEIGHTS)"
        ) from err
    load_weights_checked(teacher, local, what="teacher")


def build_teacher(cfg: CfgNode) -> tuple[nn.Module, str]:
    """Build the teacher from its config and load ``DISTILL.TEACHER_WEIGHTS``; returns it and its INPUT.FORMAT."""
    from detectron2.modeling import build_model

    t_cfg = teacher_config(cfg)
    if t_cfg.MODEL.META_ARCHITECTURE == "TBDistiller":
        raise ValueError("the teacher config must describe a plain detector, not a TBDistiller")
    teacher = build_model(t_cfg)
    weights = cfg.DISTILL.TEACHER_WEIGHTS
    if not weights:
        logger.warning("TBD: DISTILL.TEACHER_WEIGHTS is empty: the teacher is randomly initialised")
    else:
        load_teacher_weights(teacher, weights)
    return teacher, t_cfg.INPUT.FORMAT


def export_student(model: nn.Module, path: str | os.PathLike, cfg: CfgNode | None = None) -> bool:
    """Write the student of ``model`` as a plain Detectron2 checkpoint (``{"model": state_dict}``).

    ``model`` is a :class:`TBDistiller` (the student alone is written: no teacher, adapters or
    TWG), a plain detector (written whole), or either wrapped in DistributedDataParallel, e.g.
    ``trainer.model``. With ``cfg`` (the training config) the student's config is written beside
    it as ``<path without suffix>.yaml``, loadable by plain Detectron2 for a Detectron2
    architecture (:func:`tbd.export.student_config_yaml`). In a multi-process run call it in
    every process: only the main process writes (atomically); returns whether this one wrote.
    """
    from detectron2.utils import comm

    from tbd.engine.checkpoint import atomic_torch_save, atomic_write_text
    from tbd.export import student_config_yaml, without_training_only

    inner = unwrap_model(model)
    state = inner.student_state_dict() if isinstance(inner, TBDistiller) else inner.state_dict()
    state = without_training_only(state)  # auxiliary heads (MODEL.AUX_HEADS) are training-only
    if not comm.is_main_process():
        return False
    atomic_torch_save({"model": {k: v.detach().cpu() for k, v in state.items()}}, path)
    if cfg is not None:
        atomic_write_text(os.path.splitext(os.fspath(path))[0] + ".yaml", student_config_yaml(cfg))
    return True
