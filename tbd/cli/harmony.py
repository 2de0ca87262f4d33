"""``tbd harmony``: compare the harmonious-prediction ratios of several models on one dataset."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from detectron2.config import CfgNode

from tbd import jsonio
from tbd.cli import common
from tbd.cli.common import UsageError, console
from tbd.cli.rundata import restore_data


@dataclass(frozen=True)
class ModelSpec:
    """One model to measure: a name and either (config, weights) or a run directory."""

    name: str | None
    config: str | None = None
    weights: str | None = None
    run_dir: str | None = None


def _split_name(text: str) -> tuple[str | None, str]:
    """``NAME=REST`` -> (NAME, REST); a leading part that looks like a path is not a name."""
    head, sep, rest = text.partition("=")
    if sep and head and not any(c in head for c in "/\\:") and rest:
        return head, rest
    return None, text


def parse_model_spec(text: str) -> ModelSpec:
    """``[NAME=]CONFIG:WEIGHTS``; weights may be a URL (split at the first ``:``)."""
    name, rest = _split_name(text)
    config, sep, weights = rest.partition(":")
    if not sep or not config or not weights:
        raise argparse.ArgumentTypeError(f"expected NAME=CONFIG:WEIGHTS, got {text!r}")
    return ModelSpec(name=name, config=config, weights=weights)


def parse_run_spec(text: str) -> ModelSpec:
    """``[NAME=]RUN_DIR``; without a name the folder's name is used."""
    name, rest = _split_name(text)
    if not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN_DIR or RUN_DIR, got {text!r}")
    return ModelSpec(name=name or Path(rest.rstrip("/\\")).name or rest, run_dir=rest)


def _parse_bins(text: str) -> tuple[float, ...]:
    """``10`` (ten equal bins) or ``0,0.5,0.7,1`` (explicit edges)."""
    from tbd.analysis.harmony import default_bin_edges

    try:
        if "," not in text:
            return default_bin_edges(int(text))
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--bins: a bin count or comma-separated edges, got {text!r}"
        ) from err


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "harmony",
        help="compare harmonious-prediction ratios of models",
        description=(
            "Measure how often each model's confident ('easily classified') predictions are also well "
            "localised: the IoU distribution of predictions with score >= --score-thresh against their "
            "best-matching ground-truth box, the share with IoU >= --iou-thresh (and >= 0.5), and the "
            "mean harmony score 1 - tanh(|score - IoU|). Writes a table, harmony.json and harmony.png "
            "(the TBD paper's Table 1 observation on your data). See docs/HARMONY.md."
        ),
    )
    p.add_argument(
        "--model",
        "-m",
        dest="models",
        action="append",
        type=parse_model_spec,
        metavar="NAME=CONFIG:WEIGHTS",
        help="a model by config (path or name under configs/) and checkpoint; repeatable",
    )
    p.add_argument(
        "--run",
        dest="models",
        action="append",
        type=parse_run_spec,
        metavar="[NAME=]RUN_DIR",
        help="a directory written by tbd train / tbd distill (config.yaml + model_final.pth); repeatable",
    )
    g = p.add_argument_group("thresholds")
    g.add_argument(
        "--score-thresh", type=float, default=0.5, help="easily classified: score >= this (default 0.5)"
    )
    g.add_argument("--iou-thresh", type=float, default=0.7, help="harmonious: IoU >= this (default 0.7)")
    g.add_argument(
        "--score-floor",
        type=float,
        default=None,
        help=(
            "ignore predictions below this score; mean HS is over the rest (default 0.05, or "
            "--score-thresh when that is lower). Each model's own test score threshold "
            "(MODEL.*.SCORE_THRESH_TEST) is lowered to it, so that it outputs those predictions"
        ),
    )
    g.add_argument(
        "--bins",
        type=_parse_bins,
        default=None,
        help="IoU bins: a count of equal bins (default 10) or comma-separated edges from 0 to 1",
    )
    g.add_argument(
        "--class-agnostic",
        action="store_true",
        help="match predictions with GT boxes of any class (default: same class only)",
    )
    p.add_argument(
        "--output",
        "-o",
        default="runs/harmony",
        help="writes harmony.json and harmony.png (default runs/harmony)",
    )
    p.add_argument("--max-images", type=int, help="only the first N images of the dataset (quick runs)")
    common.add_dataset_args(p)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    common.add_opts_arg(p)
    p.set_defaults(func=run)


# --- models ---------------------------------------------------------------------------------
def resolve_spec(spec: ModelSpec) -> tuple[str, Path, str]:
    """(name, config path, weights) of a spec, with clear errors for missing files."""
    from tbd.cli.evaluate import resolve_run
    from tbd.config import resolve_config_path

    if spec.run_dir is not None:
        if not Path(spec.run_dir).is_dir():
            raise UsageError(f"run directory {spec.run_dir} does not exist")
        cfg_path, weights = resolve_run(argparse.Namespace(run=spec.run_dir, config=None, weights=None))
        return str(spec.name), cfg_path, str(weights)
    assert spec.config is not None and spec.weights is not None
    try:
        cfg_path = resolve_config_path(spec.config)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    if "://" not in spec.weights and not Path(spec.weights).is_file():
        raise UsageError(f"weights file {spec.weights} does not exist")
    return spec.name or cfg_path.stem, cfg_path, spec.weights


