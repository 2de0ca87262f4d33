"""The ImageNet-initialised registry teacher ``mnv2in``: it resolves, builds, starts from the
ImageNet file (offline: the planted one) on both entry points, and says what to pass without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tbd.config import load_config
from tbd.engine.weights import WeightsError, load_initial_weights
from tbd.registry import RegistryError, load_teachers, resolve_model, teacher_spec

INIT = "torchvision://mobilenet_v2"


def _teacher_cfg():  # noqa: ANN202
    spec, entry = teacher_spec("mnv2in", "tbd_shapes_train")
    return spec, entry, load_config(spec.config, spec.opts)


def test_registry_entry_resolves_to_a_bigger_imagenet_mnv2_than_the_student() -> None:
    spec, entry, cfg = _teacher_cfg()
    assert entry.trains_here and entry.init_weights == INIT and entry.train_iters
    assert spec.opts == ["MODEL.WEIGHTS", INIT] and spec.init_weights == INIT
    assert cfg.MODEL.WEIGHTS == INIT  # what tbd distill's train_teacher_here trains from
    student = load_config(resolve_model("mnv2").config)
    assert cfg.MODEL.BACKBONE.NAME == student.MODEL.BACKBONE.NAME == "build_mobilenet_v2_fpn_backbone"
    assert (cfg.MODEL.FPN.OUT_CHANNELS, student.MODEL.FPN.OUT_CHANNELS) == (256, 128)
    assert cfg.INPUT.MIN_SIZE_TEST == 192 > student.INPUT.MIN_SIZE_TEST == 128
    assert student.INPUT.MIN_SIZE_TEST in cfg.INPUT.MIN_SIZE_TRAIN  # it also knows the student's size
    # the ImageNet pixel convention the file expects
    assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]


def test_teacher_input_check_accepts_it_for_a_128px_student() -> None:
    from tbd.distill.input_check import check_teacher_inputs

    _, _, cfg = _teacher_cfg()
    check = check_teacher_inputs(load_config(resolve_model("mnv2").config), cfg)
    assert not check.errors and not check.warnings and check.size_ratio == pytest.approx(0.8)


def test_tbd_train_keeps_the_registry_init(tmp_path: Path) -> None:
    from tbd.cli.common import resolve_datasets
    from tbd.cli.main import build_parser
    from tbd.cli.train import build_train_cfg

    argv = [
        "train",
        "--model",
        "mnv2in",
        "--num-train-images",
        "4",
        "--num-val-images",
        "2",
        "-o",
        str(tmp_path),
    ]
    args = build_parser().parse_args(argv)
    assert build_train_cfg(args, *resolve_datasets(args)).MODEL.WEIGHTS == INIT
    torch.save({"model": {}}, tmp_path / "w.pth")
    args = build_parser().parse_args([*argv, "--weights", str(tmp_path / "w.pth")])
    assert build_train_cfg(args, *resolve_datasets(args)).MODEL.WEIGHTS == str(tmp_path / "w.pth")


def test_builds_and_loads_the_planted_imagenet_file(imagenet_torch_home: Path) -> None:
    from detectron2.modeling import build_model
    from torchvision.models import MobileNet_V2_Weights

    _, _, cfg = _teacher_cfg()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    report = load_initial_weights(model, cfg.MODEL.WEIGHTS)
    assert report is not None and report.complete and report.filled == report.target_total == 260
    file = MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    torch.testing.assert_close(model.backbone.bottom_up.stem.conv1.weight, file["features.0.0.weight"])
    fpn_out = [m for n, m in model.backbone.named_modules() if n.startswith("fpn_output")]
    assert fpn_out and all(m.out_channels == 256 for m in fpn_out)


def test_offline_without_the_file_says_what_to_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from detectron2.modeling import build_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    _, _, cfg = _teacher_cfg()
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(WeightsError) as err:
        load_initial_weights(build_model(cfg), cfg.MODEL.WEIGHTS)
    text = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth") in text
    assert "TORCH_HOME" in text and "--weights FILE" in text and "network is unreachable" in text


def test_init_weights_only_for_a_teacher_trained_here(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        "name: t\ndatasets:\n  tbd_shapes:\n    config: x.yaml\n    weights: /w.pth\n    init_weights: "
        + INIT
    )
    with pytest.raises(RegistryError, match="init_weights.*weights: train"):
        load_teachers(tmp_path)
