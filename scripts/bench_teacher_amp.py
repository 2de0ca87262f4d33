#!/usr/bin/env python
"""Benchmark: the teacher's forward in float32 vs mixed precision, side by side in one run.

The timed unit is exactly what ``TBDistiller`` runs for the teacher each step: its truncated forward
(preprocess -> backbone -> FPN -> dense head -> decoded boxes, no NMS; ``ProbeAdapter.run_dense``)
under ``torch.no_grad`` and, for the mixed-precision rows, ``torch.autocast`` (``DISTILL.TEACHER_AMP``).
Precisions: float32 and bf16 on CPU; float32, fp16 and bf16 on CUDA. Sizes: 800x1333 (COCO) and
128 px (the embedded dataset). The teacher is randomly initialised with calibrated BatchNorm
statistics (speed and memory do not depend on the weights).

Each (device, precision, size) case runs in a fresh subprocess: peak memory is the growth of the
process's max RSS over the forwards (model and inputs already built) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. ``score diff`` is the largest
absolute difference of the teacher's sigmoid scores against the float32 run of the same case.

    .venv/bin/python scripts/bench_teacher_amp.py --reps 2 --batch 1 --json /tmp/amp.json
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from fresh_process import run_case  # scripts/ is on sys.path when a script runs

from tbd import jsonio

SIZES = {"800x1333": (800, 1333), "128": (128, 128)}
PRECISIONS = {"cpu": ["fp32", "bf16"], "cuda": ["fp32", "fp16", "bf16"]}


def _case(config: str, device: str, precision: str, size: str, batch: int, reps: int, threads: int) -> dict:
    import resource
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)

    import tbd  # noqa: F401  (compat shims before any detectron2.modeling import)

    # isort: split
    from detectron2.modeling import build_model

    from tbd.config import load_config
    from tbd.distill.probes import get_probe_adapter

    torch.manual_seed(0)
    cfg = load_config(config)
    cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    adapter = get_probe_adapter(model)
    h, w = SIZES[size]
    g = torch.Generator().manual_seed(0)
    inputs = [
        {"image": torch.rand(3, h, w, generator=g) * 255, "height": h, "width": w} for _ in range(batch)
    ]
    small = [{"image": torch.rand(3, 64, 64, generator=g) * 255, "height": 64, "width": 64} for _ in range(2)]
    with torch.no_grad():  # calibrate BatchNorm statistics (an untrained net in eval mode does not normalise)
        model.train()  # on small images, so the high-water mark below is the timed forwards' own
        adapter.run_dense(model, small)
    model.eval()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def forward():
        with torch.no_grad():
            if dtype is None:
                return adapter.run_dense(model, inputs)
            with torch.autocast(device_type=device, dtype=dtype):
                return adapter.run_dense(model, inputs)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def scores(levels) -> torch.Tensor:
        return torch.cat([lv.logits.float().sigmoid().flatten() for lv in levels])

    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    forward()  # warm-up (counted in the peak: the same forward)
    sync()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = forward()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    t = sorted(times)[len(times) // 2]
    diff = None
    if dtype is not None:  # float32 reference for the score difference (after the memory reading)
        with torch.no_grad():
            diff = float((scores(out) - scores(adapter.run_dense(model, inputs))).abs().max())
    return {
        "config": config,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "precision": precision,
        "size": size,
        "batch": batch,
        "reps": reps,
        "time_s": t,
        "images_per_s": batch / t,
        "peak_mib": peak_mib,
        "max_score_diff_vs_fp32": diff,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="retinanet_R101_FPN", help="teacher config (default R-101 RetinaNet)")
    p.add_argument(
        "--devices", nargs="+", default=None, help="cpu and/or cuda (default: cuda if present, cpu)"
    )
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--batch", type=int, default=1, help="images per forward")
    p.add_argument("--batch-small", type=int, default=8, help="images per forward at 128 px")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch default)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    devices = args.devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])

    header = (
        f"| {'device':>6} | {'size':>9} | {'batch':>5} | {'precision':>9} | {'ms/forward':>10} | "
        f"{'images/s':>8} | {'peak MiB':>8} | {'speed-up':>8} | {'score diff':>10} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    rows = []
    for device in devices:
        for size in args.sizes:
            batch = args.batch if size == "800x1333" else args.batch_small
            fp32_time = None
            for precision in PRECISIONS[device]:
                r = run_case(
                    "bench_teacher_amp",
                    "_case",
                    args.config,
                    device,
                    precision,
                    size,
                    batch,
                    args.reps,
                    args.threads,
                )
                rows.append(r)
                fp32_time = r["time_s"] if precision == "fp32" else fp32_time
                speed = fp32_time / r["time_s"] if fp32_time else float("nan")
                diff = "-" if r["max_score_diff_vs_fp32"] is None else f"{r['max_score_diff_vs_fp32']:.4f}"
                print(
                    f"| {device:>6} | {size:>9} | {batch:>5} | {precision:>9} | {1e3 * r['time_s']:>10.1f} | "
                    f"{r['images_per_s']:>8.2f} | {r['peak_mib']:>8.1f} | {speed:>7.2f}x | {diff:>10} |",
                    flush=True,
                )
    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "config": args.config,
        "reps": args.reps,
    }
    print(f"{args.config}, median of {args.reps} timed forwards after one warm-up; {meta['machine']}")
    if args.json:
        args.json.write_text(jsonio.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
