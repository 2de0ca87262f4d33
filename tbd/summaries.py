"""A distillation run's summary: the teacher's and the student's COCO AP and harmonious ratios.

:func:`summarize` evaluates the teacher on the test set (at the student's test size, and at its
own when that differs; cached beside a teacher trained here), measures the harmonious-prediction
ratios of both (``tbd.analysis.harmony``), prints the table and returns what ``summary.json``
holds. ``tbd distill`` calls it after training; a Detectron2 script calls :func:`summarize_run`
on its finished ``OUTPUT_DIR`` (``examples/train_net.py``).

``args`` names the pair as ``tbd distill``'s options do: ``teacher`` / ``teacher_config``,
``student``, ``head``, ``no_harmony`` and optionally ``teacher_cache`` (:func:`summary_options`
makes one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Mapping

from detectron2.config import CfgNode

from tbd.teachers import cache_root
from tbd.ui import console


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


def _harmony(cfg: CfgNode, model: Any, score_thresh: float = 0.5) -> dict[str, Any] | None:
    try:
        from tbd.analysis.harmony import measure_harmony
    except ImportError:
        return None
    return measure_harmony(cfg, model, cfg.DATASETS.TEST[0], score_thresh=score_thresh)


def teacher_label(args: argparse.Namespace) -> str:
    """The teacher's name in tables and summary.json: a registry name, its config's file stem, or
    for a run's own ``config.yaml`` (``tbd train``'s output) the run folder's name."""
    if not args.teacher_config:
        return args.teacher
    path = Path(args.teacher_config)
    return path.parent.name or path.stem if path.name == "config.yaml" else path.stem


_BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def alone_row(cfg: CfgNode, score_thresh: float = 0.5) -> dict[str, Any] | None:
    """The student trained alone (``--with-baseline``) at the run's last evaluation, from metrics.json:
    ``{"bbox": ..., "harmony": ..., "harmony_score0.3": ...}`` (``harmony``: at ``score_thresh``, 0.5
    or 0.3, the two the evaluations log); ``None`` without a baseline."""
    from tbd.distill.baseline import read_last_comparison

    if not cfg.DISTILL.WITH_BASELINE:
        return None
    last = read_last_comparison(Path(cfg.OUTPUT_DIR) / "metrics.json")
    if not last.get("bbox"):
        return None
    return {
        "bbox": last["bbox"],
        "harmony": last.get(f"harmony_score{score_thresh:g}"),
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


def end_note(rows: Mapping[str, Mapping[str, Any]], margin: float) -> tuple[str, str]:
    """``(level, text)`` of the end-of-run comparison (:func:`tbd.distill.baseline.gain_note`) from the
    final table's rows, all at the student's input: the distilled student, the student alone (absent
    without ``--with-baseline``) and the teacher."""
    from tbd.distill.baseline import gain_note

    alone = rows.get("student_alone")
    return gain_note(
        rows["student"].get("bbox", {}), alone["bbox"] if alone else None, margin, rows["teacher"].get("bbox")
    )


def summarize(cfg: CfgNode, args: argparse.Namespace, student_results: dict[str, Any]) -> dict[str, Any]:
    """Teacher AP, student AP and the harmonious-prediction ratios: printed and returned."""
    from detectron2.modeling import build_model
    from rich.table import Table

    from tbd.describe import describe
    from tbd.export import load_student_state, student_cfg
    from tbd.jsonio import fmt_metric, undefined_metrics_note

    teacher_results, teacher_own, (t_cfg, teacher) = _teacher_results(cfg, args)
    t_name, s_name = teacher_label(args), f"{args.student} ({args.head})"
    s_cfg = student_cfg(cfg)
    t_text, s_text = describe(t_cfg, cfg.DISTILL.TEACHER_WEIGHTS), describe(s_cfg)
    size = f"{cfg.INPUT.MIN_SIZE_TEST}/{cfg.INPUT.MAX_SIZE_TEST} px"
    rows: dict[str, dict[str, Any]] = {
        "teacher": {"bbox": teacher_results.get("bbox", {}), "input": size},
        "student": {"bbox": student_results.get("bbox", {}), "input": size},
    }
    score_thresh = float(getattr(args, "harmony_score_thresh", 0.5))
    alone = alone_row(cfg, score_thresh)
    rows = {
        "teacher": rows["teacher"],
        **({"teacher_own_input": teacher_own} if teacher_own is not None else {}),
        **({"student_alone": {**alone, "input": size}} if alone is not None else {}),
        "student": rows["student"],
    }
    if not args.no_harmony:
        rows["teacher"]["harmony"] = _harmony(t_cfg, teacher, score_thresh)
        final = Path(cfg.OUTPUT_DIR) / "model_final.pth"
        if final.is_file():
            student = build_model(s_cfg)
            student.load_state_dict(load_student_state(final))
            student.eval()
            rows["student"]["harmony"] = _harmony(s_cfg, student, score_thresh)

    table = Table(title=f"tbd distill: {t_name} -> {s_name} on {cfg.DATASETS.TEST[0]}")
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
            "teacher": f"teacher {t_name}",
            "teacher_own_input": f"teacher {t_name} (own input)",
            "student_alone": f"student {args.student} alone",
            "student": f"student {args.student} distilled"
            if alone is not None
            else f"student {args.student}",
        }[name]
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
    console.print(f"teacher {t_name}: {t_text}", soft_wrap=True)
    console.print(f"student {s_name}: {s_text}", soft_wrap=True)
    for name, row in rows.items():
        note = undefined_metrics_note(row["bbox"])
        if note:
            row["note"] = note
            console.print(f"-: {name}: {note}", soft_wrap=True)
    level, note = end_note(rows, cfg.DISTILL.BASELINE_MARGIN)
    console.print(f"[yellow]warning:[/] {note}" if level == "warning" else f"{note}", soft_wrap=True)
    alphas = alpha_history(Path(cfg.OUTPUT_DIR) / "metrics.json")
    if cfg.DISTILL.LEAD_HD_WEIGHT > 0 and cfg.DISTILL.HD_WEIGHT > 0 and cfg.DISTILL.METHOD == "tbd":
        console.print(
            alpha_note(cfg.DISTILL.HD_WEIGHT, cfg.DISTILL.LEAD_HD_WEIGHT, cfg.DISTILL.LEAD_MARGIN, alphas)
        )
    h = rows["student"].get("harmony") or rows["teacher"].get("harmony") or {}
    if h:
        console.print(
            f"harmonious: score >= {h.get('score_thresh')} and IoU >= {h.get('iou_thresh')} "
            "(see docs/HARMONY.md)"
        )
    summary = {
        "teacher": {
            "name": t_name,
            "description": t_text,
            "config": cfg.DISTILL.TEACHER_CONFIG,
            "weights": cfg.DISTILL.TEACHER_WEIGHTS,
            **rows["teacher"],
        },
        "teacher_own_input": rows.get("teacher_own_input"),
        "student": {"name": args.student, "head": args.head, "description": s_text, **rows["student"]},
        "student_alone": (
            {"name": args.student, "head": args.head, "description": s_text, **rows["student_alone"]}
            if alone is not None
            else None
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
            "lead_hd_weight": cfg.DISTILL.LEAD_HD_WEIGHT,
            "lead_margin": cfg.DISTILL.LEAD_MARGIN,
            "hd_weight_at": [{"iteration": i, "hd_weight": a} for i, a in alphas],
            "tfd_weight": cfg.DISTILL.TFD_WEIGHT,
            "mimic_weight": cfg.DISTILL.MIMIC_WEIGHT,
            "feature_norm": cfg.DISTILL.FEATURE_NORM,
            "pc_mode": cfg.DISTILL.PC_MODE,
            "tfd_mode": cfg.DISTILL.TFD_MODE,
            "gate": cfg.DISTILL.GATE,
            "with_baseline": cfg.DISTILL.WITH_BASELINE,
            "baseline_guard": cfg.DISTILL.BASELINE_GUARD,
            "weight_schedule": cfg.DISTILL.WEIGHT_SCHEDULE,
        },
    }
    return summary


