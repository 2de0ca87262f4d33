#!/usr/bin/env python
"""Training-step cost of the auxiliary heads (MODEL.AUX_HEADS), side by side with the plain student.

Variants (same student config, same synthetic batch, built as ``tbd train`` / ``tbd distill`` build
them, i.e. by ``Trainer.build_model``):

- ``none``: the plain student; ``atss``: + the ATSS head; ``atss_rcnn``: + ATSS and RPN/Fast R-CNN;
- with ``--distill``: also ``tbd`` (TBDistiller, teacher ``--teacher``) and ``tbd_atss_rcnn``.

Time: one training step (forward, backward, SGD step), the variants interleaved every iteration,
median over ``--iters`` after 2 warm-up steps; printed with its ratio to ``none``. Memory (CPU,
``--memory``): each variant in a fresh process, peak RSS growth over two steps above the built model
and batch (activations, gradients, optimizer state), with its ratio to ``none``. Eval forwards are
not measured: the heads do not run there (tests/test_aux_heads.py checks it).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_aux_heads.py --iters 5 --threads 1 --memory --distill

Trailing ``KEY VALUE`` pairs override the config of every variant (e.g. ``MODEL.AUX_HEADS.RCNN.FC_DIM 256``).

Defaults follow the accuracy study (TOOD R-18, 128 px, batch 8; docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from fresh_process import peak_rss_mib, reset_peak_rss, run_case  # scripts/ is on sys.path

import tbd  # noqa: F401  (compat shims before any detectron2.modeling import)
from tbd import jsonio

# isort: split
from detectron2.utils.events import EventStorage

from tbd.config import load_config
from tbd.distill.testing import distill_config, synthetic_batch
from tbd.engine.trainer import Trainer

AUX_OPTS = {
    "none": [],
    "atss": ["MODEL.AUX_HEADS.NAMES", "['atss']"],
    "atss_rcnn": ["MODEL.AUX_HEADS.NAMES", "['atss','rcnn']"],
    "tbd": [],
    "tbd_atss_rcnn": ["MODEL.AUX_HEADS.NAMES", "['atss','rcnn']"],
}


def build(
    variant: str, student: str, teacher: str, size: int, extra: list[str] | None = None
) -> torch.nn.Module:
    opts = ["INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", str(size), *AUX_OPTS[variant]]
    opts += list(extra or [])
    torch.manual_seed(0)
    cfg = distill_config(student, teacher, opts) if variant.startswith("tbd") else load_config(student, opts)
    model = Trainer.build_model(cfg)
    model.train()
    return model


class Stepper:
    def __init__(self, model: torch.nn.Module, batch: list[dict[str, Any]]) -> None:
        self.model = model
        self.batch = batch
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        losses = self.model(self.batch)
        self.opt.zero_grad()
        sum(losses.values()).backward()
        self.opt.step()
        return time.perf_counter() - t0


def _case_memory(
    variant: str, student: str, teacher: str, size: int, batch_size: int, threads: int, extra: list[str]
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model = build(variant, student, teacher, size, extra)
    step = Stepper(model, synthetic_batch(batch_size, size, 3))
    with EventStorage(0):
        base = reset_peak_rss()
        step()
        step()
    return {"peak_growth_mib": peak_rss_mib() - base}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="tood_R18_FPN")
    p.add_argument("--teacher", default="fcos_R50_FPN", help="teacher config of the --distill variants")
    p.add_argument("--distill", action="store_true", help="also TBDistiller without / with aux heads")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--memory", action="store_true", help="also peak memory, one fresh process per variant")
    p.add_argument("--json", help="write the results here")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides for every variant")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["none", "atss", "atss_rcnn"] + (["tbd", "tbd_atss_rcnn"] if args.distill else [])
    batch = synthetic_batch(args.batch_size, args.size, 3)
    steppers = {
        v: Stepper(build(v, args.student, args.teacher, args.size, args.opts), batch) for v in variants
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    with EventStorage(0):
        for v in variants:  # warm-up
            steppers[v]()
            steppers[v]()
        for _ in range(args.iters):
            for v in variants:  # interleaved: machine load hits every variant alike
                times[v].append(steppers[v]())
    params = {
        v: sum(p.numel() for n, p in s.model.named_parameters() if "aux_heads." in n)
        for v, s in steppers.items()
    }
    results: dict[str, Any] = {"args": vars(args), "variants": {}}
    for v in variants:
        ref = "tbd" if v.startswith("tbd") else "none"
        med = statistics.median(times[v])
        results["variants"][v] = {
            "step_s": med,
            "step_ratio": med / statistics.median(times[ref]),
            "aux_params_m": params[v] / 1e6,
        }
    if args.memory:
        for v in variants:
            mem = run_case("bench_aux_heads", "_case_memory", v, args.student, args.teacher, args.size,
                           args.batch_size, args.threads, args.opts)  # fmt: skip
            results["variants"][v]["peak_growth_mib"] = mem["peak_growth_mib"]
        for v in variants:
            ref = "tbd" if v.startswith("tbd") else "none"
            results["variants"][v]["mem_ratio"] = (
                results["variants"][v]["peak_growth_mib"] / results["variants"][ref]["peak_growth_mib"]
            )
    print(f"{args.student}, {args.size} px, batch {args.batch_size}, {args.iters} steps (median), CPU")
    print(f"{'variant':<15}{'step s':>9}{'x ref':>8}{'aux params M':>14}{'peak MiB':>10}{'x ref':>8}")
    for v, r in results["variants"].items():
        mem = f"{r['peak_growth_mib']:>10.0f}{r['mem_ratio']:>8.2f}" if "mem_ratio" in r else ""
        print(f"{v:<15}{r['step_s']:>9.3f}{r['step_ratio']:>8.2f}{r['aux_params_m']:>14.2f}{mem}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(jsonio.dumps(results, indent=2))


if __name__ == "__main__":
    main()
