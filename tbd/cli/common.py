"""Pieces shared by the ``tbd`` subcommands: arguments, configs, output directories, launch."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Callable

from detectron2.config import CfgNode

# the console and UsageError live in tbd.ui, a run's config in tbd.run_config (the library prints,
# raises and builds configs with them too); imported here under their old names
from tbd.run_config import (  # noqa: F401
    apply_common,
    check_batch_per_process,
    flat_items,
    pick_device,
    set_iterations,
    set_num_classes,
)
from tbd.ui import REDIRECTED_WIDTH, UsageError, console  # noqa: F401


# --- arguments ----------------------------------------------------------------------------
def add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset (default: the embedded tbd_shapes dataset)")
    g.add_argument(
        "--dataset",
        help="a registered Detectron2 dataset, e.g. coco_2017 (uses coco_2017_train / coco_2017_val)",
    )
    g.add_argument("--train-json", help="your own COCO-format training annotations")
    g.add_argument("--train-images", help="image directory for --train-json")
    g.add_argument("--val-json", help="your own COCO-format validation annotations")
    g.add_argument("--val-images", help="image directory for --val-json")
    g.add_argument("--data-dir", help="cache directory of the embedded dataset (default $TBD_DATA_DIR)")
    g.add_argument("--num-train-images", type=int, default=2000, help="embedded dataset: training images")
    g.add_argument("--num-val-images", type=int, default=200, help="embedded dataset: validation images")


def add_profile_args(p: argparse.ArgumentParser, weights_flag: str = "--student-weights") -> None:
    g = p.add_argument_group(
        "student profile (tbd.profiles; default: from the dataset — embedded, coco, or custom for your json)"
    )
    g.add_argument(
        "--profile",
        choices=("embedded", "coco", "custom"),
        help="embedded: 128 px from scratch (CPU demo); coco: Detectron2's COCO setting (640-800/1333, "
        "ImageNet init, FrozenBN, SGD 0.01 at batch 16); custom: coco at your data's input size",
    )
    g.add_argument(
        "--input-size",
        type=int,
        help="test-time shorter side (training: 0.8-1.0 of it); custom default: the training images' "
        "median shorter side, bounded to 320..800",
    )
    g.add_argument(
        "--schedule",
        choices=("1x", "2x", "3x"),
        help="coco: 90k/180k/270k it at batch 16; custom: 12/24/36 epochs",
    )
    g.add_argument(
        weights_flag,
        dest="student_weights",
        help="initial weights: torchvision://resnet50, a torchvision state dict, a Detectron2 .pth/.pkl "
        "(e.g. detectron2://ImageNetPretrained/MSRA/R-50.pkl); coco/custom default: torchvision://resnet<depth>",
    )
    g.add_argument(
        "--from-scratch", action="store_true", help="no initial weights (BatchNorm trained, nothing frozen)"
    )
    g.add_argument(
        "--allow-partial-weights",
        action="store_true",
        help="accept initial weights that fill the backbone only partly (TBD.ALLOW_PARTIAL_WEIGHTS)",
    )


def apply_student_profile(cfg: CfgNode, args: argparse.Namespace, train: str) -> Any:
    """Adapt a student config to the data (``tbd.profiles``); returns the ProfileInfo."""
    from tbd.engine.weights import WeightsError
    from tbd.profiles import ProfileError, apply_profile, profile_for_dataset

    profile = getattr(args, "profile", None) or profile_for_dataset(train)
    if getattr(args, "student_weights", None):  # a missing or unreadable file: said before anything else
        check_weights_arg(
            args.student_weights, "--student-weights" if hasattr(args, "student") else "--weights"
        )
    try:
        info = apply_profile(
            cfg,
            profile,
            train_name=train,
            batch_size=getattr(args, "batch_size", None),
            schedule=getattr(args, "schedule", None),
            input_size=getattr(args, "input_size", None),
            from_scratch=getattr(args, "from_scratch", False),
            weights=getattr(args, "student_weights", None),
            world_size=args.num_gpus * args.num_machines,
        )
    except (ProfileError, WeightsError) as err:
        raise UsageError(str(err)) from err
    cfg.TBD.PROFILE = info.name
    cfg.TBD.INPUT_SIZE_RULE = info.input_rule
    if getattr(args, "allow_partial_weights", False):
        cfg.TBD.ALLOW_PARTIAL_WEIGHTS = True
    return info


def check_weights_arg(spec: str, flag: str) -> None:
    """Fail before training when a local weights file named on the command line is absent."""
    from tbd.engine.checkpoint import UnreadableWeightsError, check_weights_file
    from tbd.engine.weights import TORCHVISION_SCHEME, WeightsError, torchvision_weights

    try:
        if spec.startswith(TORCHVISION_SCHEME):
            torchvision_weights(spec)
        elif "://" not in spec and not Path(spec).expanduser().is_file():
            raise WeightsError(
                f"{flag} {spec} does not exist; pass a checkpoint file, a URL or torchvision://NAME"
            )
        else:
            check_weights_file(str(Path(spec).expanduser()) if "://" not in spec else spec, "initial")
    except (WeightsError, UnreadableWeightsError) as err:
        raise UsageError(str(err)) from err


def print_profile(cfg: CfgNode, info: Any) -> None:
    """One line (plus warnings) before training: what the data made of the student."""
    train_sizes = cfg.INPUT.MIN_SIZE_TRAIN
    lo, hi = min(train_sizes), max(train_sizes)
    span = f"{lo}" if lo == hi else f"{lo}-{hi}"
    console.print(
        f"student profile [bold]{info.name}[/]: input {span} / {cfg.INPUT.MAX_SIZE_TRAIN} px for training, "
        f"{cfg.INPUT.MIN_SIZE_TEST} / {cfg.INPUT.MAX_SIZE_TEST} px for testing ({info.input_rule}); "
        f"weights {info.weights or '(from scratch)'}; FPN {cfg.MODEL.FPN.OUT_CHANNELS} ch, "
        f"backbone norm {cfg.MODEL.RESNETS.NORM}, FREEZE_AT {cfg.MODEL.BACKBONE.FREEZE_AT}",
        soft_wrap=True,
    )
    for note in info.notes:
        console.print(f"  {note}", soft_wrap=True)
    for warning in info.warnings:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)


def add_output_args(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output", "-o", default=default, help=f"output directory (default: {default})")
    g.add_argument("--resume", action="store_true", help="continue the run in --output where it stopped")
    g.add_argument(
        "--overwrite", action="store_true", help="delete a previous run in --output and start again"
    )


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule (defaults come from the config)")
    g.add_argument("--iters", type=int, help="training iterations (SOLVER.MAX_ITER)")
    g.add_argument("--batch-size", type=int, help="images per batch over all processes")
    g.add_argument("--lr", type=float, help="base learning rate")
    g.add_argument("--eval-period", type=int, help="evaluate every N iterations (0: only at the end)")
    g.add_argument("--seed", type=int, default=0, help="random seed (data order and init)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")


def add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (detectron2.engine.launch)")
    g.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs, or CPU workers)")
    g.add_argument("--num-machines", type=int, default=1)
    g.add_argument("--machine-rank", type=int, default=0)
    g.add_argument("--dist-url", default="auto", help="e.g. tcp://10.0.0.1:29500; auto on one machine")


def add_opts_arg(p: argparse.ArgumentParser, help: str = "") -> None:
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help=help or "Detectron2 config overrides, e.g. SOLVER.BASE_LR 0.02",
    )


# --- datasets and configs ------------------------------------------------------------------
def resolve_datasets(args: argparse.Namespace, need_train: bool = True) -> tuple[str, str]:
    """Register what the user named (again in each spawned worker) and return (train, test).

    ``need_train=False`` (eval, harmony): ``--val-json/--val-images`` alone are enough.
    """
    import os

    from tbd.data import resolve_datasets as _resolve

    if getattr(args, "data_dir", None):
        os.environ["TBD_DATA_DIR"] = str(args.data_dir)
    try:
        return _resolve(
            getattr(args, "dataset", None),
            train_json=getattr(args, "train_json", None),
            train_images=getattr(args, "train_images", None),
            val_json=getattr(args, "val_json", None),
            val_images=getattr(args, "val_images", None),
            shapes_options={
                "num_train": getattr(args, "num_train_images", 2000),
                "num_val": getattr(args, "num_val_images", 200),
            },
            need_train=need_train,
        )
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise UsageError(str(err)) from err


# --- output directories --------------------------------------------------------------------
def plan_output_dir(path: str | Path, resume: bool, overwrite: bool) -> Any:
    """Check ``--output`` with ``--resume``/``--overwrite`` before anything is built or written
    (``tbd.engine.run_folder.plan_output``); returns the plan to apply once every input is checked."""
    from tbd.engine.run_folder import RunFolderError, plan_output

    try:
        return plan_output(path, resume, overwrite)
    except RunFolderError as err:
        raise UsageError(str(err)) from err


def apply_output_dir(plan: Any) -> Path:
    """Prepare the planned folder: ``--overwrite`` removes the previous run's own files (the user's stay)."""
    from tbd.engine.run_folder import RunFolderError, apply_output_plan

    try:
        lines = apply_output_plan(plan)
    except RunFolderError as err:
        raise UsageError(str(err)) from err
    for line in lines:
        console.print(f"[dim]{line}[/]", soft_wrap=True)
    return Path(plan.folder)


def prepare_output_dir(path: str | Path, resume: bool, overwrite: bool) -> Path:
    """:func:`plan_output_dir` then :func:`apply_output_dir` (nothing to check in between)."""
    return apply_output_dir(plan_output_dir(path, resume, overwrite))


def quiet_warnings() -> None:
    """Hide deprecation noise that Detectron2 0.6 triggers on a recent torch (CLI processes only)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|detectron2|fvcore)(\.|$)")


