#!/usr/bin/env python
"""Per-step cost of the TBD losses, beyond the student's own step and the teacher's forward.

For each teacher -> student pair, on synthetic 128 px batches (CPU), median over ``--iters``:

- ``student``: the plain student's training step (forward + backward of its detection losses);
- ``teacher``: the teacher's truncated forward (``TBDistiller.teacher_levels``, no grad);
- ``distill``: the whole ``TBDistiller`` step (forward + backward of every loss);
- ``overhead = distill - student - teacher`` (median of interleaved per-iteration differences)
  and its share of ``distill`` (target: < 5 %);
- ``tbd_fwd``: the TBD loss computation alone (probe decoding + p_c/p_r + HD + TFD + TWG), timed
  directly on captured levels, and its share of ``distill`` (the subtraction above is noisy);
- ``tbd_bwd``: the extra backward time the TBD losses add, ``backward(det + TBD) - backward(det)``
  on one retained graph; ``tbd_total_share = (tbd_fwd + tbd_bwd) / distill``.

It also prints the loss magnitudes at the first step (detection losses, L_HD, L_TFD with the
configured ``DISTILL.FEATURE_NORM``) with a BN-calibrated untrained teacher; the default beta was
chosen with trained teachers, by ``scripts/loss_scale.py`` (docs/CONFIG.md).

    .venv/bin/python scripts/bench_tbd_overhead.py --iters 10 --threads 1

``--memory`` measures peak memory instead: each step kind (student step, teacher forward, distill
step) of each pair runs in a fresh process, and its peak is the growth of the process's max RSS
over two steps, above the built models and batch (activations, gradients and autograd buffers;
CPU). The student step and the distillation step build the same TBDistiller, so their difference
is what distillation adds at its peak.

    .venv/bin/python scripts/bench_tbd_overhead.py --memory --pairs fcos_to_tood --threads 1
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from fresh_process import run_case  # scripts/ is on sys.path when a script runs

import tbd  # noqa: F401  (compat shims before any detectron2.modeling import)
from tbd import jsonio

# isort: split
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tbd.distill.testing import calibrate_batchnorm, distill_config, synthetic_batch
from tbd.ops.boxes import pad_boxes

PAIRS = {
    "retinanet": ("retinanet_R18_FPN", "retinanet_R50_FPN"),
    "fcos": ("fcos_R18_FPN", "fcos_R50_FPN"),
    "faster_rcnn": ("faster_rcnn_R18_FPN", "faster_rcnn_R50_FPN"),
    "frcnn_to_retinanet": ("retinanet_R18_FPN", "faster_rcnn_R50_FPN"),
    # the accuracy study's pair (docs/BENCHMARKS.md §1): FCOS R-50 teacher, TOOD R-18 (TAL) student
    "fcos_to_tood": ("tood_R18_FPN", "fcos_R50_FPN"),
}
STEP_KINDS = ("student", "teacher", "distill")


def _median_time(fn: Callable[[], Any], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_pair(student: str, teacher: str, args: argparse.Namespace) -> dict[str, Any]:
    h, w = _hw(args.size)
    opts = ["INPUT.MIN_SIZE_TRAIN", f"({min(h, w)},)", "INPUT.MAX_SIZE_TRAIN", str(max(h, w))]
    if args.teacher_amp:
        opts += ["DISTILL.TEACHER_AMP", args.teacher_amp]
    torch.manual_seed(0)
    model = build_model(distill_config(student, teacher, opts))
    batches = [synthetic_batch(args.batch, (h, w), boxes_per_image=args.gts, seed=s) for s in range(4)]
    calibrate_batchnorm(model.teacher, batches)
    batch = batches[0]
    model.train()
    storage = EventStorage()
    storage.__enter__()

    with torch.no_grad():  # raw magnitudes at the first step
        first = model(batch)
    hist = storage.histories()
    magnitudes = {
        "detection": float(sum(v for k, v in first.items() if k not in ("loss_hd", "loss_tfd"))),
        "hd_raw": hist["tbd/hd"].latest(),
        "tfd_raw": hist["tbd/tfd"].latest(),
    }

    def student_step() -> None:
        model.student.zero_grad(set_to_none=True)
        sum(model.student(batch).values()).backward()

    def teacher_forward() -> None:
        model.teacher_levels(batch)

    def distill_step() -> None:
        model.zero_grad(set_to_none=True)
        sum(model(batch).values()).backward()

    gt, _, mask = pad_boxes([x["instances"].gt_boxes.tensor for x in batch])
    with torch.no_grad(), model._probe.capture():
        model.student(batch)
    record = model._probe._record
    t_levels = model.teacher_levels(batch)

    def tbd_forward() -> None:
        model._probe._record = record
        with torch.no_grad():
            model.distillation_losses(t_levels, model._probe.levels(), gt, mask)

    def tbd_backward() -> None:
        """Incremental backward of the TBD losses: backward(det + TBD) - backward(det), on one graph."""
        with model._probe.capture():
            det = sum(model.student(batch).values())
        extra = model.distillation_losses(t_levels, model._probe.levels(), gt, mask)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        det.backward(retain_graph=True)
        t1 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        (det + extra["loss_hd"] + extra["loss_tfd"]).backward()
        t2 = time.perf_counter()
        timings["tbd_bwd"].append((t2 - t1) - (t1 - t0))

    timings: dict[str, list[float]] = {
        k: [] for k in ("student", "teacher", "distill", "overhead", "tbd_bwd")
    }
    for _ in range(2):  # warm-up
        student_step(), teacher_forward(), distill_step()
    for _ in range(args.iters):  # interleaved, so each difference sees the same machine load
        t = [time.perf_counter()]
        for fn in (student_step, teacher_forward, distill_step):
            fn()
            t.append(time.perf_counter())
        s, te, d = t[1] - t[0], t[2] - t[1], t[3] - t[2]
        for key, value in (("student", s), ("teacher", te), ("distill", d), ("overhead", d - s - te)):
            timings[key].append(value)
        tbd_backward()
    med = {k: statistics.median(v) for k, v in timings.items()}
    result = {
        "student_step_s": med["student"],
        "teacher_forward_s": med["teacher"],
        "distill_step_s": med["distill"],
        "overhead_s": med["overhead"],
        "overhead_share": med["overhead"] / med["distill"],
        "tbd_fwd_s": _median_time(tbd_forward, args.iters),
        "tbd_bwd_s": med["tbd_bwd"],
    }
    storage.__exit__(None, None, None)
    result["tbd_fwd_share"] = result["tbd_fwd_s"] / result["distill_step_s"]
    result["tbd_total_share"] = (result["tbd_fwd_s"] + result["tbd_bwd_s"]) / result["distill_step_s"]
    result["magnitudes_at_start"] = magnitudes
    result["strides"] = model.strides
    return result


def _rss_kib() -> int:
    """Current resident set size of this process in KiB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() // 1024


