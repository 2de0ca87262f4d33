#!/usr/bin/env python
"""Benchmark: the DW loss on candidate pairs vs its dense ``[B, P, G]`` form, vs GT count and pyramid.

``sparse`` is :class:`tbd.modeling.dw.loss.DWLoss` (what training runs: only the (point, GT) pairs
with the point inside the GT carry a pairwise quantity); ``dense`` is
:func:`tbd.modeling.dw.reference.dense_dw_loss` (the former implementation: every pairwise quantity
as a ``[B, P, G]`` tensor). Both compute the same three terms (the dual weights -- candidate set,
centre prior, GIoU/IoU, p_pos, w_pos, P_neg, w_neg -- and the weighted losses); the table prints
the forward (weights + losses) and backward times, the peak memory of forward + backward, and the
largest relative difference of the three terms between the two.

Each (implementation, GT count, pyramid) case runs in a fresh subprocess so its peak memory is its
own: peak = growth of the process's max RSS over the inputs. Time = median of ``--reps``.

    .venv/bin/python scripts/bench_dw_weights.py --pyramids 800x1333 --gts 10 100 500 5000 \
        --batch 2 --reps 1 --json /tmp/dw_bench.json
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from fresh_process import run_case  # scripts/ is on sys.path when a script runs

from tbd import jsonio

PYRAMIDS = {"128": (128, 128), "512": (512, 512), "800x1333": (800, 1333)}
STRIDES = [8, 16, 32, 64, 128]
NUM_CLASSES = 80


def _case(impl: str, num_gts: int, pyramid: str, reps: int, batch: int, threads: int = 1) -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(threads)

    import tbd  # noqa: F401  (compat shims)
    from tbd.modeling.dw.loss import DWLoss, DWLossConfig
    from tbd.modeling.dw.reference import dense_dw_loss
    from tbd.ops.boxes import grid_points, pad_boxes

    torch.manual_seed(0)
    h, w = PYRAMIDS[pyramid]
    sizes = [(-(-h // s), -(-w // s)) for s in STRIDES]
    level_points = grid_points(sizes, STRIDES)
    points = torch.cat(level_points)
    strides = torch.cat([torch.full((len(p),), float(s)) for p, s in zip(level_points, STRIDES)])
    a = points.shape[0]
    ltrb = (2 + torch.rand(batch, a, 4) * min(h, w) / 6).requires_grad_(True)
    logits = torch.randn(batch, a, NUM_CLASSES, requires_grad=True)
    ctr = torch.randn(batch, a, requires_grad=True)
    boxes, labels = [], []
    for _ in range(batch):
        wh = 4 + torch.rand(num_gts, 2) * torch.tensor([w, h]) / 4
        xy = torch.rand(num_gts, 2) * (torch.tensor([w, h]) - wh)
        boxes.append(torch.cat([xy, xy + wh], dim=-1))
        labels.append(torch.randint(0, NUM_CLASSES, (num_gts,)))
    gt_boxes, gt_labels, gt_mask = pad_boxes(boxes, labels)
    cfg = DWLossConfig(num_classes=NUM_CLASSES)
    sparse = DWLoss(cfg)

    def loss() -> dict:
        args = (logits, ltrb, ctr, points, strides, gt_boxes, gt_labels, gt_mask)
        return sparse(*args) if impl == "sparse" else dense_dw_loss(cfg, *args)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fwd, bwd = [], []
    for _ in range(reps):
        logits.grad = ltrb.grad = ctr.grad = None
        t0 = time.perf_counter()
        out = loss()
        t1 = time.perf_counter()
        sum(out.values()).backward()
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {
        "impl": impl,
        "gts": num_gts,
        "pyramid": pyramid,
        "points": a,
        "batch": batch,
        "loss_fwd_s": sorted(fwd)[len(fwd) // 2],
        "loss_bwd_s": sorted(bwd)[len(bwd) // 2],
        "peak_mib": peak / 1024,
        "losses": {k: float(v) for k, v in out.items()},
        "candidates_per_image": sparse.last_stats["num_candidates"] if impl == "sparse" else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gts", type=int, nargs="+", default=[10, 100, 500, 5000])
    p.add_argument("--pyramids", nargs="+", default=list(PYRAMIDS), choices=list(PYRAMIDS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="images per batch")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--dense-max-pairs", type=int, default=25_000_000, help="skip the dense form above B x P x G pairs"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    header = (
        f"| {'pyramid':>9} | {'points':>6} | {'GTs':>5} | {'cand./img':>9} | {'sparse fwd ms':>13} "
        f"| {'sparse bwd ms':>13} | {'sparse MiB':>10} | {'dense fwd ms':>12} | {'dense bwd ms':>12} "
        f"| {'dense MiB':>9} | {'x time':>6} | {'x mem':>6} | {'max rel diff':>12} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    rows = []
    for pyramid in args.pyramids:
        for g in args.gts:
            sp = run_case(
                "bench_dw_weights", "_case", "sparse", g, pyramid, args.reps, args.batch, args.threads
            )
            de = None
            if args.batch * sp["points"] * g <= args.dense_max_pairs:
                de = run_case(
                    "bench_dw_weights", "_case", "dense", g, pyramid, args.reps, args.batch, args.threads
                )
            rows.append({"sparse": sp, "dense": de})
            line = (
                f"| {pyramid:>9} | {sp['points']:>6} | {g:>5} | {sp['candidates_per_image']:>9.0f} "
                f"| {1e3 * sp['loss_fwd_s']:>13.1f} | {1e3 * sp['loss_bwd_s']:>13.1f} | {sp['peak_mib']:>10.1f} "
            )
            if de is None:
                line += f"| {'skipped':>12} | {'-':>12} | {'-':>9} | {'-':>6} | {'-':>6} | {'-':>12} |"
            else:
                t_sp = sp["loss_fwd_s"] + sp["loss_bwd_s"]
                t_de = de["loss_fwd_s"] + de["loss_bwd_s"]
                diff = max(
                    abs(sp["losses"][k] - de["losses"][k]) / max(abs(de["losses"][k]), 1e-12)
                    for k in de["losses"]
                )
                line += (
                    f"| {1e3 * de['loss_fwd_s']:>12.1f} | {1e3 * de['loss_bwd_s']:>12.1f} | {de['peak_mib']:>9.1f} "
                    f"| {t_de / t_sp:>5.1f}x | {de['peak_mib'] / max(sp['peak_mib'], 0.1):>5.1f}x | {diff:>12.1e} |"
                )
            print(line, flush=True)
    import torch

    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "threads": args.threads,
        "torch": torch.__version__,
        "reps": args.reps,
        "batch": args.batch,
        "num_classes": NUM_CLASSES,
    }
    print(
        f"batch {args.batch}, {NUM_CLASSES} classes, {args.threads} thread(s), median of {args.reps}; "
        "x time / x mem = dense / sparse (fwd + bwd time; peak MiB = max-RSS growth over fwd + bwd)"
    )
    if args.json:
        args.json.write_text(jsonio.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