def setup_logging(output_dir: Path, quiet_console: bool = True) -> None:
    """Detectron2's, fvcore's and tbd's loggers into ``output_dir/log.txt``; warnings on the console.

    Every record is written and flushed as it is logged (the file holds everything up to a crash).
    A later call (the student after the teacher, in one process) moves the file to its new run.
    """
    from detectron2.utils import comm
    from detectron2.utils.logger import setup_logger

    rank = comm.get_rank()
    name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
    output_dir.mkdir(parents=True, exist_ok=True)
    run_log = logging.FileHandler(output_dir / name, mode="a", encoding="utf-8")
    run_log.setFormatter(
        logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s", datefmt="%m/%d %H:%M:%S")
    )
    run_log.setLevel(logging.DEBUG)
    run_log._tbd_run_log = True  # type: ignore[attr-defined]
    for logger_name in ("detectron2", "fvcore", "tbd"):
        # console only (cached by Detectron2: called again, it adds nothing)
        logger = setup_logger(distributed_rank=rank, name=logger_name, abbrev_name=logger_name[:3])
        for h in list(logger.handlers):
            if getattr(h, "_tbd_run_log", False):  # the previous run's file
                logger.removeHandler(h)
                h.close()
            elif _is_console(h):
                h.setLevel(logging.WARNING if quiet_console else logging.DEBUG)
                if quiet_console and _not_reported_elsewhere not in h.filters:
                    h.addFilter(_not_reported_elsewhere)
        logger.addHandler(run_log)
    file_only = logging.getLogger(RUN_LOG_ONLY)
    file_only.propagate = False
    for h in list(file_only.handlers):
        file_only.removeHandler(h)
    file_only.addHandler(run_log)


