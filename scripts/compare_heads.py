"""Train several detector configs for the same iterations on the embedded dataset and compare COCO AP.

Each positional argument is ``CONFIG[:KEY=VALUE,KEY=VALUE...]``: a config (path or name under
``configs/``) and optional Detectron2 overrides for that run only (commas inside brackets or
parentheses do not split). ``--opts`` applies to every run. tbd's ``Trainer`` (Detectron2's
``DefaultTrainer`` plus ``SOLVER.OPTIMIZER``) trains each one (same seed, same schedule),
``COCOEvaluator`` scores it on the validation split; the script prints a table of AP / AP50 /
AP75 and writes json. A run whose ``row.json`` exists with the same overrides is not repeated.

    .venv/bin/python scripts/compare_heads.py retinanet_R18_FPN tood_R18_FPN --iters 1500 \
        --output-dir /tmp/compare_heads --json docs/compare_heads.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tbd import jsonio


def split_spec(spec: str) -> tuple[str, list[str]]:
    """``"cfg:A=1,B=(1, 2)"`` -> ``("cfg", ["A", "1", "B", "(1, 2)"])``."""
    name, _, rest = spec.partition(":")
    opts: list[str] = []
    depth, item = 0, ""
    for ch in rest + ",":
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            if item.strip():
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"override {item!r} in {spec!r} is not KEY=VALUE")
                opts += [key.strip(), value.strip()]
            item = ""
        else:
            item += ch
    return name, opts


def schedule_opts(iters: int, ims_per_batch: int | None) -> list[str]:
    """The same schedule for every run: LR steps at 73% and 90%, warm-up on the first ~7%."""
    opts = [
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", f"({int(iters * 0.73)}, {int(iters * 0.9)})",
        "SOLVER.WARMUP_ITERS", str(min(100, max(1, iters // 15))),
        "SOLVER.CHECKPOINT_PERIOD", str(10 * iters),
        "TEST.EVAL_PERIOD", "0",
    ]  # fmt: skip
    if ims_per_batch:
        opts += ["SOLVER.IMS_PER_BATCH", str(ims_per_batch)]
    return opts


def train_and_evaluate(config: str, opts: list[str], output_dir: Path) -> dict[str, Any]:
    from tbd.config import load_config
    from tbd.engine.trainer import Trainer  # Detectron2's DefaultTrainer + SOLVER.OPTIMIZER

    cfg = load_config(config, opts)
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.freeze()
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    trainer = Trainer(cfg, progress=False)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_s = time.time() - start
    results = getattr(trainer, "_last_eval_results", None) or Trainer.test(cfg, trainer.model)
    bbox = results.get("bbox", {})
    return {
        "config": config,
        "opts": opts,
        "AP": bbox.get("AP", float("nan")),
        "AP50": bbox.get("AP50", float("nan")),
        "AP75": bbox.get("AP75", float("nan")),
        "train_seconds": round(train_s, 1),
        "bbox": bbox,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("specs", nargs="+", help="CONFIG[:KEY=VALUE,...]")
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--ims-per-batch", type=int, default=None)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--data-root", default=None, help="dataset cache (default: $TBD_DATA_DIR or ~/.cache/tbd)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="overrides for every run")
    p.add_argument("--output-dir", type=Path, default=Path("/tmp/compare_heads"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from tbd.data.shapes import register_shapes  # importing tbd applies its Detectron2 shims first

    register_shapes(root=args.data_root, num_train=args.num_train, num_val=args.num_val)
    from detectron2.utils.logger import setup_logger

    common = ["SEED", str(args.seed), *schedule_opts(args.iters, args.ims_per_batch), *args.opts]
    rows = []
    for i, spec in enumerate(args.specs):
        config, opts = split_spec(spec)
        out = args.output_dir / f"{i:02d}_{Path(config).stem}"
        done = out / "row.json"
        previous = json.loads(done.read_text()) if done.is_file() else {}
        if previous.get("opts") == common + opts:
            print(f"[{i + 1}/{len(args.specs)}] {spec}: already done in {out}", flush=True)
            rows.append(previous)
            continue
        d2_logger = logging.getLogger("detectron2")
        d2_logger.handlers = []  # each run logs to its own file only
        setup_logger(output=str(out / "log.txt"), name="detectron2")
        # keep the log file, drop the console handler
        d2_logger.handlers = [h for h in d2_logger.handlers if getattr(h, "stream", None) is not sys.stdout]
        print(f"[{i + 1}/{len(args.specs)}] training {spec} for {args.iters} iterations -> {out}", flush=True)
        rows.append(train_and_evaluate(config, common + opts, out))
        done.write_text(jsonio.dumps(rows[-1], indent=1))

    print(f"\n{'config':<60} {'AP':>6} {'AP50':>6} {'AP75':>6} {'train s':>8}")
    for r in rows:
        extra = r["opts"][len(common) :]
        label = r["config"] + "".join(f" {k}={v}" for k, v in zip(extra[::2], extra[1::2]))
        print(f"{label:<60} {r['AP']:>6.2f} {r['AP50']:>6.2f} {r['AP75']:>6.2f} {r['train_seconds']:>8.1f}")
    if args.json:
        meta = {"iters": args.iters, "num_train": args.num_train, "num_val": args.num_val, "seed": args.seed}
        args.json.write_text(jsonio.dumps({"meta": meta, "runs": rows}, indent=1))
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
