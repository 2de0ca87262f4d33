#!/usr/bin/env python
"""Accuracy side by side: baseline, TBD ablations and peer baselines, several seeds, one schedule.

Every (variant, seed) is one run of the ``tbd`` CLI in its own directory ``--out/<variant>/seed<S>``:

- ``baseline``: ``tbd train --model r18 --head H`` (no distillation), then ``tbd harmony --run``;
- every other variant: ``tbd distill --teacher T --student r18 --head H -- DISTILL.<...>``, whose
  ``summary.json`` holds the teacher's and the student's AP and harmonious ratios.

The same ``--seed S`` is passed to every variant of seed index S (same data order and init). The
teacher is trained once by the first distill run and cached (``--teacher-cache``); every later run
reuses it. A run whose results already exist is skipped and an interrupted one is resumed, so the
script can be re-run in the background until everything is done. At the end it prints mean ± std
over seeds (AP, AP50, AP75, harmonious share, mean HS of the easy predictions) and writes json.

Tiny check (minutes):

    .venv/bin/python scripts/bench_accuracy.py --seeds 0 --iters 2 --batch-size 2 \\
        --num-train-images 8 --num-val-images 8 --teacher r50 --teacher-iters 2 \\
        --variants baseline mimic_mse --out /tmp/bench_acc_tiny

The long command is in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tbd import jsonio

ROOT = Path(__file__).resolve().parent.parent

#: variant -> (None for ``tbd train``, else the DISTILL overrides of ``tbd distill``)
VARIANTS: dict[str, list[str] | None] = {
    "baseline": None,
    "hd_only": ["DISTILL.TFD_WEIGHT", "0.0"],
    "tfd_fixed": ["DISTILL.HD_WEIGHT", "0.0", "DISTILL.TFD_MODE", "fixed"],
    "tfd_twg": ["DISTILL.HD_WEIGHT", "0.0", "DISTILL.TFD_MODE", "twg"],
    "tbd_full": [],
    # mimic_mse averages its levels where TFD and cls_mask_mimic sum them: at the start its raw value
    # is ~1/5 of theirs (docs/BENCHMARKS.md), so 5x the weight gives every feature loss the same budget
    "mimic_mse": ["DISTILL.METHOD", "mimic_mse", "DISTILL.MIMIC_WEIGHT", "2.0"],
    "cls_mask_mimic": ["DISTILL.METHOD", "cls_mask_mimic"],
}
PC_MODES = ("sigmoid", "softmax_max1", "spatial_softmax")
METRICS = ("AP", "AP50", "AP75", "harmonious_share", "mean_hs_easy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_accuracy"), help="one folder per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--pc-modes",
        nargs="*",
        default=[],
        choices=PC_MODES,
        help="also run tbd_full with each of these DISTILL.PC_MODE values (variant tbd_full_pc_<mode>)",
    )
    p.add_argument(
        "--teacher",
        default="mnv2in",
        help="teacher name (tbd teachers; default mnv2in: MobileNetV2-FPN from ImageNet, which needs "
        "torchvision's mobilenet_v2 file offline, docs/BACKBONES.md); r50 or r101 from scratch",
    )
    p.add_argument(
        "--teacher-iters",
        type=int,
        help="iterations of the cached teacher (default: the registry's train_iters)",
    )
    p.add_argument("--teacher-cache", type=Path, help="teacher cache (default: the CLI's)")
    p.add_argument("--student", default="r18")
    p.add_argument("--head", default="tal", help="student head for every variant (default tal)")
    p.add_argument(
        "--student-weights",
        default="",
        help="initial student weights for every variant (e.g. torchvision://mobilenet_v2; default: "
        "the student profile's, i.e. from scratch on the embedded data)",
    )
    p.add_argument("--iters", type=int, default=3000, help="student iterations (all variants)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-train-images", type=int, default=2000)
    p.add_argument("--num-val-images", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="OMP/torch threads per run (0: leave as is)")
    p.add_argument("--json", type=Path, help="results json (default: --out/accuracy.json)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--table-only", action="store_true", help="only collect what exists and print it")
    p.add_argument(
        "--measure-only",
        action="store_true",
        help="train nothing: only the --harmony-score-thresh measurements of finished runs, then the table",
    )
    p.add_argument(
        "--harmony-score-thresh",
        type=float,
        nargs="*",
        default=[],
        metavar="T",
        help="also measure every finished run's (and the teacher's) harmonious share with "
        "'easily classified' = score >= T (tbd harmony --score-thresh), for students whose scores "
        "stay below the default 0.5 after a short schedule",
    )
    p.add_argument(
        "opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="extra config overrides for every run"
    )
    return p.parse_args(argv)


def variant_overrides(args: argparse.Namespace) -> dict[str, list[str] | None]:
    chosen = {v: VARIANTS[v] for v in args.variants}
    for mode in args.pc_modes:
        chosen[f"tbd_full_pc_{mode}"] = ["DISTILL.PC_MODE", mode]
    return chosen


def _tbd() -> list[str]:
    return [sys.executable, "-m", "tbd.cli.main"]


def _dataset_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--num-train-images",
        str(args.num_train_images),
        "--num-val-images",
        str(args.num_val_images),
        "--device",
        args.device,
    ]


def _common_flags(args: argparse.Namespace, seed: int) -> list[str]:
    schedule = ["--iters", str(args.iters), "--batch-size", str(args.batch_size), "--seed", str(seed)]
    return schedule + _dataset_flags(args)


def _extra_opts(args: argparse.Namespace) -> list[str]:
    return [o for o in (args.opts or []) if o != "--"]


def run_commands(
    args: argparse.Namespace, variant: str, overrides: list[str] | None, seed: int, run_dir: Path
) -> list[list[str]]:
    """The CLI commands of one run (``--resume`` added when an interrupted run is found)."""
    resume = ["--resume"] if (run_dir / "last_checkpoint").is_file() else []
    common = _common_flags(args, seed)
    extra = _extra_opts(args)
    if overrides is None:
        train = [*_tbd(), "train", "--model", args.student, "--head", args.head, "-o", str(run_dir)]
        train += [*resume, *common]
        if args.student_weights:
            train += ["--weights", args.student_weights]
        if extra:
            train += ["--", *extra]
        harmony = [*_tbd(), "harmony", "--run", f"student={run_dir}", "-o", str(run_dir / "harmony")]
        harmony += _dataset_flags(args)
        cmds = [] if (run_dir / "results.json").is_file() else [train]
        return cmds + [harmony]
    cmd = [*_tbd(), "distill", "--teacher", args.teacher]
    if args.teacher_iters:
        cmd += ["--teacher-iters", str(args.teacher_iters)]
    cmd += ["--student", args.student, "--head", args.head, "-o", str(run_dir), *resume, *common]
    if args.teacher_cache:
        cmd += ["--teacher-cache", str(args.teacher_cache)]
    if args.student_weights:
        cmd += ["--student-weights", args.student_weights]
    cmd += ["--", *overrides, *extra]
    return [cmd]


def is_done(run_dir: Path, overrides: list[str] | None) -> bool:
    if overrides is None:
        return (run_dir / "results.json").is_file() and (run_dir / "harmony" / "harmony.json").is_file()
    return (run_dir / "summary.json").is_file()


def thresh_dir(thresh: float) -> str:
    return f"harmony_s{thresh:g}"


def harmony_commands(
    args: argparse.Namespace, variants: dict[str, list[str] | None]
) -> list[tuple[Path, list[str]]]:
    """(output folder, command) of every missing extra-threshold harmony measurement.

    One per finished run and threshold, plus one per threshold for the teacher (its config and
    weights are read from the first finished distillation run's ``config.yaml``).
    """
    todo: list[tuple[Path, list[str]]] = []
    teacher: tuple[str, str] | None = None
    for name, overrides in variants.items():
        for seed in args.seeds:
            run_dir = args.out / name / f"seed{seed}"
            if not is_done(run_dir, overrides):
                continue
            if overrides is not None and teacher is None:
                teacher = teacher_of(run_dir)
            todo += _missing_harmony(args, run_dir, ["--run", f"student={run_dir}"])
    if teacher is not None:
        todo += _missing_harmony(
            args, args.out / "teacher", ["--model", f"teacher={teacher[0]}:{teacher[1]}"]
        )
    return todo


def _missing_harmony(
    args: argparse.Namespace, folder: Path, model: list[str]
) -> list[tuple[Path, list[str]]]:
    """``tbd harmony`` of one model at every --harmony-score-thresh not yet measured in ``folder``."""
    todo = []
    for t in args.harmony_score_thresh:
        out = folder / thresh_dir(t)
        if not (out / "harmony.json").is_file():
            cmd = [
                *_tbd(),
                "harmony",
                *model,
                "--score-thresh",
                f"{t:g}",
                "-o",
                str(out),
                *_dataset_flags(args),
            ]
            todo.append((out, cmd))
    return todo


def teacher_of(run_dir: Path) -> tuple[str, str]:
    """(config, weights) of the teacher a distillation run used."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return cfg["DISTILL"]["TEACHER_CONFIG"], cfg["DISTILL"]["TEACHER_WEIGHTS"]


def execute(cmds: list[list[str]], run_dir: Path, threads: int) -> float:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "bench_stdout.log", "a") as log:
        for cmd in cmds:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                raise RuntimeError(f"exit {rc}: {' '.join(cmd)} (log: {run_dir / 'bench_stdout.log'})")
    return time.perf_counter() - t0


