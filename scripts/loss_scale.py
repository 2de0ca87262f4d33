#!/usr/bin/env python
"""Raw magnitudes of the distillation losses next to the student's detection losses.

Builds the ``TBDistiller`` of a real teacher checkpoint and an untrained student (the state at
the first step of ``tbd distill``), runs ``--batches`` training batches of the embedded dataset
through it (forward only) and prints, per batch, the summed detection losses, L_HD, and L_TFD and
the peer baselines' losses with each ``DISTILL.FEATURE_NORM`` (all before their weights), then
the beta that would make ``beta * L_TFD`` equal the detection losses. This is how the default
beta was chosen (docs/CONFIG.md).

    .venv/bin/python scripts/loss_scale.py --teacher-config fcos_R50_FPN \\
        --teacher-weights ~/.cache/tbd/teachers/<run>/model_final.pth --batches 4
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

import tbd  # noqa: F401  (compat shims before any detectron2.modeling import)

# isort: split
from detectron2.utils.events import EventStorage

from tbd.config import load_config
from tbd.distill.config import FEATURE_NORMS
from tbd.distill.peers import PEER_METHODS
from tbd.engine.trainer import Trainer
from tbd.ops.boxes import pad_boxes


def distill_cfg(args: argparse.Namespace) -> Any:
    cfg = load_config(args.student)
    cfg.SOLVER.IMS_PER_BATCH = args.batch_size
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DISTILL.STUDENT_META_ARCHITECTURE = cfg.MODEL.META_ARCHITECTURE
    cfg.MODEL.META_ARCHITECTURE = "TBDistiller"
    cfg.DISTILL.TEACHER_CONFIG = args.teacher_config
    cfg.DISTILL.TEACHER_WEIGHTS = args.teacher_weights
    cfg.SEED = args.seed
    return cfg


def measure(args: argparse.Namespace) -> list[dict[str, float]]:
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    from tbd.data.shapes import register_shapes

    register_shapes(num_train=args.num_train_images, num_val=args.num_val_images)
    cfg = distill_cfg(args)
    seed_all_rng(args.seed)
    model = build_model(cfg)
    model.train()
    loader = iter(Trainer.build_train_loader(cfg))
    rows = []
    with EventStorage(0) as storage, torch.no_grad():
        for _ in range(args.batches):
            batch = next(loader)
            # one student and one teacher forward; every variant reuses their levels
            with model._probe.capture():
                detection = model.student(batch)
            s_levels, t_levels = model._probe.levels(), model.teacher_levels(batch)
            gt_boxes, _, gt_mask = pad_boxes([x["instances"].gt_boxes.tensor for x in batch])
            row: dict[str, float] = {"detection": float(sum(detection.values()))}
            for norm in FEATURE_NORMS:
                model.feature_norm = norm
                for method in ("tbd", *PEER_METHODS):
                    model.method = method
                    model.distillation_losses(t_levels, s_levels, gt_boxes, gt_mask)
                    key = "tfd" if method == "tbd" else method
                    row[f"{key}_{norm}"] = storage.history(f"tbd/{key}").latest()
            row["hd"] = storage.history("tbd/hd").latest()
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-config", required=True, help="teacher config (path or name under configs/)")
    p.add_argument("--teacher-weights", required=True, help="the teacher's checkpoint")
    p.add_argument("--student", default="tood_R18_FPN", help="student config (default tood_R18_FPN)")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train-images", type=int, default=2000)
    p.add_argument("--num-val-images", type=int, default=200)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    if not Path(args.teacher_weights).is_file():
        p.error(f"--teacher-weights {args.teacher_weights} does not exist")
    rows = measure(args)
    keys = ("detection", "hd", *(f"{m}_{n}" for n in FEATURE_NORMS for m in ("tfd", *PEER_METHODS)))
    for i, row in enumerate(rows):
        print(f"batch {i}: " + "  ".join(f"{k} {row[k]:.4g}" for k in keys))
    for norm in FEATURE_NORMS:
        ratio = statistics.median(r["detection"] / r[f"tfd_{norm}"] for r in rows)
        print(f"beta with beta * L_TFD = detection losses, FEATURE_NORM {norm}: {ratio:.3g} (median)")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
