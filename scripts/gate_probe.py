#!/usr/bin/env python
"""How much distillation each ``DISTILL.GATE`` would let through, for a run's teacher and student.

Rebuilds a ``tbd distill`` run (its ``config.yaml`` and ``data.json``, as ``scripts/grad_share.py``
does), loads the student at a chosen point (``--weights``: the run's initial weights by default, or
a checkpoint of the run such as ``model_final.pth``), and on ``--batches`` training batches takes
both models' task maps (p_c, p_r per location of every distilled level, METHODS.md §1.1). For every
gate mode it reports the mean gate g (METHODS.md §1.7):

- ``all``: over every location;
- ``teacher objects``: where the teacher predicts an object well (p_c^t >= ``--score``, p_r^t >= 0.5);
- ``TFD cls`` / ``TFD reg``: weighted by p_c^t / p_r^t, the masks of TFD's two terms, i.e. the share
  of each (ungated) term's weight that the gate keeps, for equal distances everywhere.

and, at the teacher's objects, both models' mean p_c, p_r, harmony score HS and quality
q = sqrt(p_c p_r): a gate that closes there early in training keeps the teacher from the places it
knows best. Where TFD's two masks look (``masks``, ungated, pooled over every location probed):
the share of each mask's weight at the teacher's objects and where the teacher sees no object
(p_c^t < ``--score``), and the overlap of the two masks normalised to sum 1 (sum of the smaller
weight: 1 = the same locations, 0 = disjoint).

    .venv/bin/python scripts/gate_probe.py --run runs/demo
    .venv/bin/python scripts/gate_probe.py --run runs/demo --weights runs/demo/model_final.pth --json g.json

Forward only: nothing in the run folder is written.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import torch

import tbd  # noqa: F401  (compat shims before any detectron2.modeling import)

# isort: split
from detectron2.utils.events import EventStorage

from tbd.distill.gate import location_gate, prediction_quality
from tbd.distill.keys import GATES
from tbd.distill.losses import TaskMaps

MODES = tuple(g for g in GATES if g != "none")


def _grad_share() -> Any:
    """scripts/grad_share.py (its run loader and model builder), imported by path: scripts/ is not a
    package."""
    spec = importlib.util.spec_from_file_location("grad_share", Path(__file__).with_name("grad_share.py"))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat(maps: list[TaskMaps]) -> dict[str, torch.Tensor]:
    return {
        "p_c": torch.cat([m.p_c.flatten() for m in maps]),
        "p_r": torch.cat([m.p_r.flatten() for m in maps]),
        "hs": torch.cat([m.hs.flatten() for m in maps]),
        "q": torch.cat([prediction_quality(m).flatten() for m in maps]),
    }


def summarise(
    teacher: list[TaskMaps], student: list[TaskMaps], margin: float, score: float
) -> dict[str, Any]:
    """Mean gates per mode and selection, and both models' maps at the teacher's objects."""
    t, s = _flat(teacher), _flat(student)
    objects = (t["p_c"] >= score) & (t["p_r"] >= 0.5)
    gates = {
        mode: torch.cat([location_gate(mode, a, b, margin).flatten() for a, b in zip(teacher, student)])
        for mode in MODES
    }

    def weighted(g: torch.Tensor, w: torch.Tensor) -> float | None:
        return float((g * w).sum() / w.sum()) if float(w.sum()) > 0 else None

    out: dict[str, Any] = {
        "locations": int(objects.numel()),
        "teacher_objects": int(objects.sum()),
        "gate": {
            mode: {
                "all": float(g.mean()),
                "teacher_objects": float(g[objects].mean()) if bool(objects.any()) else None,
                "tfd_cls": weighted(g, t["p_c"]),
                "tfd_reg": weighted(g, t["p_r"]),
            }
            for mode, g in gates.items()
        },
    }
    masks = {"tfd_cls": t["p_c"], "tfd_reg": t["p_r"]}
    out["masks"] = {
        name: {
            "at_teacher_objects": weighted(objects.float(), w),
            "where_teacher_sees_no_object": weighted((t["p_c"] < score).float(), w),
        }
        for name, w in masks.items()
    }
    if all(float(w.sum()) > 0 for w in masks.values()):
        w_c, w_r = (w / w.sum() for w in masks.values())
        out["masks"]["overlap"] = float(torch.minimum(w_c, w_r).sum())
    if bool(objects.any()):
        out["at_teacher_objects"] = {
            who: {k: float(v[objects].mean()) for k, v in maps.items()}
            for who, maps in (("teacher", t), ("student", s))
        }
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tbd.engine.trainer import Trainer

    grad_share = _grad_share()
    cfg = grad_share.load_run_cfg(args.run, args.device)
    model = grad_share.build_run_model(cfg, args.weights, args.seed)
    loader = iter(Trainer.build_train_loader(cfg))
    teacher: list[TaskMaps] = []
    student: list[TaskMaps] = []
    with EventStorage(0):
        for _ in range(args.batches):
            t, s = model.probe_task_maps(next(loader))
            teacher.extend(t)
            student.extend(s)
    margin = cfg.DISTILL.GATE_MARGIN if args.margin is None else args.margin
    return {
        "run": str(args.run),
        "weights": str(args.weights or cfg.MODEL.WEIGHTS or "random"),
        "batches": args.batches,
        "margin": margin,
        "score": args.score,
        **summarise(teacher, student, margin, args.score),
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    console = Console()
    table = Table(title=f"mean gate at {result['weights']} (margin {result['margin']})")
    for col in ("gate", "all", "teacher objects", "TFD cls (p_c^t)", "TFD reg (p_r^t)"):
        table.add_column(col, justify="left" if col == "gate" else "right")
    for mode, g in result["gate"].items():
        table.add_row(mode, fmt(g["all"]), fmt(g["teacher_objects"]), fmt(g["tfd_cls"]), fmt(g["tfd_reg"]))
    console.print(table)
    m = result["masks"]
    where = Table(title=f"where TFD's masks put their weight (overlap {fmt(m.get('overlap'))})")
    for col in ("mask", "at the teacher's objects", f"where p_c^t < {result['score']}"):
        where.add_column(col, justify="left" if col == "mask" else "right")
    for name in ("tfd_cls", "tfd_reg"):
        where.add_row(name, fmt(m[name]["at_teacher_objects"]), fmt(m[name]["where_teacher_sees_no_object"]))
    console.print(where)
    at = result.get("at_teacher_objects")
    if at:
        maps = Table(title=f"at the teacher's objects ({result['teacher_objects']} of {result['locations']})")
        for col in ("model", "p_c", "p_r", "HS", "q"):
            maps.add_column(col, justify="left" if col == "model" else "right")
        for who, v in at.items():
            maps.add_row(who, *(fmt(v[k]) for k in ("p_c", "p_r", "hs", "q")))
        console.print(maps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a `tbd distill` run folder")
    p.add_argument("--weights", type=Path, help="a checkpoint of the run (default: its initial weights)")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--score", type=float, default=0.3, help="p_c^t from which a location is a teacher object")
    p.add_argument("--margin", type=float, help="gate margin m (default: the run's DISTILL.GATE_MARGIN)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    result = measure(args)
    print_table(result)
    if args.json:
        from tbd.jsonio import dumps

        args.json.write_text(dumps(result) + "\n")


if __name__ == "__main__":
    main()
