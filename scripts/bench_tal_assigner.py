"""Benchmark: the vectorised TAL assigner vs the per-GT loop reference, side by side in one run.

Each (implementation, GT count, pyramid) case runs in a fresh subprocess so its peak memory is its
own: peak = growth of the process's max RSS (``ru_maxrss``) over the inputs, i.e. what the
assignment itself allocates at its high-water mark. Time = median of a few repetitions.

    .venv/bin/python scripts/bench_tal_assigner.py --json /tmp/tal_bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from fresh_process import run_case  # scripts/ is on sys.path when a script runs

PYRAMIDS = {"128": (128, 128), "512": (512, 512), "800x1333": (800, 1333)}
STRIDES = [8, 16, 32, 64, 128]
NUM_CLASSES = 80


def _case(impl: str, num_gts: int, pyramid: str, reps: int, batch: int, threads: int = 1) -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(threads)

    from tbd.modeling.tal import TaskAlignedAssigner
    from tbd.modeling.tal_reference import reference_assign
    from tbd.ops.boxes import grid_points, pad_boxes

    torch.manual_seed(0)
    h, w = PYRAMIDS[pyramid]
    sizes = [(-(-h // s), -(-w // s)) for s in STRIDES]
    points = torch.cat(grid_points(sizes, STRIDES))
    a = points.shape[0]
    ltrb = 2 + torch.rand(batch, a, 4) * min(h, w) / 6
    pred = torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)
    scores = torch.rand(batch, a, NUM_CLASSES)
    boxes, labels = [], []
    for _ in range(batch):
        wh = 4 + torch.rand(num_gts, 2) * torch.tensor([w, h]) / 4
        xy = torch.rand(num_gts, 2) * (torch.tensor([w, h]) - wh)
        boxes.append(torch.cat([xy, xy + wh], dim=-1))
        labels.append(torch.randint(0, NUM_CLASSES, (num_gts,)))
    gt_boxes, gt_labels, gt_mask = pad_boxes(boxes, labels)
    assigner = TaskAlignedAssigner()

    def run():
        if impl == "vectorised":
            return assigner(scores, pred, points, gt_boxes, gt_labels, gt_mask, NUM_CLASSES)
        return reference_assign(scores, pred, points, boxes, labels, NUM_CLASSES)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    times.sort()
    return {
        "impl": impl,
        "gts": num_gts,
        "pyramid": pyramid,
        "points": a,
        "batch": batch,
        "time_s": times[len(times) // 2],
        "peak_mib": peak / 1024,
        "positives": int(out.fg_mask.sum()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gts", type=int, nargs="+", default=[10, 100, 500])
    p.add_argument("--pyramids", nargs="+", default=list(PYRAMIDS), choices=list(PYRAMIDS))
    p.add_argument("--reps", type=int, default=3, help="repetitions (the loop gets 1 when slow)")
    p.add_argument("--batch", type=int, default=1, help="images per batch")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both (1: fair, quiet)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    rows = []
    header = f"{'pyramid':>9} {'points':>6} {'GTs':>4} | {'vec ms':>8} {'loop ms':>9} {'speed-up':>8} | "
    header += f"{'vec MiB':>8} {'loop MiB':>8} {'mem ratio':>9} | same"
    print(header)
    print("-" * len(header))
    for pyramid in args.pyramids:
        for g in args.gts:
            vec = run_case(
                "bench_tal_assigner", "_case", "vectorised", g, pyramid, args.reps, args.batch, args.threads
            )
            slow = g * vec["points"] > 2_000_000
            loop = run_case(
                "bench_tal_assigner",
                "_case",
                "loop",
                g,
                pyramid,
                1 if slow else args.reps,
                args.batch,
                args.threads,
            )
            same = vec["positives"] == loop["positives"]
            rows.append({"vectorised": vec, "loop": loop, "same_positive_count": same})
            print(
                f"{pyramid:>9} {vec['points']:>6} {g:>4} | {1e3 * vec['time_s']:>8.1f} "
                f"{1e3 * loop['time_s']:>9.1f} {loop['time_s'] / vec['time_s']:>7.1f}x | "
                f"{vec['peak_mib']:>8.1f} {loop['peak_mib']:>8.1f} "
                f"{vec['peak_mib'] / max(loop['peak_mib'], 0.1):>8.2f}x | {same}",
                flush=True,
            )
    if args.json:
        import torch

        meta = {
            "machine": platform.platform(),
            "processor": platform.processor(),
            "threads": args.threads,
            "torch": torch.__version__,
            "reps": args.reps,
            "batch": args.batch,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
