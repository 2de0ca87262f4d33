"""tbd's trainer: Detectron2's DefaultTrainer with the guarantees a long CPU/GPU run needs.

- checkpoints are written atomically and never with NaN weights;
- a step whose loss or gradients are not finite is skipped and counted; after
  ``TBD.MAX_NONFINITE_STEPS`` in a row training stops with a clear message;
- Ctrl-C / SIGTERM finishes the current step, saves a checkpoint and stops; ``resume_or_load``
  continues with the same iteration, optimizer, scheduler and position in the data stream;
- rich progress on the terminal; ``metrics.json`` and TensorBoard events in ``OUTPUT_DIR``;
- COCO evaluation through pycocotools when Detectron2's C++ evaluator is absent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.data.common import AspectRatioGroupedDataset
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import JSONWriter, TensorboardXWriter, get_event_storage
from torch.nn.parallel import DistributedDataParallel

from tbd import compat, jsonio
from tbd.distill.baseline import (
    BASELINE_PREFIX,
    baseline_of,
    split_losses,
    sync_baseline,
    with_harmony,
)
from tbd.distill.hooks import insert_distill_hooks
from tbd.engine.checkpoint import AtomicDetectionCheckpointer, remove_stale_temporaries
from tbd.engine.data import PositionSeededDataset, ResumableTrainingSampler, replay_grouping
from tbd.engine.optim import build_optimizer
from tbd.engine.progress import RichProgressHook

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced too many non-finite steps in a row."""


class TrainingInterrupted(BaseException):
    """Raised after a signal-triggered checkpoint, to leave the training loop cleanly.

    A ``BaseException`` (like ``KeyboardInterrupt``): Detectron2's training loop logs every
    ``Exception`` as "Exception during training" with a traceback, and a requested stop is not one.
    """

    def __init__(self, iteration: int, checkpoint: str) -> None:
        super().__init__(f"interrupted after iteration {iteration}; saved {checkpoint}")
        self.iteration = iteration
        self.checkpoint = checkpoint