def alpha_history(metrics_json: Path) -> list[tuple[int, float]]:
    """``(iteration, alpha)`` of every choice of the teacher-lead rule logged in ``metrics.json``
    (``tbd/hd_weight``); empty when the rule is off or the run has no such file."""
    from tbd.distill.baseline import metrics_rows

    return [
        (int(row.get("iteration", -1)), float(row["tbd/hd_weight"]))
        for row in metrics_rows(metrics_json)
        if "tbd/hd_weight" in row
    ]


def alpha_note(hd_weight: float, lead: float, margin: float, alphas: list[tuple[int, float]]) -> str:
    """One line on what the teacher-lead rule did: α at the start and each change, with its iteration."""
    rule = f"DISTILL.LEAD_HD_WEIGHT {lead:g} while the teacher leads the distilled student by more than {margin:g} AP"
    if not alphas:
        return f"alpha stayed {hd_weight:g}: no periodic evaluation, so the rule ({rule}) never compared"
    changes, current = [], hd_weight
    for iteration, alpha in alphas:
        if alpha != current:
            changes.append(f"{current:g} -> {alpha:g} after iteration {iteration + 1}")
            current = alpha
    if not changes:
        return f"alpha stayed {hd_weight:g} ({rule}: it did not, at {len(alphas)} evaluation(s))"
    return f"alpha {', '.join(changes)} ({rule})"


def summary_options(
    student: str,
    head: str,
    teacher: str = "",
    teacher_config: str | None = None,
    harmony: bool = True,
    teacher_cache: str | None = None,
    harmony_score_thresh: float = 0.5,
) -> argparse.Namespace:
    """The ``args`` of :func:`summarize` for a caller without ``tbd distill``'s options: the names
    in the table (a teacher named by its config file when ``teacher_config`` is given)."""
    return argparse.Namespace(
        teacher=teacher,
        teacher_config=teacher_config,
        student=student,
        head=head,
        no_harmony=not harmony,
        teacher_cache=teacher_cache,
        harmony_score_thresh=harmony_score_thresh,
    )


def read_final_results(out: Path) -> dict[str, Any]:
    """Final evaluation as the main process wrote it to metrics.json (multi-process runs)."""
    metrics = out / "metrics.json"
    if not metrics.exists():
        return {}
    last: dict[str, Any] = {}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if any(k.startswith("bbox/") for k in row):
            last = row
    return {"bbox": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("bbox/")}}


def summarize_run(cfg: CfgNode, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`summarize` of the finished run in ``cfg.OUTPUT_DIR`` (the student's final results read
    from its metrics.json), written to ``summary.json`` there; returns the summary."""
    from tbd import jsonio
    from tbd.engine.atomic import atomic_write_text

    out = Path(cfg.OUTPUT_DIR)
    summary = summarize(cfg, args, read_final_results(out))
    atomic_write_text(out / "summary.json", jsonio.dumps(summary, indent=2))
    return summary
