"""``tbd plot``: training curves, AP / harmonious share per evaluation and IoU histograms of runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tbd.cli.common import UsageError, console

FORMATS = ("png", "svg")


def add_parser(sub: Any) -> None:
    from tbd.cli.harmony import parse_run_spec

    p = sub.add_parser(
        "plot",
        help="plot training curves, AP and harmonious share of runs",
        description=(
            "Draw, from the metrics.json and summary.json of tbd train / tbd distill runs: "
            "training.{png,svg} (detection loss, HD, TFD and TWG weights over iterations), "
            "evaluation.{png,svg} (AP and harmonious share per evaluation, every run on one axes; "
            "a baseline logged beside a distillation run as a dashed curve) and harmony.{png,svg} "
            "(the IoU histogram of each model's confident predictions: the teacher's and every "
            "student's, from summary.json). Nothing is recomputed. See docs/PLOTS.md."
        ),
    )
    p.add_argument(
        "--run",
        dest="runs",
        action="append",
        type=parse_run_spec,
        metavar="[NAME=]RUN_DIR",
        help="a folder written by tbd train or tbd distill; repeatable (the name defaults to the folder's)",
    )
    p.add_argument("--output", "-o", default="runs/plots", help="where the figures go (default runs/plots)")
    p.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=FORMATS,
        help="file format(s); repeatable (default: png and svg)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tbd.analysis.curves import (
        EvaluationNotes,
        RunDataError,
        evaluation_figure,
        group_by_thresholds,
        harmony_summaries,
        load_run,
        save_figure,
        training_figure,
    )
    from tbd.analysis.plot import harmony_figure

    specs = list(args.runs or [])
    if not specs:
        raise UsageError(
            "name at least one run: --run [NAME=]RUN_DIR (a tbd train / tbd distill output folder)"
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"two runs have the same name ({', '.join(names)}); name them: --run NAME=RUN_DIR")
    try:
        runs = [load_run(s.run_dir, s.name) for s in specs]
    except RunDataError as err:
        raise UsageError(str(err)) from None
    formats = list(dict.fromkeys(args.formats or FORMATS))
    out = Path(args.output)
    written = save_figure(training_figure(runs), out / "training", formats)
    notes = EvaluationNotes()
    written += save_figure(evaluation_figure(runs, notes), out / "evaluation", formats)
    summaries, harmony_notes = harmony_summaries(runs)
    groups = group_by_thresholds(summaries)
    for k, group in enumerate(groups):
        stem = "harmony" if k == 0 else f"harmony_{k + 1}"
        written += save_figure(
            harmony_figure(group, title="IoU of easily classified predictions"), out / stem, formats
        )
    if len(groups) > 1:
        harmony_notes.append(
            f"the models were measured with {len(groups)} sets of thresholds: one figure each"
        )
    if not summaries:
        harmony_notes.append("no harmony figure: no run has a summary.json with harmony measurements")
    for line in notes.lines + harmony_notes:
        console.print(f"[yellow]note:[/] {line}", soft_wrap=True)
    for path in written:
        console.print(f"wrote {path}")
    return 0
