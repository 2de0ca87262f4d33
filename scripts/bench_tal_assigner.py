"""Benchmark: tbd's TAL assigner vs the per-GT loop reference and ultralytics', side by side in one run.

Each (implementation, GT count, pyramid) case runs in a fresh subprocess so its peak memory is its
own: peak = growth of the process's max RSS (``ru_maxrss``) over the inputs, i.e. what the
assignment itself allocates at its high-water mark. Time = median of a few repetitions. Same
random inputs for every implementation (predictions, scores, GTs; 80 classes, top-13, alpha 1,
beta 6).

ultralytics' ``TaskAlignedAssigner`` (YOLOv8's; it ranks by CIoU, so compare time and memory, not
assignments) is *not* a dependency of tbd. Install it for this benchmark only, without its
dependencies, in a folder of its own; only its ``utils/tal.py`` is loaded (with the few functions it
imports from ``utils/metrics.py``, ``ops.py`` and ``torch_utils.py``, read from the same install):

    python -m pip install --no-deps --target /tmp/ul ultralytics
    .venv/bin/python scripts/bench_tal_assigner.py --ultralytics /tmp/ul --pyramids 800x1333 \
        --gts 100 1000 3000 5000 --batch 2 --json /tmp/tal_bench.json

Without it the ultralytics column says so and the rest runs.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import os
import platform
import sys
import types
from pathlib import Path

from fresh_process import run_case  # scripts/ is on sys.path when a script runs

from tbd import jsonio

PYRAMIDS = {"128": (128, 128), "512": (512, 512), "800x1333": (800, 1333)}
STRIDES = [8, 16, 32, 64, 128]
NUM_CLASSES = 80


INSTALL_HINT = "python -m pip install --no-deps --target /tmp/ul ultralytics; then --ultralytics /tmp/ul"


def ultralytics_available(root: str) -> bool:
    return bool(root) and (Path(root) / "ultralytics" / "utils" / "tal.py").is_file()


def load_ultralytics_tal(root: str) -> types.ModuleType:
    """ultralytics' ``utils/tal.py`` alone, from a ``--no-deps`` install under ``root``.

    Its package ``__init__`` files import OpenCV, matplotlib, etc.; instead, empty package modules
    stand in for ``ultralytics`` and ``ultralytics.utils`` (with a logger), and the function
    definitions of ``metrics.py``, ``ops.py`` and ``torch_utils.py`` (read from the same install)
    fill the three modules ``tal.py`` imports from. Nothing of it is copied into tbd.
    """
    import logging
    import math

    import numpy as np
    import torch

    utils_dir = Path(root) / "ultralytics" / "utils"

    def module(name: str, path: Path | None = None) -> types.ModuleType:
        m = types.ModuleType(name)
        if path is not None:
            m.__path__ = [str(path)]
        sys.modules[name] = m
        return m

    module("ultralytics", utils_dir.parent)
    module("ultralytics.utils", utils_dir).LOGGER = logging.getLogger("ultralytics")
    for sub, extra in (("metrics", {}), ("ops", {}), ("torch_utils", {"TORCH_1_11": True})):
        m = module(f"ultralytics.utils.{sub}")
        m.__dict__.update({"math": math, "torch": torch, "np": np, "nn": torch.nn, **extra})
        source = utils_dir / f"{sub}.py"
        for node in ast.parse(source.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                # a definition whose decorator needs the rest of ultralytics is not needed here
                with contextlib.suppress(Exception):
                    exec(compile(ast.Module([node], []), str(source), "exec"), m.__dict__)
    spec = importlib.util.spec_from_file_location("ultralytics.utils.tal", utils_dir / "tal.py")
    tal = importlib.util.module_from_spec(spec)
    sys.modules["ultralytics.utils.tal"] = tal
    spec.loader.exec_module(tal)
    return tal


def _case(
    impl: str, num_gts: int, pyramid: str, reps: int, batch: int, threads: int = 1, ul_root: str = ""
) -> dict:
    import resource
    import time

    import torch

    torch.set_num_threads(threads)

    from tbd.modeling.tal.assigner import TaskAlignedAssigner
    from tbd.modeling.tal.reference import reference_assign
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
    if impl == "ultralytics":
        ul = load_ultralytics_tal(ul_root).TaskAlignedAssigner(topk=13, num_classes=NUM_CLASSES)
        ul_labels, ul_mask = gt_labels.clamp(min=0)[..., None], gt_mask[..., None].float()

    def run():
        if impl == "vectorised":
            return assigner(scores, pred, points, gt_boxes, gt_labels, gt_mask, NUM_CLASSES).fg_mask
        if impl == "ultralytics":
            return ul(scores, pred, points, ul_labels, gt_boxes, ul_mask)[3]
        return reference_assign(scores, pred, points, boxes, labels, NUM_CLASSES).fg_mask

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
        "positives": int(out.sum()),
    }


IMPLS = ("vectorised", "ultralytics", "loop")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gts", type=int, nargs="+", default=[10, 100, 1000, 3000])
    p.add_argument("--pyramids", nargs="+", default=list(PYRAMIDS), choices=list(PYRAMIDS))
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--reps", type=int, default=3, help="repetitions (the loop gets 1 when slow)")
    p.add_argument("--batch", type=int, default=1, help="images per batch")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for all (1: fair, quiet)")
    p.add_argument(
        "--ultralytics",
        default=os.environ.get("TBD_ULTRALYTICS", "/tmp/ul"),
        help="folder of a `pip install --no-deps --target` of ultralytics (env TBD_ULTRALYTICS)",
    )
    p.add_argument(
        "--loop-max-pairs", type=int, default=30_000_000, help="skip the loop reference above GTs x points"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    impls = list(args.impls)
    if "ultralytics" in impls and not ultralytics_available(args.ultralytics):
        print(
            f"ultralytics not found under {args.ultralytics!r}: its rows are skipped. To include it: {INSTALL_HINT}"
        )
        impls.remove("ultralytics")
    others = [i for i in impls if i != "vectorised"]
    header = f"{'pyramid':>9} {'points':>6} {'GTs':>5} | {'tbd ms':>8} {'tbd MiB':>8} {'tbd pos':>7}"
    for o in others:
        header += f" | {o[:5] + ' ms':>9} {'x time':>6} {o[:5] + ' MiB':>9} {'x mem':>6} {'pos':>6}"
    print(header)
    print("-" * len(header))
    rows = []
    for pyramid in args.pyramids:
        for g in args.gts:
            row: dict = {}
            for impl in impls:
                h, w = PYRAMIDS[pyramid]
                pts = sum(-(-h // s) * -(-w // s) for s in STRIDES)
                if impl == "loop" and g * pts * args.batch > args.loop_max_pairs:
                    continue
                reps = 1 if impl == "loop" and g * pts > 2_000_000 else args.reps
                row[impl] = run_case(
                    "bench_tal_assigner",
                    "_case",
                    impl,
                    g,
                    pyramid,
                    reps,
                    args.batch,
                    args.threads,
                    args.ultralytics,
                )
            vec = row["vectorised"]
            line = f"{pyramid:>9} {vec['points']:>6} {g:>5} | {1e3 * vec['time_s']:>8.1f} {vec['peak_mib']:>8.1f} "
            line += f"{vec['positives']:>7}"
            for o in others:
                if o not in row:
                    line += f" | {'-':>9} {'-':>6} {'-':>9} {'-':>6} {'-':>6}"
                    continue
                r = row[o]
                line += (
                    f" | {1e3 * r['time_s']:>9.1f} {r['time_s'] / vec['time_s']:>5.2f}x {r['peak_mib']:>9.1f} "
                    f"{r['peak_mib'] / max(vec['peak_mib'], 0.1):>5.2f}x {r['positives']:>6}"
                )
            rows.append(row)
            print(line, flush=True)
    print(
        f"batch {args.batch}, {NUM_CLASSES} classes, {args.threads} thread(s), median of {args.reps}; "
        "x time / x mem = other / tbd (above 1: tbd is faster / smaller); MiB = max-RSS growth in a fresh process"
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
            "impls": impls,
        }
        args.json.write_text(jsonio.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
