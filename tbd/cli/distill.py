"""``tbd distill``: teacher -> student Task-Balanced Distillation, end to end."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from detectron2.config import CfgNode

from tbd.cli import common
from tbd.cli.common import UsageError, console
from tbd.cli.rundata import record_data


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


def cache_root(args: argparse.Namespace) -> Path:
    if getattr(args, "teacher_cache", None):
        return Path(args.teacher_cache)
    return Path(os.environ.get("TBD_CACHE", Path.home() / ".cache" / "tbd")) / "teachers"


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


def resolve_teacher(args: argparse.Namespace, train: str, test: str) -> tuple[Path, str]:
    """(teacher config, teacher weights): from flags, the registry, or by training it here."""
    from tbd.config import resolve_config_path
    from tbd.registry import RegistryError, dataset_key, teacher_spec

    if args.teacher_config:
        if not args.teacher_weights:
            raise UsageError("--teacher-config needs --teacher-weights (the checkpoint of that teacher)")
        try:
            config = resolve_config_path(args.teacher_config)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from err
        return config, _local_weights(args.teacher_weights)
    try:
        spec, entry = teacher_spec(args.teacher, dataset_key(train))
    except RegistryError as err:
        hint = ""
        if dataset_key(train).startswith("user_"):
            hint = (
                ". For your own data, train a teacher on it first, e.g. `tbd train --model r101 --head "
                "retinanet --train-json ... --output runs/teacher`, then pass --teacher-config "
                "runs/teacher/config.yaml --teacher-weights runs/teacher/model_final.pth"
            )
        raise UsageError(f"{err}{hint}") from err
    if args.teacher_weights:
        return spec.config, _local_weights(args.teacher_weights)
    if not entry.trains_here:
        return spec.config, entry.weights
    iters = args.teacher_iters or entry.train_iters or 3000
    return spec.config, train_teacher_here(args, spec, iters, train, test)


def _local_weights(path: str) -> str:
    if "://" not in path and not Path(path).is_file():
        raise UsageError(f"--teacher-weights {path} does not exist")
    return path


def train_teacher_here(args: argparse.Namespace, spec: Any, iters: int, train: str, test: str) -> str:
    """Train (or finish training, or reuse) the cached teacher for this dataset and schedule."""
    from tbd.config import load_config
    from tbd.data import TRAIN_NAME

    cfg = load_config(spec.config, spec.opts)
    targs = argparse.Namespace(**vars(args))
    targs.iters, targs.opts, targs.resume, targs.lr, targs.eval_period = iters, [], False, None, 0
    targs.seed = 0  # one teacher for every student seed (the benchmarks compare seeds against it)
    common.apply_common(cfg, targs, train, test)
    data_tag = f"{train}{args.num_train_images}" if train == TRAIN_NAME else train
    # the key holds everything that shapes the teacher (data version, schedule, solver, seed)
    out = cache_root(args) / f"{spec.name}_{data_tag}_{iters}it_{teacher_key(cfg)}"
    final = out / "model_final.pth"
    if final.is_file():
        console.print(f"teacher [bold]{spec.name}[/]: using the cached checkpoint {final}")
        return str(final)
    earlier = equivalent_cached_teacher(out, cfg)
    if earlier is not None:
        console.print(
            f"teacher [bold]{spec.name}[/]: using the cached checkpoint {earlier} (trained with the "
            "same settings by an earlier tbd version, whose config lacked keys added since)"
        )
        return str(earlier)
    resume = (out / "last_checkpoint").is_file()
    console.print(
        f"teacher [bold]{spec.name}[/] has no checkpoint for {train}: "
        f"{'resuming' if resume else 'training'} it here ({iters} iterations) -> {out}"
    )
    from tbd.data import GENERATOR_VERSION
    from tbd.engine.checkpoint import atomic_write_text

    targs.resume = resume
    common.check_batch_per_process(cfg, args.num_gpus * args.num_machines)
    cfg.OUTPUT_DIR = str(out)
    if resume:
        _check_cached_teacher_resume(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / GENERATOR_MARKER, f"{GENERATOR_VERSION}\n")
    atomic_write_text(out / "config.yaml", cfg.dump())
    _run(cfg, targs)
    if not final.is_file():
        raise UsageError(f"training the teacher did not produce {final}; see {out / 'log.txt'}")
    return str(final)


def _check_cached_teacher_resume(out: Path, cfg: CfgNode) -> None:
    """A half-trained cached teacher is continued only if its stored config is this one."""
    from tbd.config import load_config
    from tbd.engine.resume_check import config_differences

    stored = out / "config.yaml"
    try:
        diffs = config_differences(load_config(stored), cfg) if stored.is_file() else []
    except Exception:  # unreadable by this version: not provably the same teacher
        diffs = [("config.yaml", "unreadable", "")]
    if diffs:
        listed = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, a, b in diffs)
        raise UsageError(
            f"the half-trained teacher in {out} was started with other settings ({listed}); remove that "
            "cache folder (or pass --teacher-cache elsewhere) to train it anew"
        )


_NOT_TEACHER_KEYS = ("OUTPUT_DIR", "MODEL.DEVICE")  # where and on what it trains


def teacher_settings(cfg: CfgNode) -> dict[str, Any]:
    """Every config value that shapes a teacher's training, by dotted key.

    The distillation keys (and their defaults) do not train a teacher, nor do the output folder and
    the device (a teacher trained on the GPU serves a CPU run too).
    """
    from tbd.engine.resume_check import flat

    return {
        key: value
        for key, value in flat(cfg).items()
        if key not in _NOT_TEACHER_KEYS and not key.startswith("DISTILL.")
    }


def teacher_key(cfg: CfgNode) -> str:
    """Short hash of a teacher's training settings and of the embedded dataset's generator version.

    Hashed from sorted (key, value) pairs, not from ``cfg.dump()``: a dump's text depends on which
    lists happen to be shared objects (YAML anchors), which says nothing about the teacher.
    """
    from tbd.data import GENERATOR_VERSION

    text = json.dumps(teacher_settings(cfg), sort_keys=True, default=str)
    return hashlib.sha1(f"{text}\nshapes v{GENERATOR_VERSION}".encode()).hexdigest()[:8]


def equivalent_cached_teacher(out: Path, cfg: CfgNode) -> Path | None:
    """A finished teacher of the same name, data and schedule trained with the same settings.

    The cache key changes whenever a tbd release adds config keys, so without this an upgrade would
    retrain every cached teacher. A sibling folder qualifies when every key its stored config.yaml
    sets has today's value (keys added since are not in that file and are ignored; a default that
    changed since is in it and still tells the two apart).
    """
    import yaml

    from tbd.config import load_config
    from tbd.data import GENERATOR_VERSION

    want = teacher_settings(cfg)
    stem = out.name.rsplit("_", 1)[0]
    for candidate in sorted(out.parent.glob(f"{stem}_*")):
        final, stored = candidate / "model_final.pth", candidate / "config.yaml"
        if candidate == out or not (final.is_file() and stored.is_file()):
            continue
        if _stored_generator_version(candidate) != GENERATOR_VERSION:
            continue  # unknown or another embedded dataset: not provably the same teacher
        try:
            written = yaml.safe_load(stored.read_text())
            earlier = teacher_settings(load_config(stored))
        except Exception:  # a key removed since, or an unreadable file: not this teacher
            continue
        keys = [k for k in _yaml_keys(written) if k in earlier]
        if keys and all(k in want and want[k] == earlier[k] for k in keys):
            return final
    return None


def _yaml_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix[:-1]] if prefix else []
    return [k for key, value in node.items() for k in _yaml_keys(value, f"{prefix}{key}.")]


GENERATOR_MARKER = "generator_version.txt"


def _stored_generator_version(folder: Path) -> int | None:
    """The embedded dataset's generator version a cached teacher was trained with, if known.

    Teachers trained since this marker exists record it; older ones named the dataset's folder
    (``tbd_shapes/v<version>-...``) in their log.
    """
    import re

    try:
        return int((folder / GENERATOR_MARKER).read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        found = re.search(r"tbd_shapes/v(\d+)-", (folder / "log.txt").read_text(errors="replace"))
    except OSError:
        return None
    return int(found.group(1)) if found else None


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
    from tbd.config import load_config

    cfg = student if student is not None else student_train_cfg(args, train, test)
    student_arch = cfg.MODEL.META_ARCHITECTURE
    if student_arch == "TBDistiller":
        raise UsageError(f"{args.student} is already a distillation config; pass a student config")
    # the teacher's config is adapted the same way (class count, device, datasets)
    t_cfg = load_config(teacher_config)
    before = dict(common.flat_items(t_cfg))
    common.set_num_classes(t_cfg, common_num_classes(test))
    t_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher_opts = [x for k, v in common.flat_items(t_cfg) if before.get(k) != v for x in (k, str(v))]

    cfg.MODEL.META_ARCHITECTURE = "TBDistiller"
    cfg.DISTILL.STUDENT_META_ARCHITECTURE = student_arch
    cfg.DISTILL.TEACHER_CONFIG = str(teacher_config)
    cfg.DISTILL.TEACHER_WEIGHTS = teacher_weights
    cfg.DISTILL.TEACHER_OPTS = teacher_opts
    if args.teacher_amp is not None:
        cfg.DISTILL.TEACHER_AMP = args.teacher_amp
    if getattr(args, "with_baseline", False):
        cfg.DISTILL.WITH_BASELINE = True
    cfg.OUTPUT_DIR = str(args.output)
    # user overrides last, so DISTILL.* can be set on the command line
    opts = [o for o in (args.opts or []) if o != "--"]
    if opts:
        cfg.merge_from_list(opts)
        if "DISTILL.TEACHER_OPTS" in opts[::2]:  # the user's teacher overrides come after the data's
            cfg.DISTILL.TEACHER_OPTS = teacher_opts + list(cfg.DISTILL.TEACHER_OPTS)
    return cfg


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
    from tbd.cli.train import _read_final_results, train_worker

    if args.num_gpus * args.num_machines > 1:
        common.launch_workers(train_worker, args, cfg, args)
        return _read_final_results(Path(cfg.OUTPUT_DIR))
    return train_worker(cfg, args)


def _teacher_results(
    cfg: CfgNode, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any] | None, Any]:
    """The teacher's COCO results on the test set at the student's test size (the inputs the
    distillation used) and, when its own test size differs, at its own; plus (config, model).

    Results are cached beside a teacher trained here; user files are left alone. The second
    item is ``{"bbox": ..., "input": "800/1333 px"}`` or ``None``.
    """
    from detectron2.modeling import build_model

    from tbd import jsonio
    from tbd.distill.distiller import load_teacher_weights, teacher_config
    from tbd.engine.checkpoint import atomic_write_text
    from tbd.engine.trainer import Trainer

    own_cfg = teacher_config(cfg)
    own_cfg.DATASETS.TEST = cfg.DATASETS.TEST
    model = build_model(own_cfg)
    load_teacher_weights(model, cfg.DISTILL.TEACHER_WEIGHTS)
    model.eval()
    t_cfg = own_cfg.clone()
    t_cfg.INPUT.MIN_SIZE_TEST, t_cfg.INPUT.MAX_SIZE_TEST = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    weights = Path(cfg.DISTILL.TEACHER_WEIGHTS).resolve()
    ours = cache_root(args).resolve() in weights.parents

    def evaluate(c: CfgNode, tag: str) -> dict[str, Any]:
        name = f"eval_{cfg.DATASETS.TEST[0]}_{c.INPUT.MIN_SIZE_TEST}x{c.INPUT.MAX_SIZE_TEST}.json"
        cache = weights.with_name(name) if ours else None
        if cache is not None and cache.is_file():
            return json.loads(cache.read_text())
        c.OUTPUT_DIR = str(Path(cfg.OUTPUT_DIR) / tag)
        results = dict(Trainer.test(c, model))
        if cache is not None:
            atomic_write_text(cache, jsonio.dumps(results))
        return results

    at_student = evaluate(t_cfg, "teacher_eval")
    same = (own_cfg.INPUT.MIN_SIZE_TEST, own_cfg.INPUT.MAX_SIZE_TEST) == (
        t_cfg.INPUT.MIN_SIZE_TEST,
        t_cfg.INPUT.MAX_SIZE_TEST,
    )
    at_own = None
    if not same:
        at_own = {
            "bbox": evaluate(own_cfg, "teacher_eval_own_size").get("bbox", {}),
            "input": f"{own_cfg.INPUT.MIN_SIZE_TEST}/{own_cfg.INPUT.MAX_SIZE_TEST} px",
        }
    return at_student, at_own, (t_cfg, model)


def _harmony(cfg: CfgNode, model: Any) -> dict[str, Any] | None:
    try:
        from tbd.analysis.harmony import measure_harmony
    except ImportError:
        return None
    return measure_harmony(cfg, model, cfg.DATASETS.TEST[0])


def teacher_label(args: argparse.Namespace) -> str:
    """The teacher's name in tables and summary.json: a registry name, its config's file stem, or
    for a run's own ``config.yaml`` (``tbd train``'s output) the run folder's name."""
    if not args.teacher_config:
        return args.teacher
    path = Path(args.teacher_config)
    return path.parent.name or path.stem if path.name == "config.yaml" else path.stem


_BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def alone_row(cfg: CfgNode) -> dict[str, Any] | None:
    """The student trained alone (``--with-baseline``) at the run's last evaluation, from metrics.json:
    ``{"bbox": ..., "harmony": ..., "harmony_score0.3": ...}``; ``None`` without a baseline."""
    from tbd.distill.baseline import read_last_comparison

    if not cfg.DISTILL.WITH_BASELINE:
        return None
    last = read_last_comparison(Path(cfg.OUTPUT_DIR) / "metrics.json")
    if not last.get("bbox"):
        return None
    return {
        "bbox": last["bbox"],
        "harmony": last.get("harmony_score0.5"),
        "harmony_score0.3": last.get("harmony_score0.3"),
        "iteration": last.get("iteration"),
    }


def gain_of(distilled: dict[str, Any], alone: dict[str, Any]) -> dict[str, float | None]:
    """Distilled minus alone for every COCO box metric; ``None`` (JSON null) where either is undefined."""
    import math

    def defined(v: Any) -> bool:
        return v is not None and math.isfinite(float(v))

    return {
        k: float(distilled[k]) - float(alone[k])
        if defined(distilled.get(k)) and defined(alone.get(k))
        else None
        for k in _BBOX_KEYS
    }


def summarize(cfg: CfgNode, args: argparse.Namespace, student_results: dict[str, Any]) -> dict[str, Any]:
    """Teacher AP, student AP and the harmonious-prediction ratios: printed and returned."""
    from detectron2.modeling import build_model
    from rich.table import Table

    from tbd.distill.baseline import gain_note
    from tbd.export import load_student_state, student_cfg
    from tbd.jsonio import fmt_metric, undefined_metrics_note

    teacher_results, teacher_own, (t_cfg, teacher) = _teacher_results(cfg, args)
    size = f"{cfg.INPUT.MIN_SIZE_TEST}/{cfg.INPUT.MAX_SIZE_TEST} px"
    rows: dict[str, dict[str, Any]] = {
        "teacher": {"bbox": teacher_results.get("bbox", {}), "input": size},
        "student": {"bbox": student_results.get("bbox", {}), "input": size},
    }
    alone = alone_row(cfg)
    rows = {
        "teacher": rows["teacher"],
        **({"teacher_own_input": teacher_own} if teacher_own is not None else {}),
        **({"student_alone": {**alone, "input": size}} if alone is not None else {}),
        "student": rows["student"],
    }
    if not args.no_harmony:
        rows["teacher"]["harmony"] = _harmony(t_cfg, teacher)
        final = Path(cfg.OUTPUT_DIR) / "model_final.pth"
        if final.is_file():
            s_cfg = student_cfg(cfg)
            student = build_model(s_cfg)
            student.load_state_dict(load_student_state(final))
            student.eval()
            rows["student"]["harmony"] = _harmony(s_cfg, student)

    table = Table(
        title=f"tbd distill: {teacher_label(args)} -> {args.student} ({args.head}) on {cfg.DATASETS.TEST[0]}"
    )
    table.add_column("model")
    table.add_column("test input")
    for col in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        table.add_column(col, justify="right")
    table.add_column("harmonious share", justify="right")
    table.add_column("mean HS", justify="right")
    for name, row in rows.items():
        bbox = row["bbox"]
        h = row.get("harmony") or {}
        share = h.get("harmonious_share")
        mean_hs = h.get("mean_hs_easy", h.get("mean_hs"))
        label = {
            "teacher_own_input": "teacher (own input)",
            "student_alone": "student alone",
            "student": "distilled student" if alone is not None else "student",
        }.get(name, name)
        table.add_row(
            label,
            row["input"],
            *(fmt_metric(bbox.get(k)) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")),
            "-" if share is None else f"{100 * share:.1f}%",
            "-" if mean_hs is None else f"{mean_hs:.3f}",
        )
    if alone is not None:
        gain = gain_of(rows["student"].get("bbox", {}), alone["bbox"])
        table.add_row(
            "gain (distilled − alone)",
            "",
            *("-" if gain[k] is None else f"{gain[k]:+.1f}" for k in _BBOX_KEYS),
            "",
            "",
        )
    console.print(table)
    for name, row in rows.items():
        note = undefined_metrics_note(row["bbox"])
        if note:
            row["note"] = note
            console.print(f"-: {name}: {note}", soft_wrap=True)
    level, note = gain_note(
        rows["student"].get("bbox", {}), alone["bbox"] if alone else None, cfg.DISTILL.BASELINE_MARGIN
    )
    console.print(f"[yellow]warning:[/] {note}" if level == "warning" else f"{note}", soft_wrap=True)
    h = rows["student"].get("harmony") or rows["teacher"].get("harmony") or {}
    if h:
        console.print(
            f"harmonious: score >= {h.get('score_thresh')} and IoU >= {h.get('iou_thresh')} "
            "(see docs/HARMONY.md)"
        )
    summary = {
        "teacher": {"name": teacher_label(args), "config": cfg.DISTILL.TEACHER_CONFIG, **rows["teacher"]},
        "teacher_own_input": rows.get("teacher_own_input"),
        "student": {"name": args.student, "head": args.head, **rows["student"]},
        "student_alone": (
            {"name": args.student, "head": args.head, **rows["student_alone"]} if alone is not None else None
        ),
        "gain": (
            {
                "bbox": gain,
                "margin_AP": cfg.DISTILL.BASELINE_MARGIN,
                "verdict": level,
                "note": note,
            }
            if alone is not None
            else {"bbox": None, "note": note}
        ),
        "profile": {
            "name": cfg.TBD.PROFILE,
            "input_size_rule": cfg.TBD.INPUT_SIZE_RULE,
            "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN),
            "max_size_train": cfg.INPUT.MAX_SIZE_TRAIN,
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
            "weights": cfg.MODEL.WEIGHTS,
        },
        "dataset": {"train": cfg.DATASETS.TRAIN[0], "test": cfg.DATASETS.TEST[0]},
        "iterations": cfg.SOLVER.MAX_ITER,
        "distill": {
            "method": cfg.DISTILL.METHOD,
            "hd_weight": cfg.DISTILL.HD_WEIGHT,
            "tfd_weight": cfg.DISTILL.TFD_WEIGHT,
            "mimic_weight": cfg.DISTILL.MIMIC_WEIGHT,
            "feature_norm": cfg.DISTILL.FEATURE_NORM,
            "pc_mode": cfg.DISTILL.PC_MODE,
            "tfd_mode": cfg.DISTILL.TFD_MODE,
            "gate": cfg.DISTILL.GATE,
            "with_baseline": cfg.DISTILL.WITH_BASELINE,
            "baseline_guard": cfg.DISTILL.BASELINE_GUARD,
        },
    }
    return summary


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
    teacher_config, teacher_weights = resolve_teacher(args, train, test)
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