def _hw(size: str | int) -> tuple[int, int]:
    """``"800x1333"`` -> (800, 1333); ``128`` -> (128, 128)."""
    text = str(size)
    if "x" in text:
        h, w = text.split("x")
        return int(h), int(w)
    return int(text), int(text)


def memory_case(
    student: str, teacher: str, kind: str, batch_size: int, size: str | int, threads: int, gts: int = 3
) -> dict:
    """Peak memory (MiB) of two steps of one kind, above the built TBDistiller and batch.

    Runs in its own process (``fresh_process.run_case``): ``ru_maxrss`` is a high-water mark
    for the whole process. No BatchNorm calibration here (memory does not depend on the weights'
    values, and a calibration forward would raise the mark before the measurement).
    """
    if threads:
        torch.set_num_threads(threads)
    h, w = _hw(size)
    opts = ["INPUT.MIN_SIZE_TRAIN", f"({min(h, w)},)", "INPUT.MAX_SIZE_TRAIN", str(max(h, w))]
    torch.manual_seed(0)
    model = build_model(distill_config(student, teacher, opts))
    batch = synthetic_batch(batch_size, (h, w), boxes_per_image=gts, seed=0)
    model.train()

    def step() -> None:
        if kind == "student":
            model.student.zero_grad(set_to_none=True)
            sum(model.student(batch).values()).backward()
        elif kind == "teacher":
            model.teacher_levels(batch)
        else:
            model.zero_grad(set_to_none=True)
            sum(model(batch).values()).backward()

    base = _rss_kib()
    with EventStorage():
        for _ in range(2):
            step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def mib(module: torch.nn.Module) -> float:
        return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20

    return {
        "kind": kind,
        "peak_mib": (peak - base) / 1024,
        "models_and_batch_mib": base / 1024,
        "param_mib": mib(model),
        "student_param_mib": mib(model.student),
        "teacher_param_mib": mib(model.teacher),
    }


