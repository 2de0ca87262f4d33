"""``tbd distill``: teacher -> student Task-Balanced Distillation, end to end."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from detectron2.config import CfgNode

from tbd.cli import common
from tbd.cli.common import UsageError, console
from tbd.cli.rundata import record_data

# the library this command calls (moved from here: the old names stay importable from tbd.cli.distill)
from tbd.summaries import alone_row, gain_of, summarize, teacher_label  # noqa: F401
from tbd.teachers import (  # noqa: F401
    GENERATOR_MARKER,
    cache_root,
    distill_config,
    equivalent_cached_teacher,
    resolve_teacher,
    teacher_key,
    teacher_settings,
    train_teacher_here,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a student from a teacher with Task-Balanced Distillation",
        description=(
            "Distil --student from --teacher with TBD (harmony distillation + task-decoupled feature "
            "distillation). Teachers come from `tbd teachers`: on the embedded dataset a teacher "
            "without a checkpoint is trained first and cached; on COCO its model-zoo weights are "
            "used (or --teacher-weights). Writes checkpoints, metrics.json, TensorBoard events and "
            "summary.json (teacher AP, student AP, harmonious-prediction ratios) to --output. "
            "Trailing KEY VALUE overrides change the student's config (and DISTILL.*) only; the "
            "teacher's config is changed with DISTILL.TEACHER_OPTS, e.g. "
            "DISTILL.TEACHER_OPTS \"['INPUT.MIN_SIZE_TEST', '800']\" (see docs/CONFIG.md)."
        ),
    )
    g = p.add_argument_group("models")
    g.add_argument("--teacher", "-t", default="r101", help="teacher name (see `tbd teachers`; default r101)")
    g.add_argument("--teacher-config", help="your own teacher: a Detectron2 config (with --teacher-weights)")
    g.add_argument("--teacher-weights", help="teacher checkpoint (local file); overrides the registry")
    g.add_argument(
        "--teacher-iters", type=int, help="iterations when the teacher is trained here (default: registry)"
    )
    g.add_argument(
        "--teacher-cache",
        help="where teachers trained here are kept (default $TBD_CACHE or ~/.cache/tbd, + /teachers)",
    )
    g.add_argument(
        "--student",
        "-s",
        default="r18",
        help="student: r18 (default), r34, r50, r101, mnv2 (MobileNetV2), or a config",
    )
    g.add_argument("--head", default="tal", help="student head: tal (default), et, dw, retinanet, fcos")
    g.add_argument(
        "--teacher-amp", choices=["", "bf16", "fp16"], help="teacher precision (DISTILL.TEACHER_AMP)"
    )
    g.add_argument(
        "--allow-input-mismatch",
        action="store_true",
        help="distil even if the teacher was trained at a very different input size (TBD.ALLOW_TEACHER_INPUT_MISMATCH)",
    )
    g.add_argument("--no-harmony", action="store_true", help="skip the harmonious-ratio analysis at the end")
    g.add_argument(
        "--harmony-score-thresh",
        type=float,
        choices=[0.5, 0.3],
        default=0.5,
        help=(
            "score from which a prediction counts as easily classified in the final table's harmonious "
            "share (docs/HARMONY.md): 0.5 (the paper), or 0.3 for short schedules whose students score "
            "little above 0.5 (both are logged at every evaluation with --with-baseline)"
        ),
    )
    g.add_argument(
        "--with-baseline",
        action="store_true",
        help=(
            "also train the same student without distillation, side by side on the same batches "
            "(DISTILL.WITH_BASELINE): the only honest yardstick of the gain; about one more student "
            "step per step"
        ),
    )
    common.add_dataset_args(p)
    common.add_profile_args(p)
    common.add_output_args(p, default="runs/distill")
    common.add_schedule_args(p)
    common.add_launch_args(p)
    common.add_opts_arg(
        p,
        help=(
            "config overrides of the student (and DISTILL.* keys), e.g. SOLVER.BASE_LR 0.02; they do "
            "not reach the teacher: change its config with DISTILL.TEACHER_OPTS \"['KEY', 'VALUE']\""
        ),
    )
    p.set_defaults(func=run)


def _student_spec(args: argparse.Namespace) -> Any:
    from tbd.registry import ModelSpec, RegistryError, student_spec

    try:
        return student_spec(args.student, args.head)
    except RegistryError as err:
        from tbd.config import resolve_config_path

        try:
            return ModelSpec(name=Path(args.student).stem, config=resolve_config_path(args.student))
        except FileNotFoundError:
            raise UsageError(str(err)) from None


def student_train_cfg(args: argparse.Namespace, train: str, test: str) -> CfgNode:
    """The student's own config: its profile for the data, datasets, classes, device and schedule."""
    from tbd.config import load_config
    from tbd.registry import STUDENT_NAMES

    spec = _student_spec(args)
    cfg = load_config(spec.config, spec.opts)
    if args.student in STUDENT_NAMES:
        args.profile_info = common.apply_student_profile(cfg, args, train)
    elif args.student_weights:
        common.check_weights_arg(args.student_weights, "--student-weights")
        cfg.MODEL.WEIGHTS = args.student_weights
    return common.apply_common(cfg, args, train, test)


