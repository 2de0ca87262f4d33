#!/usr/bin/env python
"""The distilled student against itself trained alone, from ``tbd distill --with-baseline`` runs.

Each ``--group LABEL=RUN[,RUN...]`` is one setting (teacher, student, schedule) over its seeds. Per run
it reads ``summary.json`` (teacher at the student's input and at its own, both students' final COCO
AP, the gain) and ``metrics.json`` (every periodic evaluation of both students, their harmonious
shares at scores 0.5 and 0.3, and the training losses), and prints one row per run and a mean ± sample
std per group:

- AP / AP50 of the student alone and distilled, the gain, the gain at every periodic evaluation;
- harmonious share (IoU >= 0.7) at scores 0.5 and 0.3 of both students, from their last evaluation;
- the distillation terms' share of the total loss, and the detection losses of both students, as
  means over the last ``--tail`` logged iterations (a distilled student whose own losses end higher
  than its baseline's is being pulled away from its task).

    .venv/bin/python scripts/side_by_side.py --group "strong=runs/s0,runs/s1" --group "weak=runs/w0" \\
        --json docs/results/side_by_side.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from tbd import jsonio
from tbd.analysis.curves import AP_KEY, DISTILL_LOSSES, RunCurves, RunDataError, load_run

SHARE_KEYS = {"0.5": "harmony_score0.5/harmonious_share", "0.3": "harmony_score0.3/harmonious_share"}


def parse_group(text: str) -> tuple[str, list[Path]]:
    label, sep, runs = text.partition("=")
    if not (sep and label and runs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=RUN[,RUN...]")
    return label, [Path(r) for r in runs.split(",") if r]


def tail_mean(curves: RunCurves, key: str, its: list[int]) -> float | None:
    values = [curves.scalars[key][i] for i in its if i in curves.scalars.get(key, {})]
    return statistics.fmean(values) if values else None


def run_row(run: Path, tail: int) -> dict[str, Any]:
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        sys.exit(f"{run}: no summary.json (not a finished `tbd distill` run)")
    summary = json.loads(summary_path.read_text())
    if "student_alone" not in summary:
        sys.exit(f"{run}: no student-alone row in summary.json: run `tbd distill` with --with-baseline")
    try:  # tbd plot's reader: a resumed run's repeated iterations count once, non-finite values dropped
        curves = load_run(run)
    except RunDataError as err:
        sys.exit(str(err))
    scalars = curves.scalars
    distilled_ap, alone_ap = scalars.get(AP_KEY, {}), scalars.get(f"baseline/{AP_KEY}", {})
    eval_its = sorted(set(distilled_ap) & set(alone_ap))
    last = eval_its[-1] if eval_its else None
    totals = scalars.get("total_loss", {})
    tail_its = sorted(totals)[-tail:]
    shares = [
        sum(scalars.get(k, {}).get(i, 0.0) for k in DISTILL_LOSSES) / totals[i] for i in tail_its if totals[i]
    ]
    alone, distilled = summary["student_alone"]["bbox"], summary["student"]["bbox"]
    own = summary.get("teacher_own_input") or {}
    return {
        "run": str(run),
        "teacher": {
            "AP": summary["teacher"]["bbox"].get("AP"),
            "input": summary["teacher"].get("input"),
            "AP_own_input": own.get("bbox", {}).get("AP"),
            "own_input": own.get("input"),
            "harmonious_share": (summary["teacher"].get("harmony") or {}).get("harmonious_share"),
        },
        "alone": {"AP": alone.get("AP"), "AP50": alone.get("AP50"), "AP75": alone.get("AP75")},
        "distilled": {
            "AP": distilled.get("AP"),
            "AP50": distilled.get("AP50"),
            "AP75": distilled.get("AP75"),
        },
        "gain": summary["gain"]["bbox"].get("AP"),
        "gain_AP50": summary["gain"]["bbox"].get("AP50"),
        "evaluations": [
            {"iteration": i, "distilled": distilled_ap[i], "alone": alone_ap[i]} for i in eval_its
        ],
        "harmonious_share": {
            thr: {
                "alone": scalars.get(f"baseline/{key}", {}).get(last),
                "distilled": scalars.get(key, {}).get(last),
            }
            for thr, key in SHARE_KEYS.items()
        },
        "distill_share_of_loss": statistics.fmean(shares) if shares else None,
        "detection_losses": {
            name: {
                "distilled": tail_mean(curves, f"loss_{name}", tail_its),
                "alone": tail_mean(curves, f"baseline/loss_{name}", tail_its),
            }
            for name in ("cls", "box_giou", "box_reg")
            if f"loss_{name}" in scalars
        },
    }


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    numbers = [v for v in values if v is not None]
    if not numbers:
        return None, None
    return statistics.fmean(numbers), (statistics.stdev(numbers) if len(numbers) > 1 else None)


def fmt(value: float | None, std: float | None = None, scale: float = 1.0, sign: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value * scale:+.1f}" if sign else f"{value * scale:.1f}"
    return text if std is None else f"{text} ± {std * scale:.1f}"


def print_tables(groups: dict[str, list[dict[str, Any]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="distilled student vs the same student alone (same batches, same start)")
    columns = ("setting", "run", "teacher AP", "alone AP", "distilled AP", "gain", "gain AP50")
    columns += ("gain per eval", "harm.% 0.5 a→d", "harm.% 0.3 a→d", "distill % of loss")
    for col in columns:
        table.add_column(col, justify="left" if col in ("setting", "run") else "right")
    for label, rows in groups.items():
        for r in rows:
            per_eval = " ".join(
                fmt(
                    None if e["distilled"] is None or e["alone"] is None else e["distilled"] - e["alone"],
                    sign=True,
                )
                for e in r["evaluations"]
            )
            shares = [
                f"{fmt(r['harmonious_share'][t]['alone'], scale=100)}→{fmt(r['harmonious_share'][t]['distilled'], scale=100)}"
                for t in ("0.5", "0.3")
            ]
            table.add_row(
                label,
                Path(r["run"]).name,
                fmt(r["teacher"]["AP"]),
                fmt(r["alone"]["AP"]),
                fmt(r["distilled"]["AP"]),
                fmt(r["gain"], sign=True),
                fmt(r["gain_AP50"], sign=True),
                per_eval,
                *shares,
                fmt(r["distill_share_of_loss"], scale=100),
            )
        if len(rows) > 1:
            table.add_row(
                label,
                f"mean of {len(rows)}",
                fmt(*mean_std([r["teacher"]["AP"] for r in rows])),
                fmt(*mean_std([r["alone"]["AP"] for r in rows])),
                fmt(*mean_std([r["distilled"]["AP"] for r in rows])),
                fmt(*mean_std([r["gain"] for r in rows]), sign=True),
                fmt(*mean_std([r["gain_AP50"] for r in rows]), sign=True),
                "",
                "",
                "",
                fmt(mean_std([r["distill_share_of_loss"] for r in rows])[0], scale=100),
                style="bold",
            )
    Console(width=200).print(table)


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"seeds": len(rows)}
    for key in ("gain", "gain_AP50", "distill_share_of_loss"):
        out[key] = dict(zip(("mean", "std"), mean_std([r[key] for r in rows])))
    for who in ("alone", "distilled"):
        out[f"{who}_AP"] = dict(zip(("mean", "std"), mean_std([r[who]["AP"] for r in rows])))
    out["teacher_AP"] = dict(zip(("mean", "std"), mean_std([r["teacher"]["AP"] for r in rows])))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", type=parse_group, action="append", required=True, help="LABEL=RUN[,RUN...]")
    p.add_argument("--tail", type=int, default=3, help="logged training rows averaged for the end losses")
    p.add_argument("--json", type=Path, help="also write every row and the group means here")
    args = p.parse_args(argv)
    groups = {label: [run_row(run, args.tail) for run in runs] for label, runs in args.group}
    print_tables(groups)
    result = {
        "groups": {label: {"runs": rows, "summary": aggregate(rows)} for label, rows in groups.items()},
        "tail": args.tail,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(jsonio.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
