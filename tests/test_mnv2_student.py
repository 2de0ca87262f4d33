"""`mnv2` as a student name: registry, profiles, ImageNet initialisation and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from tbd.config import load_config
from tbd.engine.weights import WeightsError, load_initial_weights
from tbd.modeling.backbones.mobilenet import MobileNetV2
from tbd.profiles import apply_profile
from tbd.registry import HEAD_CONFIGS, STUDENT_NAMES, RegistryError, student_spec


def _cfg(head: str = "tal"):
    spec = student_spec("mnv2", head)
    return load_config(spec.config, spec.opts)


@pytest.mark.parametrize("head", list(HEAD_CONFIGS))
def test_every_head_has_an_mnv2_student(head: str) -> None:
    assert "mnv2" in STUDENT_NAMES
    spec = student_spec("mnv2", head)
    assert spec.config.name.endswith("_MNV2_FPN.yaml") and spec.description.startswith("MobileNetV2")
    assert "mobilenet_v2" in load_config(spec.config, spec.opts).MODEL.BACKBONE.NAME


def test_unknown_student_lists_mnv2() -> None:
    with pytest.raises(RegistryError, match="r101, mnv2"):
        student_spec("mnv3")


def test_coco_profile_on_mnv2_freezes_like_detectron2_and_names_torchvision_weights() -> None:
    cfg = _cfg()
    info = apply_profile(cfg, "coco", train_name="coco_2017_train")
    assert cfg.MODEL.WEIGHTS == "torchvision://mobilenet_v2" == info.weights
    assert cfg.MODEL.MOBILENET.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert cfg.MODEL.FPN.OUT_CHANNELS == 256
    model = build_model(cfg)
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, MobileNetV2)
    assert type(bottom_up.m5[0].expand.norm).__name__ == "FrozenBatchNorm2d"
    assert not any(p.requires_grad for p in bottom_up.m2.parameters())  # FREEZE_AT 2: stem and m2
    assert all(p.requires_grad for p in bottom_up.m3.parameters())


def test_from_scratch_mnv2_trains_batchnorm() -> None:
    cfg = _cfg("dw")
    apply_profile(cfg, "coco", train_name="coco_2017_train", from_scratch=True)
    assert (cfg.MODEL.WEIGHTS, cfg.MODEL.MOBILENET.NORM, cfg.MODEL.BACKBONE.FREEZE_AT) == ("", "BN", 0)
    cfg = _cfg("dw")
    apply_profile(cfg, "coco", train_name="coco_2017_train", from_scratch=True, world_size=4)
    assert cfg.MODEL.MOBILENET.NORM == "SyncBN"


def test_torchvision_mobilenet_v2_fills_the_student_backbone(imagenet_torch_home: Path) -> None:
    import torchvision

    cfg = _cfg()
    apply_profile(cfg, "coco", train_name="coco_2017_train")
    model = build_model(cfg)
    report = load_initial_weights(model, cfg.MODEL.WEIGHTS)
    assert report is not None and report.kind == "torchvision-mobilenet_v2"
    assert report.filled == report.target_total == 260 and report.complete
    assert report.summary().endswith("260/260 backbone.bottom_up tensors filled")
    tv = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1").state_dict()
    # features.14 is the first block of m5 (see tbd.modeling.backbones.mobilenet's stage table)
    assert torch.equal(model.backbone.bottom_up.m5[0].expand.weight, tv["features.14.conv.0.0.weight"])
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, tv["features.0.0.weight"])


def test_mobilenet_weights_into_a_resnet_student_is_a_clear_error(imagenet_torch_home: Path) -> None:
    spec = student_spec("r18", "tal")
    model = build_model(load_config(spec.config, spec.opts))
    with pytest.raises(WeightsError, match="holds MobileNetV2 weights.*torchvision://resnet18"):
        load_initial_weights(model, "torchvision://mobilenet_v2")


def test_tbd_train_mnv2_from_imagenet_on_the_command_line(tmp_path: Path, imagenet_torch_home: Path) -> None:
    args = [
        "train", "--model", "mnv2", "--head", "tal", "--weights", "torchvision://mobilenet_v2",
        "--iters", "2", "--data-dir", str(tmp_path / "data"), "--num-train-images", "8",
        "--num-val-images", "4", "--batch-size", "2", "--device", "cpu", "--output", "run",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tbd.cli.main", *args],
        cwd=tmp_path,
        env={**os.environ, "TORCH_HOME": str(imagenet_torch_home)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "initial weights torchvision://mobilenet_v2 (torchvision-mobilenet_v2): 260/260" in out
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert cfg.MODEL.WEIGHTS == "torchvision://mobilenet_v2" and cfg.INPUT.FORMAT == "RGB"
    assert (tmp_path / "run" / "model_final.pth").is_file()