def bench_memory(student: str, teacher: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in STEP_KINDS:
        out[kind] = run_case(
            "bench_tbd_overhead",
            "memory_case",
            student,
            teacher,
            kind,
            args.batch,
            args.size,
            args.threads,
            args.gts,
        )
    extra = out["distill"]["peak_mib"] - out["student"]["peak_mib"]
    out["distill_minus_student_mib"] = extra
    out["distill_over_student"] = out["distill"]["peak_mib"] / out["student"]["peak_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", default="128", help="image side, or HxW (e.g. 800x1333)")
    parser.add_argument("--gts", type=int, default=3, help="GT boxes per image")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave as is)")
    parser.add_argument("--teacher-amp", default="", choices=["", "bf16", "fp16"])
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument(
        "--memory", action="store_true", help="measure peak memory per step kind instead of time"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    if args.memory:
        for name in args.pairs:
            student, teacher = PAIRS[name]
            r = bench_memory(student, teacher, args)
            results[name] = {"student": student, "teacher": teacher, **r}
            print(
                f"{name:20s} {teacher} -> {student}: peak above models + batch: student step "
                f"{r['student']['peak_mib']:.0f} MiB  teacher fwd {r['teacher']['peak_mib']:.0f} MiB  "
                f"distill step {r['distill']['peak_mib']:.0f} MiB  (distill - student "
                f"{r['distill_minus_student_mib']:+.0f} MiB, x{r['distill_over_student']:.2f}); "
                f"models + batch {r['distill']['models_and_batch_mib']:.0f} MiB RSS (parameters: student "
                f"{r['distill']['student_param_mib']:.0f} MiB, teacher {r['distill']['teacher_param_mib']:.0f} "
                "MiB)",
                flush=True,
            )
        print(
            f"batch {args.batch}, {args.size} px, {args.gts} GTs/image, "
            f"{args.threads or torch.get_num_threads()} thread(s), CPU; x = distill step / student step"
        )
        if args.json:
            with open(args.json, "w") as f:
                f.write(jsonio.dumps(results, indent=2))
        return
    for name in args.pairs:
        student, teacher = PAIRS[name]
        r = bench_pair(student, teacher, args)
        results[name] = {"student": student, "teacher": teacher, **r}
        m = r["magnitudes_at_start"]
        print(
            f"{name:20s} {teacher} -> {student}: student {r['student_step_s']:.3f}s  teacher "
            f"{r['teacher_forward_s']:.3f}s  distill {r['distill_step_s']:.3f}s  overhead "
            f"{r['overhead_s']:+.3f}s ({100 * r['overhead_share']:+.1f}%)  TBD losses fwd "
            f"{r['tbd_fwd_s'] * 1000:.1f}ms + bwd {r['tbd_bwd_s'] * 1000:.1f}ms = "
            f"{100 * r['tbd_total_share']:.1f}% of the step  | start: det "
            f"{m['detection']:.2f} HD {m['hd_raw']:.3f} TFD {m['tfd_raw']:.1f}",
            flush=True,
        )
    print(
        f"batch {args.batch}, {args.size} px, {torch.get_num_threads()} thread(s), {args.iters} timed iters"
    )
    if args.json:
        with open(args.json, "w") as f:
            f.write(jsonio.dumps(results, indent=2))


if __name__ == "__main__":
    main()
