#!/usr/bin/env python
"""What ``DISTILL.WITH_BASELINE`` costs per training step: the ratio of step times with and without.

Two ``TBDistiller`` s of one teacher -> student pair are built from the same config, one with the
baseline student beside it; their full training steps (forward + backward + SGD step) are timed
side by side in this one process, interleaved (A, B, A, B, ...) on the same synthetic batches, so
machine load hits both alike. Prints the median step time of each and the median of the
per-iteration ratios ``with / without``.

    .venv/bin/python scripts/bench_baseline_overhead.py --iters 8 --threads 1
    .venv/bin/python scripts/bench_baseline_overhead.py --device cuda --size 512 --batch 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tbd  # noqa: F401  (compat shims before any detectron2.modeling import)

# isort: split
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tbd.distill.testing import distill_config, synthetic_batch


def build(student: str, teacher: str, size: int, device: str, with_baseline: bool) -> torch.nn.Module:
    opts = ["INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", str(size), "MODEL.DEVICE", device]
    opts += ["DISTILL.WITH_BASELINE", str(with_baseline)]
    torch.manual_seed(0)
    model = build_model(distill_config(student, teacher, opts))
    return model.train()


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: list, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with EventStorage(0):
        losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="retinanet_R18_FPN")
    p.add_argument("--teacher", default="retinanet_R50_FPN")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=6, help="timed steps of each model (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {flag: build(args.student, args.teacher, args.size, args.device, flag) for flag in (False, True)}
    optims = {
        f: torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=1e-3) for f, m in models.items()
    }
    batches = [synthetic_batch(args.batch, args.size, seed=i) for i in range(args.iters + 1)]
    if args.device != "cpu":
        for batch in batches:
            for x in batch:
                x["image"] = x["image"].to(args.device)
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.jit.optimized_execution(False):
        for i, batch in enumerate(batches):
            for flag in (False, True):
                t = step(models[flag], optims[flag], batch, args.device)
                if i > 0:  # the first step of each is a warm-up
                    times[flag].append(t)
    ratios = [b / a for a, b in zip(times[False], times[True])]
    result = {
        "pair": f"{args.teacher} -> {args.student}",
        "device": args.device,
        "size": args.size,
        "batch": args.batch,
        "step_without_s": statistics.median(times[False]),
        "step_with_baseline_s": statistics.median(times[True]),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
