#!/usr/bin/env python
"""Benchmark: DW's dual weights (positive and negative) over a batch, vs GT count and pyramid size.

Timed unit (``weights``): everything ``DWLoss`` computes without gradient to weigh its terms, on a
padded ``[B, P, G]`` batch: candidate set, centre prior, pairwise GIoU/IoU of the decoded boxes,
``p_pos``, ``w_pos``, pairwise and per-class ``P_neg`` and ``w_neg`` (:mod:`tbd.modeling.dw_weights`).
For scale it also times the whole ``DWLoss`` forward (``loss``, which adds the three weighted terms
and keeps the graph) and its backward (``bwd``).

Each (GT count, pyramid) case runs in a fresh subprocess so its peak memory is its own: peak =
growth of the process's max RSS over the inputs (the high-water mark of what the step allocates).
Time = median of ``--reps`` repetitions.

    .venv/bin/python scripts/bench_dw_weights.py --reps 3 --json /tmp/dw_bench.json
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


def _case(num_gts: int, pyramid: str, reps: int, batch: int, threads: int = 1) -> dict:
    import resource
    import time

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)

    import tbd  # noqa: F401  (compat shims)
    from tbd.modeling.dw_loss import DWLoss, DWLossConfig
    from tbd.modeling.dw_weights import (
        center_prior,
        class_negative_probability,
        negative_probability,
        negative_weights,
        positive_weights,
    )
    from tbd.ops.boxes import aligned_iou, giou_loss, grid_points, ltrb_decode, pad_boxes, points_in_boxes

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

    @torch.no_grad()
    def weights() -> tuple[torch.Tensor, torch.Tensor]:
        b, p, _ = logits.shape
        g = gt_boxes.shape[1]
        cand = points_in_boxes(points, gt_boxes) & gt_mask[:, None, :]
        prior = center_prior(points, strides, gt_boxes, cand, cfg.prior_sigma)
        pred = ltrb_decode(points, ltrb)[:, :, None, :]
        tgt = gt_boxes[:, None, :, :]
        reg = giou_loss(pred, tgt)
        ious = aligned_iou(pred, tgt) * cand
        log_s = F.logsigmoid(logits) + F.logsigmoid(ctr)[..., None]
        log_s_gt = log_s.gather(2, gt_labels.clamp(min=0)[:, None, :].expand(b, p, g))
        p_pos = log_s_gt.exp() * torch.exp(-cfg.loc_exponent * reg)
        w_pos = positive_weights(p_pos, prior, cfg.pos_mu, cfg.pos_mu_norm)
        p_neg = class_negative_probability(
            negative_probability(ious, cand, cfg.neg_iou_low, cfg.neg_power), gt_labels, NUM_CLASSES
        )
        return w_pos, negative_weights(p_neg, log_s.exp(), cfg.neg_gamma)

    loss_fn = DWLoss(cfg)

    def loss() -> dict:
        return loss_fn(logits, ltrb, ctr, points, strides, gt_boxes, gt_labels, gt_mask)

    def median(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    w_pos, w_neg = weights()
    t_weights = median(weights)
    peak_weights = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    t_loss = median(loss)

    def backward() -> None:
        out = loss()
        logits.grad = ltrb.grad = ctr.grad = None
        t0 = time.perf_counter()
        sum(out.values()).backward()
        bwd.append(time.perf_counter() - t0)

    bwd: list[float] = []
    for _ in range(reps):
        backward()
    peak_all = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {
        "gts": num_gts,
        "pyramid": pyramid,
        "points": a,
        "batch": batch,
        "weights_s": t_weights,
        "loss_fwd_s": t_loss,
        "loss_bwd_s": sorted(bwd)[len(bwd) // 2],
        "peak_weights_mib": peak_weights / 1024,
        "peak_loss_mib": peak_all / 1024,
        "pos_weight_sum_per_gt": float(w_pos.sum() / gt_mask.sum()),
        "neg_weight_mean": float(w_neg.mean()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gts", type=int, nargs="+", default=[10, 100, 500])
    p.add_argument("--pyramids", nargs="+", default=list(PYRAMIDS), choices=list(PYRAMIDS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="images per batch")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    header = (
        f"| {'pyramid':>9} | {'points':>6} | {'GTs':>4} | {'weights ms':>10} | {'loss fwd ms':>11} "
        f"| {'loss bwd ms':>11} | {'weights MiB':>11} | {'fwd+bwd MiB':>11} | {'Σw_pos/GT':>9} |"
    )
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    rows = []
    for pyramid in args.pyramids:
        for g in args.gts:
            r = run_case("bench_dw_weights", "_case", g, pyramid, args.reps, args.batch, args.threads)
            rows.append(r)
            print(
                f"| {pyramid:>9} | {r['points']:>6} | {g:>4} | {1e3 * r['weights_s']:>10.1f} "
                f"| {1e3 * r['loss_fwd_s']:>11.1f} | {1e3 * r['loss_bwd_s']:>11.1f} "
                f"| {r['peak_weights_mib']:>11.1f} | {r['peak_loss_mib']:>11.1f} "
                f"| {r['pos_weight_sum_per_gt']:>9.3f} |",
                flush=True,
            )
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
    print(f"batch {args.batch}, {NUM_CLASSES} classes, {args.threads} thread(s), median of {args.reps}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
