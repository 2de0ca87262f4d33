"""``tbd eval``: COCO evaluation of a checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tbd import jsonio
from tbd.cli import common
from tbd.cli.common import UsageError, console
from tbd.cli.rundata import data_given, restore_data


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="COCO evaluation of a checkpoint",
        description=(
            "Evaluate a checkpoint with Detectron2's COCOEvaluator (pycocotools). Give --run (a "
            "directory written by tbd train/distill: its config.yaml, last checkpoint and data.json, "
            "the data it was trained on) or --config and --weights. --val-json/--val-images alone "
            "name the data to evaluate on."
        ),
    )
    p.add_argument("--run", help="a run directory (uses its config.yaml and model_final/last checkpoint)")
    p.add_argument("--config", help="Detectron2 config (path, or a name under configs/)")
    p.add_argument("--weights", help="checkpoint (.pth / .pkl)")
    p.add_argument("--output", "-o", help="where to write results.json (default: beside the weights)")
    common.add_dataset_args(p)
    p.add_argument("--device", default="auto")
    common.add_opts_arg(p)
    p.set_defaults(func=run)


def resolve_run(args: argparse.Namespace) -> tuple[Path, Path]:
    """(config, weights) from --run or --config/--weights, with clear errors."""
    if args.run:
        run_dir = Path(args.run)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise UsageError(f"{run_dir} is not a tbd run directory (no config.yaml)")
        weights = run_dir / "model_final.pth"
        if not weights.is_file():
            last = run_dir / "last_checkpoint"
            if not last.is_file():
                raise UsageError(f"{run_dir} has no checkpoint (no model_final.pth or last_checkpoint)")
            weights = run_dir / last.read_text().strip()
        return Path(args.config) if args.config else cfg_path, Path(args.weights) if args.weights else weights
    if not (args.config and args.weights):
        raise UsageError("pass --run DIR, or both --config and --weights")
    weights = Path(args.weights)
    if not weights.is_file():
        raise UsageError(f"weights file {weights} does not exist")
    return Path(args.config), weights


def evaluate(cfg_path: Path, weights: Path, args: argparse.Namespace) -> dict[str, Any]:
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from tbd.config import load_config
    from tbd.engine.checkpoint import WeightsMismatchError, load_weights_checked
    from tbd.engine.trainer import Trainer
    from tbd.export import load_student_state, student_cfg

    dataset_given = data_given(args)
    cfg = load_config(cfg_path)
    train, test = common.resolve_datasets(args, need_train=False) if dataset_given else (None, None)
    if not dataset_given:
        common.resolve_datasets(args)  # registers the embedded dataset (the config's default)
        train, test = cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST[0]
        if test not in DatasetCatalog.list():
            raise UsageError(
                f"{cfg_path} names the test set {test!r}, which is not registered here: pass --dataset "
                "or --val-json/--val-images"
            )
    common.apply_common(cfg, args, train, test)
    run_cfg_is_distill = cfg.MODEL.META_ARCHITECTURE == "TBDistiller"
    cfg = student_cfg(cfg)  # a distillation run is evaluated as its student: no teacher needed
    model = build_model(cfg)
    try:
        if run_cfg_is_distill:
            model.load_state_dict(load_student_state(weights))
        else:
            load_weights_checked(model, str(weights))
    except WeightsMismatchError as err:
        from tbd.cli.weights import mismatch_advice
        from tbd.data import num_classes

        advice = mismatch_advice(err, "model", num_classes(test), test)
        raise UsageError(f"cannot evaluate {weights} with {cfg_path}: {advice}") from err
    except RuntimeError as err:
        raise UsageError(f"cannot evaluate {weights} with {cfg_path}: {err}") from err
    return dict(Trainer.test(cfg, model))


def run(args: argparse.Namespace) -> int:
    from tbd.cli.train import print_results

    cfg_path, weights = resolve_run(args)
    if args.run:
        restore_data(args, [Path(args.run)])  # the data the run was trained on, unless named here
    results = evaluate(cfg_path, weights, args)
    print_results(results, f"{weights}")
    out = Path(args.output) if args.output else weights.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_results.json").write_text(jsonio.dumps(jsonio.strict_results(results), indent=2))
    console.print(f"results written to {out / 'eval_results.json'}")
    return 0