def attempt(
    key: str,
    cmds: list[list[str]],
    run_dir: Path,
    threads: int,
    wall: dict[str, float],
    failures: dict[str, str],
) -> None:
    """Run one job, recording its wall time or its failure (one failed job must not lose the others)."""
    try:
        wall[key] = execute(cmds, run_dir, threads)
        print(f"[{key}] done in {wall[key]:.0f}s", flush=True)
    except RuntimeError as err:
        failures[key] = str(err)
        print(f"[{key}] FAILED: {err}", flush=True)


# ---------------------------------------------------------------------------- collecting results
def _row(bbox: dict[str, Any], harmony: dict[str, Any] | None) -> dict[str, float | None]:
    h = harmony or {}
    row: dict[str, float | None] = {k: _num(bbox.get(k)) for k in ("AP", "AP50", "AP75")}
    row["harmonious_share"] = _num(h.get("harmonious_share"))
    row["mean_hs_easy"] = _num(h.get("mean_hs_easy", h.get("mean_hs")))
    return row


def _num(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def extra_harmony(folder: Path, thresholds: list[float]) -> dict[str, float | None]:
    """``harmonious_share@T`` and ``mean_hs_easy@T`` read from ``folder/harmony_sT/harmony.json``."""
    row: dict[str, float | None] = {}
    for t in thresholds:
        path = folder / thresh_dir(t) / "harmony.json"
        h = next(iter(json.loads(path.read_text())["models"].values())) if path.is_file() else {}
        row[f"harmonious_share@{t:g}"] = _num(h.get("harmonious_share"))
        row[f"mean_hs_easy@{t:g}"] = _num(h.get("mean_hs_easy", h.get("mean_hs")))
    return row


def training_stats(run_dir: Path) -> dict[str, float | None]:
    """From a run's ``metrics.json`` (read by ``tbd plot``'s reader): median step time, and at the last
    logged step the share of the distillation losses in the total loss and TWG's ω_c averaged over
    levels (``None`` if absent)."""
    from tbd.analysis.curves import DISTILL_LOSSES, TWG_PREFIX, RunDataError, load_run

    try:
        run = load_run(run_dir)
    except RunDataError:
        return {"step_s": None, "distill_share_last": None, "twg_w_cls_last": None}
    times = run.scalars.get("time", {})
    totals = run.scalars.get("total_loss", {})
    steps = sorted(set(times) & set(totals))
    share = twg = None
    if steps:
        last = steps[-1]
        total = totals[last]
        share = sum(run.scalars.get(k, {}).get(last, 0.0) for k in DISTILL_LOSSES) / total if total else None
        w = [v[last] for k, v in run.scalars.items() if k.startswith(TWG_PREFIX) and last in v]
        twg = statistics.fmean(w) if w else None
    return {
        "step_s": statistics.median(times[i] for i in steps) if steps else None,
        "distill_share_last": share,
        "twg_w_cls_last": twg,
    }


def read_run(
    run_dir: Path, overrides: list[str] | None, thresholds: list[float] | None = None
) -> dict[str, Any] | None:
    """``{"student": row, "teacher": row | None, "training": stats}`` of a finished run, else ``None``."""
    if not is_done(run_dir, overrides):
        return None
    extra = extra_harmony(run_dir, thresholds or [])
    training = training_stats(run_dir)
    if overrides is None:
        bbox = json.loads((run_dir / "results.json").read_text()).get("bbox", {})
        models = json.loads((run_dir / "harmony" / "harmony.json").read_text())["models"]
        student = {**_row(bbox, next(iter(models.values()))), **extra}
        return {"student": student, "teacher": None, "training": training}
    s = json.loads((run_dir / "summary.json").read_text())
    return {
        "student": {**_row(s["student"].get("bbox", {}), s["student"].get("harmony")), **extra},
        "teacher": _row(s["teacher"].get("bbox", {}), s["teacher"].get("harmony")),
        "training": training,
    }


def aggregate(
    rows: list[dict[str, float | None]], thresholds: list[float] | None = None
) -> dict[str, dict[str, float | int | None]]:
    out: dict[str, dict[str, float | int | None]] = {}
    extra = [f"{k}@{t:g}" for t in thresholds or [] for k in ("harmonious_share", "mean_hs_easy")]
    for m in (*METRICS, *extra):
        vals = [r[m] for r in rows if r.get(m) is not None]
        out[m] = {
            "mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None),
            "n": len(vals),
        }
    return out


def _fmt(stat: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def format_table(
    table: dict[str, dict[str, Any]], n_seeds: dict[str, int], thresholds: list[float] | None = None
) -> str:
    thresholds = thresholds or []
    head = f"| {'variant':<28} | seeds | {'AP':>11} | {'AP50':>11} | {'AP75':>11} | {'harm. %':>11} "
    head += f"| {'mean HS easy':>13} "
    for t in thresholds:
        head += f"| {f'harm. % @{t:g}':>13} | {f'HS easy @{t:g}':>13} "
    head += "| ΔAP vs baseline |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    base = table.get("baseline", {}).get("AP", {}).get("mean")
    missing = {"mean": None}
    for name, stats in table.items():
        ap = stats["AP"]["mean"]
        delta = "-" if ap is None or base is None or name == "baseline" else f"{ap - base:+.1f}"
        line = (
            f"| {name:<28} | {n_seeds.get(name, 0):>5} | {_fmt(stats['AP']):>11} | {_fmt(stats['AP50']):>11} "
            f"| {_fmt(stats['AP75']):>11} | {_fmt(stats['harmonious_share'], 100):>11} "
            f"| {_fmt(stats['mean_hs_easy'], 1, 3):>13} "
        )
        for t in thresholds:
            share = stats.get(f"harmonious_share@{t:g}", missing)
            line += f"| {_fmt(share, 100):>13} | {_fmt(stats.get(f'mean_hs_easy@{t:g}', missing), 1, 3):>13} "
        lines.append(line + f"| {delta:>15} |")
    return "\n".join(lines)


def plot_accuracy(
    per_variant: dict[str, list[dict[str, float | None]]],
    teacher: dict[str, float | None] | None,
    path: Path,
    title: str,
) -> Path:
    """AP per variant: mean ± sample std over seeds as bars, each seed as a dot, teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, rows in per_variant.items() if any(r.get("AP") is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(1.1 * max(len(names), 3) + 2.0, 4.0))
    for i, name in enumerate(names):
        aps = [r["AP"] for r in per_variant[name] if r.get("AP") is not None]
        std = statistics.stdev(aps) if len(aps) > 1 else 0.0
        color = "tab:gray" if name == "baseline" else "tab:blue"
        ax.bar(i, statistics.fmean(aps), yerr=std, capsize=4, color=color, alpha=0.6)
        ax.scatter([i] * len(aps), aps, color="black", s=12, zorder=3)
    if teacher is not None and teacher.get("AP") is not None:
        ax.axhline(teacher["AP"], color="tab:red", linestyle="--", label=f"teacher {teacher['AP']:.1f} AP")
        ax.legend(loc="upper left")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("COCO AP (val)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = variant_overrides(args)
    args.out.mkdir(parents=True, exist_ok=True)
    commands: dict[str, list[str]] = {}
    wall: dict[str, float] = {}
    failures: dict[str, str] = {}
    # seed-major order: one full comparison per seed is usable before the next seed starts
    for seed in args.seeds:
        for name, overrides in variants.items():
            run_dir = args.out / name / f"seed{seed}"
            key = f"{name}/seed{seed}"
            if is_done(run_dir, overrides) or args.table_only or args.measure_only:
                continue
            cmds = run_commands(args, name, overrides, seed, run_dir)
            commands[key] = [" ".join(c) for c in cmds]
            print(f"[{key}] " + "\n    ".join(commands[key]), flush=True)
            if not args.dry_run:
                attempt(key, cmds, run_dir, args.threads, wall, failures)
    if not args.table_only:
        for out, cmd in harmony_commands(args, variants):
            key = f"harmony {out}"
            commands[key] = [" ".join(cmd)]
            print(f"[{key}] {commands[key][0]}", flush=True)
            if not args.dry_run:
                attempt(key, [cmd], out, args.threads, wall, failures)
    if args.dry_run:
        return 0

    thresholds = list(args.harmony_score_thresh)
    runs: dict[str, dict[str, Any]] = {}
    per_variant: dict[str, list[dict[str, float | None]]] = {}
    teacher_rows: list[dict[str, float | None]] = []
    for name, overrides in variants.items():
        for seed in args.seeds:
            got = read_run(args.out / name / f"seed{seed}", overrides, thresholds)
            if got is None:
                continue
            runs[f"{name}/seed{seed}"] = got
            per_variant.setdefault(name, []).append(got["student"])
            if got["teacher"] is not None:
                teacher_rows.append(got["teacher"])
    table: dict[str, dict[str, Any]] = {}
    n_seeds: dict[str, int] = {}
    if teacher_rows:  # one cached teacher: every summary reports the same numbers
        teacher_row = {**teacher_rows[0], **extra_harmony(args.out / "teacher", thresholds)}
        table[f"teacher ({args.teacher})"] = aggregate([teacher_row], thresholds)
        n_seeds[f"teacher ({args.teacher})"] = 1
    for name in variants:
        if name in per_variant:
            table[name] = aggregate(per_variant[name], thresholds)
            n_seeds[name] = len(per_variant[name])
    text = format_table(table, n_seeds, thresholds)
    print(text)
    print(
        f"{args.student}-{args.head} student, teacher {args.teacher} ({args.teacher_iters or 'registry'} it), "
        f"{args.iters} it, batch {args.batch_size}, {args.num_train_images} train / "
        f"{args.num_val_images} val images, seeds {args.seeds}; mean ± sample std over seeds; "
        "harmonious: score >= 0.5 and IoU >= 0.7 (tbd harmony defaults)"
        + "".join(f"; '@{t:g}': score >= {t:g}" for t in thresholds)
    )
    payload = {
        "meta": {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "variants": variants,
            "machine": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "commands": commands,
        "wall_s": wall,
        "failures": failures,
        "runs": runs,
        "table": table,
    }
    json_path = args.json or args.out / "accuracy.json"
    json_path.write_text(jsonio.dumps(payload, indent=1))
    (args.out / "accuracy.md").write_text(text + "\n")
    print(f"wrote {json_path}")
    if per_variant:
        title = (
            f"{args.student}-{args.head}, {args.iters} it, batch {args.batch_size}; "
            f"bars: mean ± std over seeds, dots: seeds"
        )
        png = plot_accuracy(
            per_variant, teacher_rows[0] if teacher_rows else None, json_path.with_suffix(".png"), title
        )
        print(f"wrote {png}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
