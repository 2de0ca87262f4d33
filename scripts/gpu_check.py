#!/usr/bin/env python
"""One-shot GPU check of distillation at full resolution: time, images/s and peak memory.

On one CUDA GPU, at 800x1333 (COCO-sized heads: 256-channel FPN, 80 classes), for an R-101 teacher
and an R-18 student (both TOOD heads; ``--teacher`` / ``--student`` to change), at batch 2 and 8:

- ``student step``: the student's own training step (forward + backward of its detection losses);
- ``teacher fwd fp32 / fp16 / bf16``: the distiller's truncated teacher forward (no grad), plain
  and under ``torch.autocast`` (``DISTILL.TEACHER_AMP``);
- ``distill step``: the whole TBDistiller step (student forward, teacher forward, TBD losses,
  backward), fp32 teacher;

and, on synthetic tensors at the same size (batch 2), the peak memory and time of the three parts
that grow with the GT count, at 100 and 1,000 GTs per image: ``p_r`` (forward + backward over
every level, A = 9), the ``TAL`` assigner and the ``DW`` loss (forward + backward).

Each row: median seconds per call, images/s, and ``torch.cuda.max_memory_allocated`` during the
calls (reset before each case; it includes what was resident before, i.e. the models and the
batch: the ``resident MiB`` column). A case that fails (e.g. out of memory) records its error and
the others still run. Writes one json (``--out``) and prints a table.

    python scripts/gpu_check.py --out gpu_check.json          # ~3-5 min on one recent GPU
    python scripts/gpu_check.py --smoke --out /tmp/smoke.json  # the same code on CPU, tiny sizes

``--smoke`` runs on CPU at 64x96 with narrow heads, batch 2 and 3, 5 and 20 GTs: a check that the
script works, not a measurement (memory is not available on CPU and is left empty).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository, when run as a script from a checkout

import tbd  # noqa: E402,F401  (compat shims before any detectron2.modeling import)

STRIDES = [8, 16, 32, 64, 128]
FULL = {
    "height": 800,
    "width": 1333,
    "batches": [2, 8],
    "gts": [100, 1000],
    "image_gts": 20,
    "opts": [
        "MODEL.FPN.OUT_CHANNELS",
        "256",
        "MODEL.TOOD.FEAT_CHANNELS",
        "256",
        "MODEL.TOOD.NUM_CLASSES",
        "80",
    ],
    "num_classes": 80,
    "warmup": 2,
    "reps": 5,
}
SMOKE = {
    "height": 64,
    "width": 96,
    "batches": [2, 3],
    "gts": [5, 20],
    "image_gts": 3,
    "opts": ["MODEL.FPN.OUT_CHANNELS", "32", "MODEL.TOOD.FEAT_CHANNELS", "32", "MODEL.TOOD.NUM_CLASSES", "8"],
    "num_classes": 8,
    "warmup": 0,
    "reps": 1,
}


# ----------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(n: float) -> float:
    return n / 2**20


def measure(
    name: str, fn: Callable[[], Any], device: torch.device, images: int, warmup: int, reps: int
) -> dict[str, Any]:
    """Median time of ``fn`` over ``reps`` calls after ``warmup``, and the peak CUDA memory of those calls."""
    row: dict[str, Any] = {"case": name, "images": images}
    try:
        for _ in range(warmup):
            fn()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            row["resident_mib"] = _mib(torch.cuda.memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        row["time_s"] = statistics.median(times)
        row["images_per_s"] = images / row["time_s"] if images else None
        if device.type == "cuda":
            row["max_memory_allocated_mib"] = _mib(torch.cuda.max_memory_allocated(device))
    except Exception as err:  # one failing case (OOM, unsupported dtype) must not end the check
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=3)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------------- model cases
def model_cases(args: argparse.Namespace, sizes: dict, device: torch.device) -> list[dict]:
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from tbd.distill.testing import distill_config, synthetic_batch

    h, w = sizes["height"], sizes["width"]
    opts = list(sizes["opts"]) + [
        "MODEL.DEVICE",
        str(device),
        "INPUT.MIN_SIZE_TRAIN",
        f"({h},)",
        "INPUT.MAX_SIZE_TRAIN",
        str(w),
        "DISTILL.TEACHER_OPTS",
        str(list(sizes["opts"])),
    ]
    torch.manual_seed(0)
    model = build_model(distill_config(args.student, args.teacher, opts)).to(device)
    model.train()
    rows = []
    with EventStorage():
        for batch_size in sizes["batches"]:
            batch = synthetic_batch(
                batch_size, (h, w), boxes_per_image=sizes["image_gts"], num_classes=sizes["num_classes"]
            )
            batch = [{**x, "image": x["image"].to(device)} for x in batch]
            for name, fn in _step_cases(model, batch):
                row = measure(name, fn, device, batch_size, sizes["warmup"], sizes["reps"])
                row.update({"batch": batch_size, "size": f"{h}x{w}", "gts_per_image": sizes["image_gts"]})
                rows.append(row)
                _print_row(row)
            model.zero_grad(set_to_none=True)
    return rows


def _step_cases(model: torch.nn.Module, batch: list[dict]) -> list[tuple[str, Callable[[], None]]]:
    """The timed calls of one batch: student step, teacher forward in three precisions, distill step."""

    def student_step() -> None:
        model.student.zero_grad(set_to_none=True)
        sum(model.student(batch).values()).backward()

    def distill_step() -> None:
        model.zero_grad(set_to_none=True)
        sum(model(batch).values()).backward()

    def teacher_forward(amp: str) -> Callable[[], None]:
        def run() -> None:
            model.teacher_amp = amp
            try:
                model.teacher_levels(batch)
            finally:
                model.teacher_amp = ""

        return run

    cases: list[tuple[str, Callable[[], None]]] = [("student step", student_step)]
    cases += [(f"teacher fwd {amp or 'fp32'}", teacher_forward(amp)) for amp in ("", "fp16", "bf16")]
    cases.append(("distill step", distill_step))
    return cases


# ----------------------------------------------------------------------------------- GT-growing parts
def _points(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from tbd.ops.boxes import grid_points

    levels = grid_points([(-(-h // s), -(-w // s)) for s in STRIDES], STRIDES, device=device)
    strides = torch.cat([torch.full((len(p),), float(s), device=device) for p, s in zip(levels, STRIDES)])
    return torch.cat(levels), strides


def _gts(batch: int, num_gts: int, h: int, w: int, num_classes: int, device: torch.device) -> tuple:
    from tbd.ops.boxes import pad_boxes

    gen = torch.Generator().manual_seed(num_gts)
    boxes, labels = [], []
    for _ in range(batch):
        wh = 4 + torch.rand(num_gts, 2, generator=gen) * torch.tensor([w, h]) / 4
        xy = torch.rand(num_gts, 2, generator=gen) * (torch.tensor([w, h]) - wh)
        boxes.append(torch.cat([xy, xy + wh], -1).to(device))
        labels.append(torch.randint(0, num_classes, (num_gts,), generator=gen).to(device))
    return pad_boxes(boxes, labels)


def part_cases(args: argparse.Namespace, sizes: dict, device: torch.device) -> list[dict]:
    h, w, b, c = sizes["height"], sizes["width"], 2, sizes["num_classes"]
    points, strides = _points(h, w, device)
    p = points.shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    ltrb = 2 + torch.rand(b, p, 4, generator=gen, device=device) * min(h, w) / 6
    pred = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)
    scores = torch.rand(b, p, c, generator=gen, device=device)
    level_boxes = []
    for s in STRIDES:  # A = 9 boxes per location, like a RetinaNet student
        lh, lw = -(-h // s), -(-w // s)
        xy = torch.rand(b, lh, lw, 9, 2, generator=gen, device=device) * torch.tensor([w, h], device=device)
        level_boxes.append(torch.cat([xy, xy + s * (1 + 4 * torch.rand_like(xy))], -1))
    rows = []
    for g in sizes["gts"]:
        gts = _gts(b, g, h, w, c, device)
        cases = _part_cases(gts, level_boxes, scores, pred, points, strides, ltrb, c)
        for name, fn in cases:
            row = measure(name, fn, device, 0, sizes["warmup"], sizes["reps"])
            row.update({"batch": b, "size": f"{h}x{w}", "gts_per_image": g})
            rows.append(row)
            _print_row(row)
    return rows


def _part_cases(
    gts, level_boxes, scores, pred, points, strides, ltrb, c
) -> list[tuple[str, Callable[[], None]]]:  # noqa: ANN001
    from tbd.distill.task_probs import regression_probability
    from tbd.modeling.dw.loss import DWLoss, DWLossConfig
    from tbd.modeling.tal.assigner import TaskAlignedAssigner

    gt_boxes, gt_labels, gt_mask = gts
    b, p = pred.shape[:2]

    def pr() -> None:
        leaves = [x.clone().requires_grad_(True) for x in level_boxes]
        sum(regression_probability(x, gt_boxes, gt_mask).sum() for x in leaves).backward()

    def tal() -> None:
        TaskAlignedAssigner()(scores, pred, points, gt_boxes, gt_labels, gt_mask, c)

    def dw() -> None:
        logits = torch.randn(b, p, c, device=pred.device, requires_grad=True)
        ctr = torch.zeros(b, p, device=pred.device, requires_grad=True)
        reg = ltrb.clone().requires_grad_(True)
        out = DWLoss(DWLossConfig(num_classes=c))(
            logits, reg, ctr, points, strides, gt_boxes, gt_labels, gt_mask
        )
        sum(out.values()).backward()

    return [("p_r fwd+bwd", pr), ("TAL assign", tal), ("DW loss fwd+bwd", dw)]


# ----------------------------------------------------------------------------------- output
def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_row(row: dict) -> None:
    if "error" in row:
        print(
            f"  {row['case']} (batch {row.get('batch')}, {row.get('gts_per_image')} GTs): {row['error']}",
            flush=True,
        )
    else:
        print(
            f"  {row['case']} (batch {row.get('batch')}, {row.get('gts_per_image')} GTs): "
            f"{row['time_s']:.4f} s, max allocated {_fmt(row.get('max_memory_allocated_mib'), '.0f')} MiB",
            flush=True,
        )


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tbd GPU check: {result['meta']['device_name']} ({result['meta']['mode']})")
    for col in (
        "case",
        "size",
        "batch",
        "GTs/img",
        "s / call",
        "images/s",
        "max alloc MiB",
        "resident MiB",
        "error",
    ):
        table.add_column(col, justify="left" if col in ("case", "error") else "right")
    for r in result["rows"]:
        table.add_row(
            r["case"],
            r.get("size", ""),
            str(r.get("batch", "")),
            str(r.get("gts_per_image", "")),
            _fmt(r.get("time_s"), ".4f"),
            _fmt(r.get("images_per_s"), ".1f"),
            _fmt(r.get("max_memory_allocated_mib"), ".0f"),
            _fmt(r.get("resident_mib"), ".0f"),
            (r.get("error") or "")[:60],
        )
    Console(width=160).print(table)


def run(args: argparse.Namespace) -> dict:
    if args.smoke:
        device, sizes = torch.device("cpu"), dict(SMOKE)
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "no CUDA device visible: run on a GPU machine, or pass --smoke for the CPU check"
            )
        device, sizes = torch.device("cuda", 0), dict(FULL)
        torch.backends.cudnn.benchmark = True
    for key in ("batches", "gts"):
        if getattr(args, key):
            sizes[key] = getattr(args, key)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = {
        "mode": "smoke (CPU, tiny)" if args.smoke else "full",
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "teacher": args.teacher,
        "student": args.student,
        **{k: v for k, v in sizes.items() if k != "opts"},
        "model_opts": sizes["opts"],
        "command": " ".join(sys.argv),
    }
    t0 = time.perf_counter()
    rows = [] if args.skip_models else model_cases(args, sizes, device)
    rows += part_cases(args, sizes, device)
    meta["wall_s"] = time.perf_counter() - t0
    result = {"meta": meta, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print_table(result)
    if args.out:
        print(f"wrote {args.out} ({meta['wall_s']:.0f} s)")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check the script, measure nothing")
    p.add_argument("--teacher", default="tood_R101_FPN")
    p.add_argument("--student", default="tood_R18_FPN")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="override the batch sizes (2 8)")
    p.add_argument("--gts", type=int, nargs="+", default=None, help="override the GT counts of p_r/TAL/DW")
    p.add_argument("--skip-models", action="store_true", help="only the p_r / TAL / DW rows")
    p.add_argument("--out", default="gpu_check.json")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
