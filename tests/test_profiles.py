"""Student profiles (embedded / coco / custom) and the teacher-input check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from tbd.config import load_config
from tbd.distill.input_check import check_teacher_inputs
from tbd.profiles import (
    ProfileError,
    apply_profile,
    choose_input_size,
    data_sizes,
    profile_for_dataset,
    small_object_warning,
)
from tbd.registry import STUDENT_DEPTHS, student_spec

DENSE_HEADS = ("tal", "et", "dw", "retinanet", "fcos")


def _student_cfg(name: str = "r18", head: str = "tal"):
    spec = student_spec(name, head)
    return load_config(spec.config, spec.opts)


def test_default_profile_follows_the_dataset() -> None:
    assert profile_for_dataset("tbd_shapes_train") == "embedded"
    assert profile_for_dataset("coco_2017_train") == "coco"
    assert profile_for_dataset("user_instances_train") == "custom"


def test_embedded_profile_leaves_the_config_as_it_is() -> None:
    cfg = _student_cfg()
    before = cfg.dump()
    info = apply_profile(cfg, "embedded", train_name="tbd_shapes_train")
    assert cfg.dump() == before
    assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TEST, cfg.MODEL.FPN.OUT_CHANNELS) == (
        (128,),
        128,
        128,
    )
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.RESNETS.NORM == "BN" and info.input_size == 128


@pytest.mark.parametrize("name", list(STUDENT_DEPTHS))
@pytest.mark.parametrize("head", DENSE_HEADS)
def test_coco_profile_is_detectron2s_coco_setting(name: str, head: str) -> None:
    cfg = _student_cfg(name, head)
    info = apply_profile(cfg, "coco", train_name="coco_2017_train")
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 672, 704, 736, 768, 800)
    assert (cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (1333, 800, 1333)
    assert cfg.MODEL.FPN.OUT_CHANNELS == 256
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert cfg.MODEL.RESNETS.DEPTH == STUDENT_DEPTHS[name]
    assert cfg.MODEL.WEIGHTS == f"torchvision://resnet{STUDENT_DEPTHS[name]}" == info.weights
    # torchvision's ImageNet convention: RGB, ImageNet mean/std, stride in the 3x3 conv
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.IMS_PER_BATCH) == ("SGD", 0.01, 16)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (90000, (60000, 80000))
    assert cfg.MODEL.TOOD.FEAT_CHANNELS == cfg.MODEL.ETHEAD.FEAT_CHANNELS == 256
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES[0][0] == 32 and cfg.MODEL.ANCHOR_GENERATOR.SIZES[-1][0] == 512


def test_coco_profile_schedules_and_the_linear_scaling_rule() -> None:
    cfg = _student_cfg()
    apply_profile(cfg, "coco", train_name="coco_2017_train", schedule="3x")
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (270000, (210000, 250000))
    cfg = _student_cfg()
    apply_profile(cfg, "coco", train_name="coco_2017_train", schedule="2x", batch_size=8)
    assert cfg.SOLVER.IMS_PER_BATCH == 8 and cfg.SOLVER.BASE_LR == pytest.approx(0.005)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (360000, (240000, 320000))
    assert cfg.SOLVER.WARMUP_ITERS == 2000 and cfg.MODEL.TAL.WARMUP_ITERS == 2 * 29316
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 0  # DefaultTrainer must not scale a second time


def test_iters_compresses_the_profile_schedule_with_its_tal_warmup() -> None:
    from tbd.cli.common import set_iterations

    cfg = _student_cfg()
    apply_profile(cfg, "coco", train_name="coco_2017_train")
    set_iterations(cfg, 900)  # --iters 900: 1/100 of 1x
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.WARMUP_ITERS) == (900, (600, 800), 90)
    assert cfg.MODEL.TAL.WARMUP_ITERS == 293  # ATSS for the first third, as in 1x (29316 of 90000)
    embedded = _student_cfg()
    set_iterations(embedded, 50)
    assert embedded.MODEL.TAL.WARMUP_ITERS == 0  # no warm-up stays none


def test_coco_profile_faster_rcnn_gets_one_anchor_size_per_level() -> None:
    cfg = _student_cfg("r50", "faster_rcnn")
    apply_profile(cfg, "coco", train_name="coco_2017_train")
    assert [list(s) for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES] == [[32], [64], [128], [256], [512]]


def test_coco_profile_model_builds_and_holds_imagenet_shapes() -> None:
    from detectron2.modeling import build_model

    cfg = _student_cfg("r18", "tal")
    apply_profile(cfg, "coco", train_name="coco_2017_train")
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    bottom_up = model.backbone.bottom_up
    assert type(bottom_up.stem.conv1.norm).__name__ == "FrozenBatchNorm2d"
    assert not any(p.requires_grad for p in bottom_up.res2.parameters())  # FREEZE_AT 2
    assert model.backbone.output_shape()["p3"].channels == 256


def test_from_scratch_and_explicit_weights() -> None:
    cfg = _student_cfg()
    apply_profile(cfg, "coco", train_name="coco_2017_train", from_scratch=True, world_size=2)
    assert (cfg.MODEL.WEIGHTS, cfg.MODEL.RESNETS.NORM, cfg.MODEL.BACKBONE.FREEZE_AT) == ("", "SyncBN", 0)
    cfg = _student_cfg("r50")
    apply_profile(
        cfg, "coco", train_name="coco_2017_train", weights="detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    )
    # MSRA's Caffe2 weights: BGR, std 1, stride in the 1x1 conv
    assert cfg.INPUT.FORMAT == "BGR" and list(cfg.MODEL.PIXEL_STD) == [1.0, 1.0, 1.0]
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1
    with pytest.raises(ProfileError, match="contradict"):
        apply_profile(
            _student_cfg(), "coco", train_name="x", from_scratch=True, weights="torchvision://resnet18"
        )
    with pytest.raises(ProfileError, match="embedded profile"):
        apply_profile(_student_cfg(), "embedded", train_name="x", input_size=512)


def _dicts(image_hw: tuple[int, int], box_side: float, n: int = 10) -> list[dict]:
    h, w = image_hw
    return [
        {"height": h, "width": w, "annotations": [{"bbox": [5, 5, box_side, box_side], "bbox_mode": 1}]}
        for _ in range(n)
    ]


def test_custom_input_size_is_the_median_shorter_side_bounded() -> None:
    size, rule = choose_input_size(data_sizes(_dicts((400, 600), 20)))
    assert size == 400 and "median shorter side" in rule and "bounded" not in rule
    size, rule = choose_input_size(data_sizes(_dicts((3000, 4000), 200)))
    assert size == 800 and "bounded" in rule
    size, _ = choose_input_size(data_sizes(_dicts((64, 64), 20)))
    assert size == 320


def test_small_objects_warning_names_a_size_that_keeps_them() -> None:
    # 3000 px photos of 20 px objects: at 800 px they are ~5 px
    sizes = data_sizes(_dicts((3000, 4000), 20))
    text = small_object_warning(sizes, 800, 1333)
    assert text is not None and "100% of the training objects" in text
    keep = int(text.split("--input-size ")[1].split()[0])
    assert keep * 20 / 3000 >= 8 and keep % 32 == 0
    assert small_object_warning(data_sizes(_dicts((400, 400), 20)), 400, 667) is None


def test_custom_profile_on_generated_400px_data(tmp_path: Path) -> None:
    from conftest import write_tiny_coco
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from tbd.data import register_user_coco

    js, images = write_tiny_coco(tmp_path / "d", num_images=4, size=400)
    name = register_user_coco(js, images, "train", name="profile_test_train")
    try:
        cfg = _student_cfg()
        info = apply_profile(cfg, "custom", train_name=name, batch_size=4)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.pop(name, None)
    assert info.input_size == 400 and "400 px" in info.input_rule
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (320, 336, 352, 368, 384, 400)
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (400, 667)
    assert cfg.MODEL.WEIGHTS == "torchvision://resnet18" and cfg.MODEL.FPN.OUT_CHANNELS == 256
    # 12 epochs of 4 images at batch 16 is under the 100-iteration floor; batch 4 scales it x4
    assert cfg.SOLVER.IMS_PER_BATCH == 4 and cfg.SOLVER.MAX_ITER == 400
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.0025)


# --------------------------------------------------------------------- teacher input check
def _teacher(path: str):
    return load_config(path)


def test_input_check_same_profile_agrees_and_flips_channels() -> None:
    student = _student_cfg()
    apply_profile(student, "coco", train_name="coco_2017_train")
    check = check_teacher_inputs(student, _teacher("coco/retinanet_R_101_FPN_3x.yaml"))
    assert not check.errors and not check.warnings
    assert any("input sizes agree" in n for n in check.notes)
    assert any("channels are flipped" in n for n in check.notes)


def test_input_check_embedded_student_with_coco_teacher_is_an_error() -> None:
    check = check_teacher_inputs(_student_cfg(), _teacher("coco/retinanet_R_101_FPN_3x.yaml"))
    assert check.errors and "0.18x" in check.errors[0] and "--profile coco" in check.errors[0]


def test_input_check_moderate_mismatch_is_a_warning() -> None:
    student = _student_cfg()
    apply_profile(student, "coco", train_name="coco_2017_train", input_size=448)
    check = check_teacher_inputs(student, _teacher("coco/retinanet_R_101_FPN_3x.yaml"))
    assert not check.errors and check.warnings and "--input-size 720" in check.warnings[0]


def test_input_check_unconvertible_format_is_an_error() -> None:
    student = _student_cfg()
    student.INPUT.FORMAT = "L"
    check = check_teacher_inputs(student, _teacher("retinanet_R50_FPN.yaml"))
    assert any("BGR and RGB" in e for e in check.errors)


# --------------------------------------------------------------------- end to end, as a user runs it
def _plant_resnet18(torch_home: Path) -> None:
    target = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), target)


def _coco_layout(root: Path) -> None:
    """A tiny folder in Detectron2's COCO layout with COCO's 80 category ids."""
    from conftest import write_tiny_coco
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    cats = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    for split, n in (("train2017", 4), ("val2017", 2)):
        js, images = write_tiny_coco(root / "coco" / split, num_images=n, size=96, seed=n)
        data = json.loads(js.read_text())
        data["categories"] = cats
        for ann in data["annotations"]:
            ann["category_id"] = cats[ann["category_id"]]["id"]
        (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "coco" / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        for f in images.iterdir():
            f.rename(root / "coco" / split / f.name)


@pytest.mark.slow  # 800 px on CPU: 1.5-6 min (make test-all)
def test_distill_on_coco_layout_builds_the_coco_profile(tmp_path: Path) -> None:
    """`tbd distill --dataset coco_2017`: COCO-profile student and teacher, 2 iterations, from a fresh dir."""
    from detectron2.modeling import build_model

    _coco_layout(tmp_path / "datasets")
    _plant_resnet18(tmp_path / "torch")
    teacher_cfg = load_config("coco/retinanet_R_50_FPN_3x.yaml", ["MODEL.DEVICE", "cpu"])
    torch.save({"model": build_model(teacher_cfg).state_dict()}, tmp_path / "teacher.pth")
    env = {
        **os.environ,
        "DETECTRON2_DATASETS": str(tmp_path / "datasets"),
        "TORCH_HOME": str(tmp_path / "torch"),
    }
    args = [
        "distill", "--dataset", "coco_2017", "--teacher", "r50", "--teacher-weights", str(tmp_path / "teacher.pth"),
        "--student", "r18", "--head", "tal", "--iters", "2", "--batch-size", "2", "--no-harmony",
        "--output", "run", "SOLVER.CHECKPOINT_PERIOD", "100",
    ]  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "tbd.cli.main", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "student profile coco: input 640-800 / 1333 px" in out
    assert "initial weights torchvision://resnet18 (torchvision-resnet): 100/100" in out
    assert "input sizes agree" in out and "channels are flipped" in out
    cfg = load_config(work / "run" / "config.yaml")
    assert cfg.TBD.PROFILE == "coco" and cfg.MODEL.FPN.OUT_CHANNELS == 256 and cfg.SOLVER.BASE_LR == 0.00125
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["profile"]["min_size_test"] == 800 and summary["teacher_own_input"] is None
    assert summary["teacher"]["input"] == summary["student"]["input"] == "800/1333 px"
