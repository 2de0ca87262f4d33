"""``tbd train``: train one plain Detectron2 model (a student, a teacher or any config)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from detectron2.config import CfgNode
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from tbd.cli import common
from tbd.cli.common import UsageError, console
from tbd.cli.rundata import record_data
from tbd.summaries import read_final_results as _read_final_results


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a plain Detectron2 model (no distillation)",
        description=(
            "Train one Detectron2 model with tbd's trainer: rich progress, periodic COCO evaluation, "
            "atomic checkpoints, metrics.json and TensorBoard events in --output. MODEL is a student "
            "(r18, r34, r50, r101, mnv2 with --head), a teacher name from `tbd teachers`, or a config file."
        ),
    )
    p.add_argument("--model", "-m", default="r18", help="student, teacher name or config path (default r18)")
    p.add_argument(
        "--head",
        default="retinanet",
        help="head for a student name: retinanet (default here), fcos, tal, et, dw, faster_rcnn",
    )
    common.add_dataset_args(p)
    common.add_profile_args(p, weights_flag="--weights")
    common.add_output_args(p, default="runs/train")
    common.add_schedule_args(p)
    common.add_launch_args(p)
    common.add_opts_arg(p)
    p.set_defaults(func=run)


def build_train_cfg(args: argparse.Namespace, train: str, test: str) -> CfgNode:
    from tbd.config import load_config
    from tbd.registry import STUDENT_NAMES, RegistryError, dataset_key, resolve_model

    try:
        spec = resolve_model(args.model, args.head, dataset_key(train))
    except RegistryError as err:
        raise UsageError(str(err)) from err
    cfg = load_config(spec.config, spec.opts)
    if args.model in STUDENT_NAMES:
        args.profile_info = common.apply_student_profile(cfg, args, train)
    else:  # a teacher from the registry or the user's own config: used as written
        if any(getattr(args, k, None) for k in ("profile", "input_size", "schedule", "from_scratch")):
            raise UsageError(
                f"--profile/--input-size/--schedule/--from-scratch apply to student names ({', '.join(STUDENT_NAMES)}); "
                f"{args.model} is used as its config says (change it with KEY VALUE overrides)"
            )
        if args.student_weights:
            common.check_weights_arg(args.student_weights, "--weights")
        cfg.MODEL.WEIGHTS = args.student_weights or spec.init_weights  # a registry teacher's init
    common.apply_common(cfg, args, train, test)
    cfg.OUTPUT_DIR = str(args.output)
    return cfg


def train_worker(cfg: CfgNode, args: argparse.Namespace) -> dict[str, Any]:
    """Runs in every process: register the data, train, evaluate; returns the final results."""
    from tbd.config import register_all
    from tbd.engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted
    from tbd.engine.weights import WeightsError

    common.quiet_warnings()  # again: a spawned worker starts with default filters
    register_all()
    common.resolve_datasets(args)
    common.setup_logging(Path(cfg.OUTPUT_DIR))
    # as Detectron2's default_setup: python, numpy and torch seeded per process, before the model is
    # built (its initialisation) and before the loader's workers take their seeds from torch
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + comm.get_rank())
    try:
        trainer = Trainer(cfg, progress=not getattr(args, "no_progress", False))
        try:
            trainer.resume_or_load(resume=args.resume)
        except WeightsError as err:
            if comm.is_main_process():
                console.print(f"[bold red]initial weights:[/] {err}", soft_wrap=True)
            raise SystemExit(2) from None
        report = getattr(trainer, "initial_weights_report", None)
        if report is not None and comm.is_main_process():
            console.print(report.summary(), soft_wrap=True)
        trainer.train()
        results = getattr(trainer, "_last_eval_results", None) or {}
    except NonFiniteLossError as err:
        if comm.is_main_process():
            console.print(f"[bold red]training stopped:[/] {err}", soft_wrap=True)
        raise SystemExit(1) from None
    except TrainingInterrupted as stop:
        if comm.is_main_process():
            console.print(
                f"[yellow]Stopped after iteration {stop.iteration + 1}; checkpoint {stop.checkpoint}. "
                "Run the same command with --resume to continue.[/]"
            )
        raise SystemExit(130) from None
    except Exception:
        logging.getLogger(common.RUN_LOG_ONLY).exception("run in %s failed", cfg.OUTPUT_DIR)
        raise
    return dict(results)


def print_results(results: dict[str, Any], title: str) -> None:
    from rich.table import Table

    from tbd.jsonio import fmt_metric, undefined_metrics_note

    bbox = results.get("bbox", {})
    if not bbox:
        return
    table = Table(title=title)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        table.add_column(key, justify="right")
    table.add_row(*(fmt_metric(bbox.get(k)) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    console.print(table)
    note = undefined_metrics_note(bbox)
    if note:
        console.print(f"-: {note}", soft_wrap=True)


def run(args: argparse.Namespace) -> int:
    from tbd import jsonio
    from tbd.cli.runrecord import restore_args, resume_config, write_run_record
    from tbd.engine.checkpoint import atomic_write_text

    # every check first (folder, data, model, weights, the stored run); then the folder is touched
    plan = common.plan_output_dir(args.output, args.resume, args.overwrite)
    recorded = restore_args(args, Path(args.output)) if args.resume else False
    train, test = common.resolve_datasets(args)
    cfg = build_train_cfg(args, train, test)
    common.check_batch_per_process(cfg, args.num_gpus * args.num_machines)
    if args.resume:
        cfg = resume_config(Path(args.output), cfg, args, recorded)
    out = common.apply_output_dir(plan)
    write_run_record(out, args, getattr(args, "command_line", "tbd train"))
    atomic_write_text(out / "config.yaml", cfg.dump())
    record_data(out, args)  # for tbd eval/harmony --run
    if getattr(args, "profile_info", None) is not None:
        common.print_profile(cfg, args.profile_info)
    console.print(
        f"[bold]tbd train[/] {args.model} on {train} -> {out}  "
        f"({cfg.SOLVER.MAX_ITER} iterations, batch {cfg.SOLVER.IMS_PER_BATCH}, {cfg.MODEL.DEVICE})"
    )
    if args.num_gpus * args.num_machines > 1:
        common.launch_workers(train_worker, args, cfg, args)
        results = _read_final_results(out)
    else:
        results = train_worker(cfg, args)
    print_results(results, f"{args.model} on {test}")
    atomic_write_text(out / "results.json", jsonio.dumps(jsonio.strict_results(results), indent=2))
    return 0