class _StrictLines:
    """A text file whose JSON lines are rewritten as strict JSON (``NaN`` -> ``null``) on the way."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def write(self, text: str) -> int:
        lines = [
            jsonio.dumps(json.loads(line), sort_keys=True) if line.strip() else line
            for line in text.split("\n")
        ]
        return self._handle.write("\n".join(lines))

    def __getattr__(self, name: str) -> Any:  # flush, fileno, close
        return getattr(self._handle, name)


class StrictJSONWriter(JSONWriter):
    """Detectron2's ``metrics.json`` writer, in strict JSON: an undefined scalar (a COCO AP without
    predictions) is ``null``, which every JSON parser reads."""

    def __init__(self, json_file: str, window_size: int = 20) -> None:
        super().__init__(json_file, window_size)
        self._file_handle = _StrictLines(self._file_handle)


class GuardedTrainer(SimpleTrainer):
    """SimpleTrainer that skips (and reports) steps with a non-finite loss or gradient.

    A distiller's baseline (``DISTILL.WITH_BASELINE``, losses under ``baseline/``) is checked apart:
    a bad step of one of the two students skips that student's update only, as if each trained
    alone; the baseline's bad steps are counted (``baseline/nonfinite_steps``) but never stop the run.
    """

    def __init__(self, model: Any, data_loader: Any, optimizer: Any, max_nonfinite: int = 5) -> None:
        super().__init__(model, data_loader, optimizer)
        self.max_nonfinite = max_nonfinite
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.baseline_nonfinite_total = 0
        baseline = baseline_of(model)
        self._baseline_ids = {id(p) for p in baseline.parameters()} if baseline is not None else set()

    def _skip(self, reason: str) -> None:
        self.optimizer.zero_grad()
        self._count_nonfinite(reason)

    def _count_nonfinite(self, reason: str) -> None:
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        storage = get_event_storage()
        storage.put_scalar("nonfinite_steps", self.nonfinite_total, smoothing_hint=False)
        logger.warning(
            "iteration %d: %s; step skipped (%d in a row, %d in total)",
            self.iter,
            reason,
            self.nonfinite_streak,
            self.nonfinite_total,
        )
        if self.nonfinite_streak >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} training steps in a row had a non-finite loss or gradient "
                f"(last: {reason}). Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS, or check the "
                "data; the last good checkpoint is kept."
            )

    def _baseline_failed(self, reason: str) -> None:
        self.baseline_nonfinite_total += 1
        get_event_storage().put_scalar(
            BASELINE_PREFIX + "nonfinite_steps", self.baseline_nonfinite_total, smoothing_hint=False
        )
        logger.warning("iteration %d: the baseline student's %s; its step skipped", self.iter, reason)

    def run_step(self) -> None:
        assert self.model.training, "[GuardedTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        main, alone = split_losses(loss_dict)
        main_ok = _finite_sum(main)
        alone_ok = not alone or _finite_sum(alone)
        if not main_ok and not (alone and alone_ok):
            bad = [k for k, v in loss_dict.items() if not bool(torch.isfinite(v))]
            self._skip(f"non-finite loss in {', '.join(bad)}")
            return
        if alone and not alone_ok:
            self._baseline_failed("loss is not finite")

        self.optimizer.zero_grad()
        sum([*(main.values() if main_ok else ()), *(alone.values() if alone_ok else ())]).backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        side = [p for p in params if id(p) in self._baseline_ids]
        own = [p for p in params if id(p) not in self._baseline_ids]
        if main_ok and not _finite_grads(own):
            main_ok = False
            for p in own:
                p.grad = None
            if not alone_ok or not alone:
                self._skip("non-finite gradient")
                return
        if alone and alone_ok and not _finite_grads(side):
            alone_ok = False
            self._baseline_failed("gradient is not finite")
            for p in side:
                p.grad = None
            if not main_ok:
                self._skip("non-finite gradient")
                return
        if main_ok:
            self.nonfinite_streak = 0
            self._write_metrics(main, data_time)
        else:  # only the baseline steps; the distilled student's step is skipped and counted
            bad = [k for k, v in main.items() if not bool(torch.isfinite(v))]
            self._count_nonfinite(f"non-finite {'loss in ' + ', '.join(bad) if bad else 'gradient'}")
        if alone and alone_ok:
            self._write_metrics(alone, data_time, prefix=BASELINE_PREFIX)
        self.optimizer.step()


@contextmanager
def _same_jit_numerics(enabled: bool) -> Iterator[None]:
    """TorchScript's profiling executor differentiates a scripted function's first call (recorded
    ops) and its later calls (a symbolic gradient) differently, in the last bits. The distilled
    student and its baseline call the same functions (fvcore's focal loss, box coders), so the
    student would get call 1 and the baseline call 2 of the first step, and the two would differ
    from there on; the legacy executor gives every call the same numerics."""
    if not enabled:
        yield
        return
    previous = torch._C._jit_set_profiling_executor(False)
    try:
        yield
    finally:
        torch._C._jit_set_profiling_executor(previous)


def _finite_sum(losses: dict[str, torch.Tensor]) -> bool:
    return bool(torch.isfinite(sum(losses.values()))) if losses else False


def _finite_grads(params: list[torch.nn.Parameter]) -> bool:
    return not params or bool(torch.stack([torch.isfinite(p.grad).all() for p in params]).all())


class _StopOnSignal(HookBase):
    """Turns SIGINT/SIGTERM into "finish this step, save, stop". A second Ctrl-C aborts at once."""

    def __init__(self, checkpointer: AtomicDetectionCheckpointer) -> None:
        self.checkpointer = checkpointer
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint after this step", self.requested)

    def before_train(self) -> None:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread (e.g. some launchers): keep default behaviour
            self._previous.clear()

    def after_step(self) -> None:
        stop = self.requested is not None
        if comm.get_world_size() > 1:
            flag = torch.tensor([1.0 if stop else 0.0])
            flag = comm.all_gather(flag)
            stop = any(float(f) > 0 for f in flag)
        if not stop:
            return
        it = self.trainer.iter
        name = f"model_{it:07d}"
        if comm.is_main_process():
            self.checkpointer.save(name, iteration=it)
        comm.synchronize()
        raise TrainingInterrupted(it, os.path.join(self.checkpointer.save_dir, name + ".pth"))

    def after_train(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class _ModelRunningState(HookBase):
    """Checkpoints the running statistics Detectron2 keeps as plain attributes, not buffers.

    ``DenseDetector._ema_update`` (RetinaNet, FCOS) smooths the loss normaliser in a float
    attribute; without saving it a resumed run would rescale its first losses.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def _targets(self) -> dict[str, torch.nn.Module]:
        from detectron2.modeling.meta_arch.dense_detector import DenseDetector

        return {n: m for n, m in self._model.named_modules() if isinstance(m, DenseDetector)}

    def state_dict(self) -> dict[str, dict[str, float]]:
        state = {}
        for name, module in self._targets().items():
            values = {k: float(v) for k, v in vars(module).items() if k.startswith("loss_normalizer")}
            if values:
                state[name] = values
        return state

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        targets = self._targets()
        for name, values in state.items():
            if name in targets:
                for key, value in values.items():
                    setattr(targets[name], key, value)


def write_every_evaluation(hooks: list[HookBase], eval_period: int) -> None:
    """Make Detectron2's ``PeriodicWriter`` write at least once per evaluation period; in place.

    Its writers keep only the latest value of a scalar between two writes (every 20 iterations), so
    with evaluations more frequent than that every evaluation but the last of each window (its AP, the
    baseline comparison, the teacher-lead rule's α) would be missing from ``metrics.json``.
    """
    from detectron2.engine.hooks import PeriodicWriter

    for hook in hooks:
        if isinstance(hook, PeriodicWriter) and 0 < eval_period < hook._period:
            hook._period = int(eval_period)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with atomic checkpoints, NaN guards, exact resume and rich progress."""

    def __init__(self, cfg: CfgNode, progress: bool = True) -> None:
        self._show_progress = progress
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        if comm.is_main_process():
            remove_stale_temporaries(cfg.OUTPUT_DIR)  # of a save killed in a previous run
        super().__init__(cfg)
        model = self._trainer.model
        data_loader = self._trainer.data_loader
        optimizer = self._trainer.optimizer
        if not cfg.SOLVER.AMP.ENABLED:
            self._trainer = GuardedTrainer(
                model, data_loader, optimizer, max_nonfinite=cfg.TBD.MAX_NONFINITE_STEPS
            )

    # --- builders -------------------------------------------------------------------------
    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        """Detectron2's model, plus the training-only heads of ``MODEL.AUX_HEADS`` on its student."""
        from tbd.modeling.aux_heads import attach_aux_heads

        return attach_aux_heads(super().build_model(cfg), cfg)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> Any:
        from detectron2.data.build import get_detection_dataset_dicts

        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=0,
            proposal_files=None,
        )
        seed = cfg.SEED if cfg.SEED >= 0 else 0
        # each element is augmented with RNGs seeded by its stream position (exact resume)
        return build_detection_train_loader(
            dataset=PositionSeededDataset(dicts, DatasetMapper(cfg, True), seed),
            mapper=None,
            sampler=ResumableTrainingSampler(len(dicts), seed=seed),
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> Any:
        """COCO AP and the harmonious share (tbd.analysis.harmony, default thresholds) of every
        evaluation: ``bbox/AP``, ``harmony/harmonious_share`` ... in metrics.json (``tbd plot``)."""
        from detectron2.evaluation import DatasetEvaluators

        from tbd.analysis.harmony import HarmonyEvaluator

        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        coco = COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=compat.has_compiled_ops())
        evaluator = DatasetEvaluators([coco, HarmonyEvaluator(dataset_name)])
        if "DISTILL" in cfg and cfg.DISTILL.WITH_BASELINE:  # both students' harmony at 0.5 and 0.3
            return with_harmony(evaluator, dataset_name)
        return evaluator

    def build_writers(self) -> list[Any]:
        writers: list[Any] = [
            StrictJSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json")),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]
        if not self._show_progress:
            from detectron2.utils.events import CommonMetricPrinter

            writers.insert(0, CommonMetricPrinter(self.max_iter))
        return writers

    def build_hooks(self) -> list[HookBase]:
        cfg = self.cfg
        # same checkpointables as DefaultTrainer (the trainer: iteration, optimizer, hook states)
        self.checkpointer = AtomicDetectionCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        built = insert_distill_hooks(self, super().build_hooks(), cfg)
        write_every_evaluation(built, cfg.TEST.EVAL_PERIOD)
        self._stop_hook = _StopOnSignal(self.checkpointer)
        extra: list[HookBase] = [self._stop_hook, _ModelRunningState(self._trainer.model)]
        if self._show_progress and comm.is_main_process():
            extra.append(RichProgressHook(self.max_iter, period=cfg.TBD.PROGRESS_PERIOD))
        # last: a signal-triggered save sees the scheduler and metrics of the finished step
        return built + extra[::-1]

    def train(self) -> Any:
        # TorchScript helpers in the loss (fvcore's sigmoid_focal_loss_jit, Detectron2's box
        # coders) run unoptimised for their first calls and then switch to an optimised graph whose
        # backward differs in the last bits. A resumed process would restart that warm-up at its
        # first iteration, so its steps would differ from an uninterrupted run's; run them always
        # unoptimised (the eager numerics) so that resume is exact.
        with (
            torch.jit.optimized_execution(False),
            _same_jit_numerics(baseline_of(self._trainer.model) is not None),
        ):
            return super().train()

    # --- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Detectron2 0.6's DefaultTrainer leaves the optimizer (momentum) out of its checkpoints;
        # later versions add the inner trainer's state like this.
        state = super().state_dict()
        state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "_trainer" in state:
            self._trainer.load_state_dict(state["_trainer"])

    def resume_or_load(self, resume: bool = True) -> None:
        if resume and self.checkpointer.has_checkpoint():
            try:
                super().resume_or_load(resume=True)
            except ValueError:  # e.g. the optimizer's groups of a run without the baseline
                self._check_resumed_baseline()
                raise
            self._check_resumed_baseline()
        else:
            # initial weights in any supported format, with a report; a partial fill is an error
            from tbd.engine.weights import load_initial_weights

            model = self._trainer.model
            model = model.module if isinstance(model, DistributedDataParallel) else model
            report = load_initial_weights(model, self.cfg.MODEL.WEIGHTS, self.cfg.TBD.ALLOW_PARTIAL_WEIGHTS)
            sync_baseline(model)  # the student trained alone starts from the same weights
            if report is not None and comm.is_main_process():
                logger.info(report.summary())
            self.start_iter = 0
            self.initial_weights_report = report
        if self.start_iter > 0:
            self._seek_data(self.start_iter)

    def _check_resumed_baseline(self) -> None:
        model = self._trainer.model
        model = model.module if isinstance(model, DistributedDataParallel) else model
        if baseline_of(model) is not None and not getattr(model, "_loaded_baseline", True):
            from tbd.engine.weights import WeightsError

            raise WeightsError(
                f"the checkpoint in {self.cfg.OUTPUT_DIR} was written without the baseline student "
                "(DISTILL.WITH_BASELINE / --with-baseline was off): the student trained alone must start "
                "with the run. Resume without --with-baseline, or start a new run in another --output"
            )

    def _seek_data(self, start_iter: int) -> None:
        """Restart the data stream where an uninterrupted run would be at ``start_iter``."""
        loader = self._trainer.data_loader
        sampler = _find_sampler(loader)
        dataset = _find_dataset(loader)
        if sampler is None or dataset is None:
            logger.warning("resume: cannot find the training sampler; data order restarts")
            return
        per_process = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        if isinstance(loader, AspectRatioGroupedDataset) and dataset.bucket is not None:
            # batches are not runs of consecutive images: replay the grouping, refill the buckets
            sampler.skip, waiting = replay_grouping(sampler, dataset.bucket, per_process, start_iter)
            for bucket, items in zip(loader._buckets, waiting):
                bucket[:] = [dataset[item] for item in items]
        else:
            sampler.skip = start_iter * per_process
        self._trainer._data_loader_iter = iter(loader)
        logger.info("resume: this process's data stream continues after %d images", sampler.skip)


def _find_sampler(loader: Any) -> ResumableTrainingSampler | None:
    """Walk Detectron2's loader wrappers down to our sampler."""
    seen = 0
    obj = loader
    while obj is not None and seen < 5:
        sampler = getattr(obj, "sampler", None)
        if isinstance(sampler, ResumableTrainingSampler):
            return sampler
        obj = getattr(obj, "dataset", None)
        seen += 1
    return None


def _find_dataset(loader: Any) -> PositionSeededDataset | None:
    seen = 0
    obj = loader
    while obj is not None and seen < 5:
        if isinstance(obj, PositionSeededDataset):
            return obj
        obj = getattr(obj, "dataset", None)
        seen += 1
    return None
