"""``tbd harmony`` end to end on tiny random RetinaNets and the embedded dataset (4 images)."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest
import torch

from tbd.cli import harmony
from tbd.cli.common import UsageError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tbd")
    harmony.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _cli(argv: list[str]) -> int:
    args = _parser().parse_args(["harmony", *argv])
    return int(args.func(args))


def _confident(model: torch.nn.Module, bias: float) -> None:
    """A random RetinaNet scores ~0.01 (its prior); raise the class bias so predictions are confident."""
    with torch.no_grad():
        model.head.cls_score.bias.fill_(bias)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from tbd.config import load_config
    from tbd.data import register_shapes
    from tbd.distill.testing import distill_config

    root = tmp_path_factory.mktemp("harmony")
    register_shapes(root=root / "data", num_train=4, num_val=4)
    torch.manual_seed(0)

    # a plain model given as config + weights
    cfg = load_config("retinanet_R18_FPN")
    plain = build_model(cfg)
    _confident(plain, 2.0)
    (root / "plain").mkdir()
    DetectionCheckpointer(plain, save_dir=str(root / "plain")).save("weights")

    # a run directory of a TBDistiller (config.yaml + model_final.pth with student.* keys)
    dcfg = distill_config(opts=["DISTILL.TEACHER_WEIGHTS", ""])
    distiller = build_model(dcfg)
    _confident(distiller.student, 0.5)
    run_dir = root / "distilled_run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dcfg.dump())
    DetectionCheckpointer(distiller, save_dir=str(run_dir)).save("model_final")
    return {
        "root": root,
        "plain_weights": root / "plain" / "weights.pth",
        "run_dir": run_dir,
        "dcfg": dcfg,
        "distiller": distiller,
    }


def test_three_models_write_table_json_and_png(setup: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    out = setup["root"] / "out"
    rc = _cli(
        [
            "--model", f"plain=retinanet_R18_FPN:{setup['plain_weights']}",
            "--run", str(setup["run_dir"]),
            # a plain (e.g. exported) student checkpoint with the distillation run's config
            "--model", f"exported={setup['run_dir'] / 'config.yaml'}:{setup['plain_weights']}",
            "--dataset", "tbd_shapes_val",
            "--max-images", "2",
            "--output", str(out),
            "DATALOADER.NUM_WORKERS", "0",
        ]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    printed = " ".join(printed.split())  # rich wraps at the terminal width
    assert "score >= 0.5" in printed and "IoU >= 0.7" in printed and "distilled_run" in printed

    data = json.loads((out / "harmony.json").read_text())
    assert data["dataset"] == "tbd_shapes_val"
    assert data["thresholds"]["score_thresh"] == 0.5 and data["thresholds"]["iou_thresh"] == 0.7
    assert list(data["models"]) == ["plain", "distilled_run", "exported"]  # command-line order
    plain, distilled, exported = (data["models"][k] for k in ("plain", "distilled_run", "exported"))
    assert distilled["architecture"] == "RetinaNet"  # evaluated as the TBDistiller's student
    assert exported["easy_iou_counts"] == plain["easy_iou_counts"]  # same weights, same numbers
    for m in (plain, distilled, exported):
        assert m["num_images"] == 2
        assert sum(m["easy_iou_counts"]) == m["num_easy"]
        assert m["num_easy"] <= m["num_predictions"] <= 2 * 100
    # bias 2.0 -> scores near 0.88: confident predictions exist (the capped 100 per image)
    assert plain["num_easy"] > 0 and 0.0 <= plain["harmonious_share"] <= 1.0
    assert sum(plain["easy_iou_shares"]) == pytest.approx(1.0)

    png = (out / "harmony.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_distiller_run_is_measured_as_its_student(setup: dict[str, Any]) -> None:
    """The CLI's student-only load gives what the TBDistiller itself (eval forward) gives, whether the
    distiller checkpoint comes with its run's config or with the plain student config."""
    from tbd.analysis import measure_harmony

    out = setup["root"] / "student_check"
    final = setup["run_dir"] / "model_final.pth"
    args = ["--run", f"d={setup['run_dir']}", "--model", f"p=retinanet_R18_FPN:{final}"]
    args += ["--dataset", "tbd_shapes_val", "--max-images", "2", "--score-thresh", "0.4"]
    args += ["--bins", "0,0.5,0.7,1", "--output", str(out), "DATALOADER.NUM_WORKERS", "0"]
    assert _cli(args) == 0
    models = json.loads((out / "harmony.json").read_text())["models"]

    dcfg = setup["dcfg"].clone()
    dcfg.DATALOADER.NUM_WORKERS = 0
    direct = measure_harmony(
        dcfg, setup["distiller"], "tbd_shapes_val", score_thresh=0.4, bin_edges=(0, 0.5, 0.7, 1), max_images=2
    )
    assert direct["num_predictions"] > 0 and direct["score_thresh"] == 0.4
    for from_cli in (models["d"], models["p"]):
        for key in ("num_predictions", "num_easy", "easy_iou_counts", "harmonious_share_at", "bin_edges"):
            assert from_cli[key] == direct[key]
        assert from_cli["mean_hs"] == pytest.approx(direct["mean_hs"])


def test_weights_that_do_not_fit_are_refused(setup: dict[str, Any]) -> None:
    model, cfg_path, weights = "r50", "retinanet_R50_FPN", setup["plain_weights"]
    with pytest.raises(UsageError, match="do not fit"):
        _cli(["--model", f"{model}={cfg_path}:{weights}", "--dataset", "tbd_shapes_val", "--max-images", "1"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "at least one model"),
        (["--model", "a=retinanet_R18_FPN:/nonexistent.pth"], "does not exist"),
        (["--model", "a=no_such_config:/x.pth"], "not found"),
        (["--run", "/nonexistent/run"], "does not exist"),
        (["--model", "a=retinanet_R18_FPN:{w}", "--model", "a=retinanet_R18_FPN:{w}"], "unique"),
        (["--model", "a=retinanet_R18_FPN:{w}", "--iou-thresh", "2"], "iou_thresh"),
        (["--model", "a=retinanet_R18_FPN:{w}", "--max-images", "0"], "positive"),
    ],
)
def test_usage_errors(setup: dict[str, Any], argv: list[str], message: str) -> None:
    argv = [a.replace("{w}", str(setup["plain_weights"])) for a in argv]
    with pytest.raises(UsageError, match=message):
        _cli(argv)


def test_model_and_run_specs_parse() -> None:
    spec = harmony.parse_model_spec("t=coco/retinanet_R_101_FPN_3x.yaml:detectron2://x/model_final.pkl")
    assert (spec.name, spec.config, spec.weights) == (
        "t",
        "coco/retinanet_R_101_FPN_3x.yaml",
        "detectron2://x/model_final.pkl",
    )
    assert harmony.parse_model_spec("configs/a.yaml:w.pth").name is None
    assert harmony.parse_run_spec("runs/tbd_r18/").name == "tbd_r18"
    assert harmony.parse_run_spec("s=runs/x").name == "s"
    with pytest.raises(argparse.ArgumentTypeError):
        harmony.parse_model_spec("only_a_config.yaml")
    with pytest.raises(SystemExit):  # argparse reports the bad --bins value
        _parser().parse_args(["harmony", "--bins", "a,b"])
