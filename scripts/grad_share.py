#!/usr/bin/env python
"""Where the distillation terms push the student, next to where its own detection loss pushes it.

Rebuilds a ``tbd distill`` run (its ``config.yaml`` and ``data.json``: same teacher, student,
weights, data), loads the student's weights at a chosen point (``--weights``: the run's initial
weights by default, or any checkpoint of the run, e.g. ``model_final.pth``), and for ``--batches``
training batches takes the gradient of each term separately — the detection losses, ``loss_hd``
(α·L_HD) and ``loss_tfd`` (β·L_TFD), each as weighted in training — with respect to the student's
parameters, split into backbone (``backbone.bottom_up``), neck (the rest of ``backbone``: FPN) and
head (everything else). Per group and term it reports:

- ``norm ratio``: ‖g_term‖ / ‖g_detection‖ (median over batches);
- ``cos``: the cosine between g_term and g_detection (mean): < 0 means the term pulls against the
  student's own task;
- ``override``: with AdamW every parameter moves by the sign of its summed gradient, so the share
  of the group's parameters where g_detection + g_distill has the opposite sign to g_detection
  (distillation overrides the task's direction; reported for the summed distillation terms only).

    .venv/bin/python scripts/grad_share.py --run runs/mnv2in_to_mnv2_seed0 --batches 8
    .venv/bin/python scripts/grad_share.py --run runs/mnv2in_to_mnv2_seed0 \\
        --weights runs/mnv2in_to_mnv2_seed0/model_final.pth --json grad_final.json

Forward and backward only: no optimizer step, nothing in the run folder is written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import tbd  # noqa: F401  (compat shims before any detectron2.modeling import)

# isort: split
from detectron2.utils.events import EventStorage

from tbd.analysis.curves import DISTILL_LOSSES

GROUPS = ("backbone", "neck", "head")


def group_of(name: str) -> str:
    if name.startswith("backbone.bottom_up."):
        return "backbone"
    if name.startswith("backbone."):
        return "neck"
    return "head"


def load_run_cfg(run: Path, device: str) -> Any:
    from tbd.cli.common import resolve_datasets
    from tbd.cli.rundata import DATA_KEYS, restore_data
    from tbd.config import load_config

    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        sys.exit(f"{run} is not a tbd run folder (no config.yaml)")
    cfg = load_config(cfg_path)
    if cfg.MODEL.META_ARCHITECTURE != "TBDistiller":
        sys.exit(f"{run} is not a distillation run (META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE})")
    # the run's data as tbd eval / tbd harmony --run re-register it (data.json, --data-dir included)
    data = argparse.Namespace(**{**dict.fromkeys(DATA_KEYS), "num_train_images": 2000, "num_val_images": 200})
    restore_data(data, [run])
    resolve_datasets(data)
    cfg.defrost()
    cfg.DISTILL.WITH_BASELINE = False
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.MODEL.DEVICE = device
    return cfg


def flat(grads: list[torch.Tensor | None], params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def build_run_model(cfg: Any, weights: Path | None, seed: int) -> Any:
    """The run's distiller in training mode, its student at ``weights`` (a checkpoint the run wrote:
    student, adapters, TWG) or, for ``None``, at the run's start (ImageNet / user weights, loaded as
    the trainer loads them)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng

    from tbd.engine.weights import load_initial_weights

    seed_all_rng(seed)
    model = build_model(cfg)
    if weights is None:
        if cfg.MODEL.WEIGHTS:
            load_initial_weights(model, cfg.MODEL.WEIGHTS, cfg.TBD.ALLOW_PARTIAL_WEIGHTS)
    else:
        DetectionCheckpointer(model).load(str(weights))
    model.train()
    return model


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tbd.engine.trainer import Trainer

    cfg = load_run_cfg(args.run, args.device)
    if args.override:
        cfg.merge_from_list(args.override)
    model = build_run_model(cfg, args.weights, args.seed)
    weights = args.weights or cfg.MODEL.WEIGHTS
    named = [(n, p) for n, p in model.student.named_parameters() if p.requires_grad]
    by_group = {g: [p for n, p in named if group_of(n) == g] for g in GROUPS}
    params = [p for g in GROUPS for p in by_group[g]]
    sizes = [sum(p.numel() for p in by_group[g]) for g in GROUPS]
    loader = iter(Trainer.build_train_loader(cfg))
    rows: list[dict[str, Any]] = []
    with EventStorage(0):
        for _ in range(args.batches):
            losses = model(next(loader))
            terms = {
                "detection": sum(v for k, v in losses.items() if k not in DISTILL_LOSSES),
                **{k: v for k, v in losses.items() if k in DISTILL_LOSSES and v.requires_grad},
            }
            grads = {
                k: flat(list(torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)), params)
                for k, v in terms.items()
            }
            distill = sum(g for k, g in grads.items() if k != "detection")
            row: dict[str, Any] = {"loss": {k: float(v.detach()) for k, v in terms.items()}}
            start = 0
            for group, size in zip(GROUPS, sizes):
                det = grads["detection"][start : start + size]
                stats: dict[str, Any] = {"detection_norm": float(det.norm())}
                for key, g in grads.items():
                    if key == "detection":
                        continue
                    part = g[start : start + size]
                    stats[key] = {
                        "norm_ratio": float(part.norm() / det.norm().clamp_min(1e-12)),
                        "cos": float(torch.nn.functional.cosine_similarity(part, det, dim=0)),
                    }
                if isinstance(distill, torch.Tensor):
                    d = distill[start : start + size]
                    flipped = (torch.sign(det + d) * torch.sign(det) < 0) & (det != 0)
                    stats["distill"] = {
                        "norm_ratio": float(d.norm() / det.norm().clamp_min(1e-12)),
                        "cos": float(torch.nn.functional.cosine_similarity(d, det, dim=0)),
                        "override": float(flipped.float().mean()),
                    }
                row[group] = stats
                start += size
            rows.append(row)
    keys = [k for k in rows[0][GROUPS[0]] if k != "detection_norm"]
    summary = {
        group: {
            key: {
                "norm_ratio_median": statistics.median(r[group][key]["norm_ratio"] for r in rows),
                "cos_mean": statistics.fmean(r[group][key]["cos"] for r in rows),
                **(
                    {"override_mean": statistics.fmean(r[group][key]["override"] for r in rows)}
                    if key == "distill"
                    else {}
                ),
            }
            for key in keys
        }
        for group in GROUPS
    }
    return {
        "weights": str(weights),
        "param_counts": dict(zip(GROUPS, sizes)),
        "rows": rows,
        "summary": summary,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gradients relative to the detection loss's, at {result['weights']}")
    for col in ("group", "term", "‖g‖ / ‖g_det‖ (median)", "cos(g, g_det) (mean)", "override (mean)"):
        table.add_column(col, justify="right" if col != "group" and col != "term" else "left")
    for group, terms in result["summary"].items():
        for term, s in terms.items():
            override = s.get("override_mean")
            table.add_row(
                group,
                term,
                f"{s['norm_ratio_median']:.2f}",
                f"{s['cos_mean']:+.3f}",
                "" if override is None else f"{100 * override:.1f}%",
            )
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a `tbd distill` run folder")
    p.add_argument(
        "--weights",
        type=Path,
        help="student or distillation checkpoint to measure at (default: the run's initial MODEL.WEIGHTS)",
    )
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write per-batch rows and the summary here")
    p.add_argument("override", nargs="*", help="config overrides, e.g. DISTILL.HD_WEIGHT 0.5")
    args = p.parse_args(argv)
    if args.weights is not None and not args.weights.is_file():
        p.error(f"--weights {args.weights} does not exist")
    result = measure(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
