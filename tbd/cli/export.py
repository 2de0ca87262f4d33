"""``tbd export``: a student-only checkpoint and config that plain Detectron2 loads (+ ``tbd.modeling``
for tbd's heads)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tbd.cli.common import UsageError, console


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a student-only checkpoint for plain Detectron2",
        description=(
            "From a run directory of `tbd distill` (or `tbd train`), write model_student.pth (the "
            "student's weights only: no teacher, adapters, TWG or auxiliary heads) and "
            "config_student.yaml (the student's settings, no DISTILL/TBD keys). For a Detectron2 "
            "architecture (RetinaNet, Faster R-CNN) the config holds only Detectron2's keys, so "
            "`get_cfg()`, `build_model` and `DetectionCheckpointer` load it without tbd; for tbd's heads "
            "(TOOD, ET, DW, FCOS) or MobileNetV2, `import tbd.modeling` and "
            "`tbd.modeling.add_model_config(cfg)` first (README)."
        ),
    )
    p.add_argument("--run", required=True, help="run directory (config.yaml + checkpoints)")
    p.add_argument("--checkpoint", help="checkpoint in the run to export (default: model_final / last)")
    p.add_argument("--output", "-o", help="output directory (default: RUN/export)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tbd.cli.evaluate import resolve_run
    from tbd.config import load_config
    from tbd.export import export_student

    ns = argparse.Namespace(run=args.run, config=None, weights=args.checkpoint)
    cfg_path, checkpoint = resolve_run(ns)
    if not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint} does not exist")
    cfg = load_config(cfg_path)
    out = Path(args.output) if args.output else Path(args.run) / "export"
    weights, config = export_student(cfg, checkpoint, out)
    console.print(f"student weights: {weights}\nstudent config:  {config}")
    return 0