def as_plain_detector(cfg: CfgNode) -> CfgNode:
    """A TBDistiller config becomes its student's (the distiller's eval forward is the student's)."""
    from tbd.export import student_cfg

    if cfg.MODEL.META_ARCHITECTURE == "TBDistiller" and cfg.DISTILL.STUDENT_META_ARCHITECTURE in (
        "",
        "TBDistiller",
    ):
        raise UsageError("the config is a TBDistiller one without DISTILL.STUDENT_META_ARCHITECTURE")
    return student_cfg(cfg)


class _StudentView(torch.nn.Module):
    """``model`` registered as ``student``: its state-dict keys are a TBDistiller checkpoint's ``student.*``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.student = model


def load_detector_weights(model: torch.nn.Module, weights: str, distilled_first: bool = False) -> None:
    """Load a plain checkpoint, or the ``student.*`` part of a TBDistiller checkpoint, into ``model``.

    Both go through :func:`tbd.engine.checkpoint.load_weights_checked` (every model tensor must be
    found). The kind is not guessed from the file: the likelier one is tried first (``distilled_first``
    for a TBDistiller run's config), the other on a mismatch; the first error is reported if both fail.
    """
    from tbd.engine.checkpoint import WeightsMismatchError, load_weights_checked

    if "://" in weights:
        from detectron2.utils.file_io import PathManager

        try:
            weights = PathManager.get_local_path(weights)
        except Exception as err:
            raise UsageError(
                f"could not fetch {weights} ({type(err).__name__}: {err}); download it where there is "
                "network access and pass the local file"
            ) from err
    attempts = [_StudentView(model), model] if distilled_first else [model, _StudentView(model)]
    first: WeightsMismatchError | None = None
    for target in attempts:
        try:
            load_weights_checked(target, weights)
            return
        except WeightsMismatchError as err:
            first = first or err
    raise UsageError(str(first)) from first


def build_model_for(cfg_path: Path, weights: str, args: argparse.Namespace, test: str) -> tuple[CfgNode, Any]:
    """The detector of ``cfg_path`` (a TBDistiller's student) with ``weights``, in eval mode."""
    from detectron2.modeling import build_model

    from tbd.config import load_config

    raw = load_config(cfg_path)
    cfg = as_plain_detector(raw)
    common.apply_common(cfg, args, cfg.DATASETS.TRAIN[0] if cfg.DATASETS.TRAIN else test, test)
    lower_test_score_thresholds(cfg, score_floor(args))
    model = build_model(cfg)
    load_detector_weights(model, weights, distilled_first=raw.MODEL.META_ARCHITECTURE == "TBDistiller")
    model.eval()
    return cfg, model


DEFAULT_SCORE_FLOOR = 0.05


def score_floor(args: argparse.Namespace) -> float:
    """``--score-floor``, else 0.05 or ``--score-thresh`` when that is lower."""
    if args.score_floor is not None:
        return float(args.score_floor)
    return min(DEFAULT_SCORE_FLOOR, float(args.score_thresh))


def lower_test_score_thresholds(cfg: CfgNode, floor: float) -> None:
    """Every head's own test-time score threshold (``MODEL.<HEAD>.SCORE_THRESH_TEST``) at most
    ``floor``: a model drops predictions below its threshold before the measurement sees them."""
    for node in cfg.MODEL.values():
        if isinstance(node, CfgNode) and "SCORE_THRESH_TEST" in node:
            node.SCORE_THRESH_TEST = min(float(node.SCORE_THRESH_TEST), floor)


def pick_test_dataset(args: argparse.Namespace, cfg_paths: Sequence[Path]) -> str:
    """The dataset the user named, else the models' common ``DATASETS.TEST[0]``."""
    from detectron2.data import DatasetCatalog

    from tbd.config import load_config

    dataset_given = any(getattr(args, k, None) for k in ("dataset", "train_json", "val_json"))
    _, test = common.resolve_datasets(args, need_train=False)  # also registers the embedded dataset
    if dataset_given:
        return test
    tests = {load_config(p).DATASETS.TEST[0] for p in cfg_paths}
    if len(tests) > 1:
        raise UsageError(
            f"the models were configured for different test sets {sorted(tests)}: pass --dataset"
        )
    found = tests.pop()
    if found not in DatasetCatalog.list():
        raise UsageError(
            f"the models' test set {found!r} is not registered here: pass --dataset or --val-json/--val-images"
        )
    return found


# --- output ---------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100.0 * v:.1f}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def threshold_text(t: dict[str, Any]) -> str:
    return (
        f"easy: score >= {t['score_thresh']:g}; harmonious: IoU >= {t['iou_thresh']:g}; "
        f"mean HS over score >= {t['score_floor']:g}; matching: "
        + ("any class" if t["class_agnostic"] else "same class")
    )


def print_tables(summaries: dict[str, dict[str, Any]], dataset: str) -> None:
    """One row per model (counts, harmonious shares, mean HS), then the IoU distributions (one column
    per model), with every threshold in the titles."""
    from rich.table import Table

    from tbd.analysis.harmony import bin_labels, thresholds_of

    t = thresholds_of(next(iter(summaries.values())))
    iou_keys = [f"{x:g}" for x in t["reported_iou_thresholds"]]
    table = Table(
        title=f"Harmonious predictions on {dataset}\n{threshold_text(t)}",
        caption=(
            "harm.% @x: % of the easy predictions with IoU >= x; IoU easy: their mean IoU; "
            "HS: mean 1 - tanh(|score - IoU|) over all predictions, HS easy: over the easy ones"
        ),
    )
    table.add_column("model", overflow="fold", min_width=8)
    for col in ("images", "preds", "easy"):
        table.add_column(col, justify="right")
    for k in iou_keys:
        table.add_column(f"harm.%\n@{k}", justify="right")
    for col in ("IoU\neasy", "HS", "HS\neasy"):
        table.add_column(col, justify="right")
    for name, s in summaries.items():
        table.add_row(
            name,
            str(s["num_images"]),
            str(s["num_predictions"]),
            str(s["num_easy"]),
            *(_pct(s["harmonious_share_at"][k]) for k in iou_keys),
            _num(s["mean_iou_easy"]),
            _num(s["mean_hs"]),
            _num(s["mean_hs_easy"]),
        )
    console.print(table)
    dist = Table(
        title=f"IoU of the easily classified predictions (score >= {t['score_thresh']:g}), % per bin"
    )
    dist.add_column("IoU bin", no_wrap=True)
    for name in summaries:
        dist.add_column(name, justify="right", overflow="fold")
    shares = [s["easy_iou_shares"] for s in summaries.values()]
    for i, label in enumerate(bin_labels(t["bin_edges"])):
        dist.add_row(label, *(_pct(col[i]) for col in shares))
    console.print(dist)


def write_outputs(
    out: Path, dataset: str, summaries: dict[str, dict[str, Any]], sources: dict[str, dict[str, str]]
) -> tuple[Path, Path]:
    from tbd.analysis.plot import plot_harmony

    out.mkdir(parents=True, exist_ok=True)
    from tbd.analysis.harmony import thresholds_of

    thresholds = thresholds_of(next(iter(summaries.values())))
    payload = {
        "dataset": dataset,
        "thresholds": thresholds,
        "models": {name: {**sources[name], **summaries[name]} for name in summaries},
    }
    json_path = out / "harmony.json"
    json_path.write_text(jsonio.dumps(payload, indent=2))
    png_path = plot_harmony(summaries, out / "harmony.png", title=f"Harmonious predictions on {dataset}")
    return json_path, png_path


# --- command ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from tbd.analysis.harmony import HarmonyThresholds, default_bin_edges, measure_harmony

    specs: list[ModelSpec] = list(args.models or [])
    if not specs:
        raise UsageError("name at least one model: --model NAME=CONFIG:WEIGHTS or --run [NAME=]RUN_DIR")
    if args.max_images is not None and args.max_images < 1:
        raise UsageError(f"--max-images must be positive, got {args.max_images}")
    try:
        thresholds = HarmonyThresholds(
            score_thresh=args.score_thresh,
            iou_thresh=args.iou_thresh,
            score_floor=score_floor(args),
            bin_edges=args.bins or default_bin_edges(),
            class_agnostic=args.class_agnostic,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    resolved = [resolve_spec(s) for s in specs]
    names = [r[0] for r in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"model names must be unique, repeated: {duplicates} (use NAME=...)")
    restore_data(args, [Path(s.run_dir) for s in specs if s.run_dir is not None])  # runs know their data
    dataset = pick_test_dataset(args, [r[1] for r in resolved])
    console.print(
        f"[bold]tbd harmony[/] {len(resolved)} model(s) on {dataset}: {threshold_text(thresholds.as_dict())}"
    )

    summaries: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for name, cfg_path, weights in resolved:
        cfg, model = build_model_for(cfg_path, weights, args, dataset)
        with console.status(f"measuring {name} ..."):
            summaries[name] = measure_harmony(
                cfg,
                model,
                dataset,
                score_thresh=thresholds.score_thresh,
                iou_thresh=thresholds.iou_thresh,
                score_floor=thresholds.score_floor,
                bin_edges=thresholds.bin_edges,
                class_agnostic=thresholds.class_agnostic,
                max_images=args.max_images,
            )
        sources[name] = {
            "config": str(cfg_path),
            "weights": str(weights),
            "architecture": cfg.MODEL.META_ARCHITECTURE,
        }
        del model

    print_tables(summaries, dataset)
    json_path, png_path = write_outputs(Path(args.output), dataset, summaries, sources)
    console.print(f"written: {json_path}, {png_path}")
    return 0