def close_run_log() -> None:
    """Detach the run's log.txt from every logger (the end of a command: a later command in the same
    process, e.g. a script calling ``tbd.cli.main.main`` twice, must not write into this run)."""
    for logger_name in ("detectron2", "fvcore", "tbd", RUN_LOG_ONLY):
        logger = logging.getLogger(logger_name)
        for h in list(logger.handlers):
            if getattr(h, "_tbd_run_log", False):
                logger.removeHandler(h)
                h.close()


def _is_console(handler: logging.Handler) -> bool:
    """A stream handler that does not write to a file (Detectron2's own log file is a plain stream)."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    name = getattr(handler.stream, "name", None)
    return not (isinstance(name, str) and os.path.isfile(name))


#: a logger that writes to the run's log.txt only (e.g. a failure the console reports anyway)
RUN_LOG_ONLY = "tbd_run_log"


def _not_reported_elsewhere(record: logging.LogRecord) -> bool:
    """Console filter: an unreadable image is printed as one ``error:`` line by ``tbd``'s main, so
    Detectron2's "Exception during training" traceback of it goes to log.txt only."""
    from tbd.data.images import is_image_read_error

    return not (
        record.exc_info and record.exc_info[1] is not None and is_image_read_error(record.exc_info[1])
    )


def launch_workers(main: Callable[..., Any], args: argparse.Namespace, *fn_args: Any) -> None:
    """Run ``main(*fn_args)`` once, or in several processes via ``detectron2.engine.launch``."""
    from detectron2.engine import launch

    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=fn_args,
    )