def build_distill_cfg(
    args: argparse.Namespace,
    train: str,
    test: str,
    teacher_config: Path,
    teacher_weights: str,
    student: CfgNode | None = None,
) -> CfgNode:
    cfg = student if student is not None else student_train_cfg(args, train, test)
    if cfg.MODEL.META_ARCHITECTURE == "TBDistiller":
        raise UsageError(f"{args.student} is already a distillation config; pass a student config")
    opts = [o for o in (args.opts or []) if o != "--"]
    cfg = distill_config(
        cfg,
        teacher_config,
        teacher_weights,
        test,
        teacher_amp=args.teacher_amp,
        with_baseline=getattr(args, "with_baseline", False),
        output=args.output,
        opts=opts,
    )
    schedule_rule_evaluations(
        cfg, chosen=getattr(args, "eval_period", None) is not None or "TEST.EVAL_PERIOD" in opts[::2]
    )
    return cfg


def schedule_rule_evaluations(cfg: CfgNode, chosen: bool) -> None:
    """The teacher-lead rule (DISTILL.LEAD_HD_WEIGHT) compares at periodic evaluations: when the run
    has none and the user chose no period, evaluate RULE_EVALUATIONS times (and say so)."""
    from tbd.distill.lead import RULE_EVALUATIONS, rule_eval_period

    period = None if chosen else rule_eval_period(cfg)
    if period is None:
        return
    cfg.TEST.EVAL_PERIOD = period
    console.print(
        f"evaluating every {period} iterations: DISTILL.LEAD_HD_WEIGHT raises alpha while the teacher leads "
        f"the distilled student, compared at each evaluation ({RULE_EVALUATIONS} per run unless you set "
        "--eval-period; --eval-period 0 leaves alpha at DISTILL.HD_WEIGHT)",
        soft_wrap=True,
    )


def check_inputs(cfg: CfgNode, args: argparse.Namespace) -> None:
    """Say how the teacher's inputs compare with what it was trained on; refuse a gross mismatch."""
    from tbd.distill.distiller import teacher_config
    from tbd.distill.input_check import check_teacher_inputs

    if getattr(args, "allow_input_mismatch", False):
        cfg.TBD.ALLOW_TEACHER_INPUT_MISMATCH = True
    check = check_teacher_inputs(cfg, teacher_config(cfg))
    for note in check.notes:
        console.print(f"teacher check: {note}", soft_wrap=True)
    for warning in check.warnings:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    if check.errors:
        if not cfg.TBD.ALLOW_TEACHER_INPUT_MISMATCH:
            raise UsageError(" ".join(check.errors))
        for error in check.errors:
            console.print(f"[yellow]warning (allowed):[/] {error}", soft_wrap=True)


def check_pair(cfg: CfgNode) -> None:
    """Build the distiller once before training, so a bad pair fails with a clear message."""
    from tbd.distill.distiller import TBDistiller
    from tbd.engine.checkpoint import WeightsMismatchError

    try:
        TBDistiller(cfg)
    except WeightsMismatchError as err:
        from tbd.cli.weights import mismatch_advice

        advice = mismatch_advice(
            err, "teacher", common_num_classes(cfg.DATASETS.TEST[0]), cfg.DATASETS.TEST[0]
        )
        raise UsageError(f"the teacher/student pair cannot be used: {advice}") from err
    except (FileNotFoundError, ValueError, RuntimeError, TypeError) as err:
        raise UsageError(f"the teacher/student pair cannot be used: {err}") from err


def common_num_classes(test: str) -> int:
    from tbd.data import num_classes

    return num_classes(test)


def _run(cfg: CfgNode, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``cfg`` here or in ``--num-gpus`` workers (``tbd train``'s worker); its final results."""
    from tbd.cli.train import train_worker
    from tbd.summaries import read_final_results

    if args.num_gpus * args.num_machines > 1:
        common.launch_workers(train_worker, args, cfg, args)
        return read_final_results(Path(cfg.OUTPUT_DIR))
    return train_worker(cfg, args)


def run(args: argparse.Namespace) -> int:
    from tbd import jsonio
    from tbd.cli.runrecord import restore_args, resume_config, write_run_record
    from tbd.engine.checkpoint import atomic_write_text

    # every check first (folder, data, student, teacher, the pair, the stored run): only then is the
    # folder touched, so a typo never costs the previous run
    plan = common.plan_output_dir(args.output, args.resume, args.overwrite)
    recorded = restore_args(args, Path(args.output)) if args.resume else False
    train, test = common.resolve_datasets(args)
    student = student_train_cfg(args, train, test)
    common.check_batch_per_process(student, args.num_gpus * args.num_machines)
    teacher_config, teacher_weights = resolve_teacher(args, train, test, fit=_run)
    cfg = build_distill_cfg(args, train, test, teacher_config, teacher_weights, student=student)
    check_inputs(cfg, args)
    check_pair(cfg)
    if args.resume:
        cfg = resume_config(Path(args.output), cfg, args, recorded)
    out = common.apply_output_dir(plan)
    write_run_record(out, args, getattr(args, "command_line", "tbd distill"))
    atomic_write_text(out / "config.yaml", cfg.dump())
    record_data(out, args)  # for tbd eval/harmony --run
    if getattr(args, "profile_info", None) is not None:
        common.print_profile(cfg, args.profile_info)
    console.print(
        f"[bold]tbd distill[/] {args.teacher_config or args.teacher} -> {args.student} ({args.head}) on {train} -> {out}  "
        f"({cfg.SOLVER.MAX_ITER} iterations, batch {cfg.SOLVER.IMS_PER_BATCH}, {cfg.MODEL.DEVICE})"
    )
    results = _run(cfg, args)
    summary = summarize(cfg, args, results)
    atomic_write_text(out / "summary.json", jsonio.dumps(summary, indent=2))
    console.print(f"summary written to {out / 'summary.json'}")
    return 0
