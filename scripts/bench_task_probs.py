#!/usr/bin/env python
"""Benchmark: memory and time of p_r and of the TBD losses (p_r + HD + TFD) vs GTs per image.

At 800x1333 (FPN strides 8-128), batch 2, a RetinaNet-style head (A = 9 anchors, 80 classes,
256-channel features) on both sides, with synthetic teacher and student levels (the student's
tensors are leaves that require grad, as after the student's forward):

- ``pr``: forward + backward of the student's ``regression_probability`` over every level;
- ``losses``: p_c and p_r of teacher and student, IoU-guided HD, the TFD feature distances and the
  TFD loss (fixed task weights), forward + backward: what ``TBDistiller.distillation_losses`` adds.

``chunked`` is tbd's p_r (best GT without grad in bounded blocks, one differentiable IoU per box);
``dense`` is the former form (:func:`tbd.distill.testing.dense_regression_probability`, the whole
``[B, H W A, G]`` IoU tensor kept for the backward), run up to ``--dense-max-gts``. Each case runs
in a fresh process; peak = growth of the process's peak RSS over forward + backward, above its RSS
once the inputs are built (the kernel's high-water mark is reset there, so the inputs' own
temporaries do not hide it; ``fresh_process.reset_peak_rss``).

    .venv/bin/python scripts/bench_task_probs.py --gts 10 100 500 5000 --json /tmp/task_probs.json
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from fresh_process import peak_rss_mib, reset_peak_rss, run_case  # scripts/ is on sys.path

from tbd import jsonio

STRIDES = [8, 16, 32, 64, 128]


def _case(impl: str, part: str, num_gts: int, batch: int, height: int, width: int, threads: int = 1) -> dict:
    import time

    import torch

    torch.set_num_threads(threads)
    import tbd  # noqa: F401
    from tbd.distill.losses import TaskMaps, feature_distance, harmony_distillation_loss, tfd_loss
    from tbd.distill.task_probs import classification_probability, regression_probability
    from tbd.distill.testing import dense_regression_probability
    from tbd.ops.boxes import pad_boxes

    p_r = regression_probability if impl == "chunked" else dense_regression_probability
    gen = torch.Generator().manual_seed(0)
    a, k, c = 9, 80, 256

    def level(stride: int, grad: bool) -> dict:
        h, w = -(-height // stride), -(-width // stride)
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        centre = torch.stack([xs, ys], -1)[None, :, :, None, :] * stride
        half = stride * (1 + 3 * torch.rand(batch, h, w, a, 2, generator=gen))
        boxes = torch.cat([centre - half, centre + half], -1)
        out = {
            "feature": torch.randn(batch, c, h, w, generator=gen),
            "logits": torch.randn(batch, h, w, a, k, generator=gen) - 3,
            "boxes": boxes,
        }
        return {n: t.requires_grad_(grad) for n, t in out.items()}

    teacher = [level(s, False) for s in STRIDES]
    student = [level(s, True) for s in STRIDES]
    gts = []
    for _ in range(batch):
        wh = 4 + torch.rand(num_gts, 2, generator=gen) * torch.tensor([width, height]) / 4
        xy = torch.rand(num_gts, 2, generator=gen) * (torch.tensor([width, height]) - wh)
        gts.append(torch.cat([xy, xy + wh], -1))
    gt_boxes, _, gt_mask = pad_boxes(gts)

    def maps(levels: list[dict]) -> list[TaskMaps]:
        return [
            TaskMaps(classification_probability(lv["logits"]), p_r(lv["boxes"], gt_boxes, gt_mask))
            for lv in levels
        ]

    before = reset_peak_rss()
    t0 = time.perf_counter()
    if part == "pr":
        loss = sum(p_r(lv["boxes"], gt_boxes, gt_mask).sum() for lv in student)
    else:
        t_maps, s_maps = maps(teacher), maps(student)
        hd = harmony_distillation_loss(t_maps, s_maps)
        dist = [
            feature_distance(t["feature"], s["feature"], "teacher_energy") for t, s in zip(teacher, student)
        ]
        tfd = tfd_loss(dist, t_maps, torch.tensor([0.5, 0.5])).loss
        loss = hd + 0.4 * tfd
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = peak_rss_mib() - before
    return {
        "impl": impl,
        "part": part,
        "gts": num_gts,
        "batch": batch,
        "anchors_per_image": sum(lv["boxes"][0].numel() // 4 for lv in student),
        "fwd_s": t1 - t0,
        "bwd_s": t2 - t1,
        "peak_mib": peak,
        "loss": float(loss.detach()),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gts", type=int, nargs="+", default=[10, 100, 500, 5000])
    p.add_argument("--parts", nargs="+", default=["pr", "losses"], choices=["pr", "losses"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--width", type=int, default=1333)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--dense-max-gts", type=int, default=100, help="the dense p_r keeps B*HWA*G floats: keep it small"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    header = (
        f"| {'part':>6} | {'GTs':>5} | {'tbd fwd s':>9} | {'tbd bwd s':>9} | {'tbd MiB':>8} | {'vs first row':>12} "
        f"| {'dense fwd s':>11} | {'dense bwd s':>11} | {'dense MiB':>9} | {'x mem':>6} | {'same loss':>9} |"
    )
    print(header)
    print("|" + "|".join("-" * len(x) for x in header.split("|")[1:-1]) + "|")
    rows = []
    for part in args.parts:
        first = None
        for g in args.gts:
            common = (part, g, args.batch, args.height, args.width, args.threads)
            ch = run_case("bench_task_probs", "_case", "chunked", *common)
            de = run_case("bench_task_probs", "_case", "dense", *common) if g <= args.dense_max_gts else None
            first = first or ch
            rows.append({"chunked": ch, "dense": de})
            growth = ch["peak_mib"] / max(first["peak_mib"], 0.1) - 1
            line = (
                f"| {part:>6} | {g:>5} | {ch['fwd_s']:>9.2f} | {ch['bwd_s']:>9.2f} | {ch['peak_mib']:>8.1f} "
                f"| {100 * growth:>+11.1f}% "
            )
            if de is None:
                line += f"| {'skipped':>11} | {'-':>11} | {'-':>9} | {'-':>6} | {'-':>9} |"
            else:
                same = abs(de["loss"] - ch["loss"]) <= 1e-5 * max(1.0, abs(de["loss"]))
                line += (
                    f"| {de['fwd_s']:>11.2f} | {de['bwd_s']:>11.2f} | {de['peak_mib']:>9.1f} "
                    f"| {de['peak_mib'] / max(ch['peak_mib'], 0.1):>5.1f}x | {str(same):>9} |"
                )
            print(line, flush=True)
    print(
        f"{args.height}x{args.width}, batch {args.batch}, A = 9, 80 classes, strides {STRIDES}, "
        f"{rows[0]['chunked']['anchors_per_image']} anchors/image, {args.threads} thread(s); MiB = peak-RSS growth "
        "over forward + backward above the built inputs, fresh process per case; x mem = dense / tbd"
    )
    if args.json:
        import torch

        meta = {
            "machine": platform.platform(),
            "threads": args.threads,
            "torch": torch.__version__,
            **vars(args),
        }
        meta["json"] = str(args.json)
        args.json.write_text(jsonio.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
