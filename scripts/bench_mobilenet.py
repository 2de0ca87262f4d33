#!/usr/bin/env python
"""Benchmark: MobileNetV2-FPN vs R-18-FPN students, side by side in one run (CPU inference).

For one head (default TOOD, the ``tal`` student) both students are built from their embedded
configs (``<head>_R18_FPN.yaml``, ``<head>_MNV2_FPN.yaml``) with random weights and BatchNorm
statistics calibrated on a few training forwards (speed does not depend on the weights). Printed per
student: parameters (bottom-up backbone, FPN, rest), GFLOPs per image (convolutions and matmuls,
``torch.utils.flop_counter``), and images/s of (a) backbone + FPN and (b) the whole detector's
inference forward (preprocessing to ``Instances``), at 128 px (the embedded dataset) and 512 px.
Timed forwards alternate between the two students, so machine noise hits both alike; the best
and the median of ``--reps`` are reported (on a shared, loaded machine the best is the steadier
estimate of the unloaded speed), with the ratio MNV2 / R-18.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_mobilenet.py --reps 7 --json /tmp/mnv2.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import tbd  # noqa: F401  (compat shims before any detectron2.modeling import)
from tbd import jsonio

# isort: split
from detectron2.modeling import build_model
from torch.utils.flop_counter import FlopCounterMode

from tbd.config import load_config

HEAD_CONFIGS = {
    "tood": "tood_{}_FPN",
    "et": "et_{}_FPN",
    "dw": "dw_{}_FPN",
    "retinanet": "retinanet_{}_FPN",
    "fcos": "fcos_{}_FPN",
    "faster_rcnn": "faster_rcnn_{}_FPN",
}
STUDENTS = {"r18": "R18", "mnv2": "MNV2"}


def _inputs(size: int, batch: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.rand(3, size, size, generator=g) * 255, "height": size, "width": size}
        for _ in range(batch)
    ]


def _build(head: str, student: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(load_config(HEAD_CONFIGS[head].format(STUDENTS[student])))
    model.train()
    with torch.no_grad():  # calibrate BN running statistics: an untrained net in eval mode does not normalise
        for _ in range(3):
            feats = model.backbone(model.preprocess_image(_inputs(128, 4, seed=1)).tensor)
            del feats
    return model.eval()


def _params(model: torch.nn.Module) -> dict[str, int]:
    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    bottom_up, backbone, total = count(model.backbone.bottom_up), count(model.backbone), count(model)
    return {"bottom_up": bottom_up, "fpn": backbone - bottom_up, "rest": total - backbone, "total": total}


def _gflops(model: torch.nn.Module, size: int) -> dict[str, float]:
    inputs = _inputs(size, 1)
    with torch.no_grad():
        x = model.preprocess_image(inputs).tensor
        with FlopCounterMode(display=False) as fc:
            model.backbone(x)
        bb = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            model(inputs)
        full = fc.get_total_flops()
    return {"backbone_fpn": bb / 1e9, "detector": full / 1e9}


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", default="tood", choices=sorted(HEAD_CONFIGS))
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--batch", type=int, default=4, help="images per timed forward")
    ap.add_argument("--reps", type=int, default=5, help="timed forwards per student and size (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {name: _build(args.head, name) for name in STUDENTS}
    result: dict = {
        "head": args.head,
        "batch": args.batch,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "params": {n: _params(m) for n, m in models.items()},
        "sizes": {},
    }
    for size in args.sizes:
        inputs = _inputs(size, args.batch)
        gflops = {n: _gflops(m, size) for n, m in models.items()}
        times: dict[str, dict[str, list[float]]] = {n: {"backbone_fpn": [], "detector": []} for n in models}
        with torch.no_grad():
            for m in models.values():  # warm-up
                m(inputs)
            for _ in range(args.reps):
                for name, m in models.items():
                    x = m.preprocess_image(inputs).tensor
                    times[name]["backbone_fpn"] += _time(lambda m=m, x=x: m.backbone(x), 1)
                    times[name]["detector"] += _time(lambda m=m, inputs=inputs: m(inputs), 1)
        result["sizes"][str(size)] = {
            n: {
                "gflops_per_image": gflops[n],
                "images_per_s": {k: args.batch / min(v) for k, v in times[n].items()},
                "images_per_s_median": {k: args.batch / statistics.median(v) for k, v in times[n].items()},
            }
            for n in models
        }

    p = result["params"]
    print(f"head {args.head}, batch {args.batch}, {result['threads']} threads, best (median) of {args.reps}")
    print(f"{'':28}{'r18':>12}{'mnv2':>12}{'mnv2/r18':>10}")
    for key in ("bottom_up", "fpn", "rest", "total"):
        r, m = p["r18"][key], p["mnv2"][key]
        print(f"{'params ' + key:28}{r / 1e6:>11.2f}M{m / 1e6:>11.2f}M{m / r:>10.2f}")
    for size, rows in result["sizes"].items():
        for kind in ("backbone_fpn", "detector"):
            r, m = rows["r18"]["gflops_per_image"][kind], rows["mnv2"]["gflops_per_image"][kind]
            print(f"{f'GFLOPs/img {kind} {size}px':28}{r:>12.2f}{m:>12.2f}{m / r:>10.2f}")
            r, m = rows["r18"]["images_per_s"][kind], rows["mnv2"]["images_per_s"][kind]
            rm, mm = rows["r18"]["images_per_s_median"][kind], rows["mnv2"]["images_per_s_median"][kind]
            print(
                f"{f'images/s {kind} {size}px':28}{r:>12.1f}{m:>12.1f}{m / r:>10.2f}"
                f"   ({rm:.1f} {mm:.1f} {mm / rm:.2f})"
            )
    if args.json:
        args.json.write_text(jsonio.dumps(result, indent=2))


if __name__ == "__main__":
    main()
