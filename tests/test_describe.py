"""Models named by what they are (tbd.describe): detector, backbone and neck width, initial weights."""

from __future__ import annotations

from pathlib import Path

from tbd.config import load_config
from tbd.describe import describe, init_name
from tbd.distill.testing import distill_config


def test_a_student_and_a_teacher_config_in_words() -> None:
    mnv2 = load_config("tood_MNV2_FPN")
    assert describe(mnv2, "torchvision://mobilenet_v2") == (
        "TOOD (T-Head), MobileNetV2-FPN 128 ch, from ImageNet (torchvision://mobilenet_v2)"
    )
    teacher = load_config("tood_MNV2_FPN_teacher")
    assert describe(teacher, "/c/teachers/mnv2in_x/model_final.pth") == (
        "TOOD (T-Head), MobileNetV2-FPN 256 ch, weights mnv2in_x/model_final.pth"
    )
    assert describe(load_config("fcos_R101_FPN"), "") == "FCOS, R-101-FPN 128 ch, from scratch"
    assert describe(load_config("dw_R18_FPN"), "").startswith("DW, R-18-FPN")
    assert describe(load_config("faster_rcnn_R50_FPN"), "").startswith("Faster R-CNN, R-50-FPN")


def test_a_distillation_config_is_described_as_its_student() -> None:
    cfg = distill_config("retinanet_R18_FPN", "fcos_R50_FPN")
    assert describe(cfg, "").startswith("RetinaNet, R-18-FPN")


def test_init_names() -> None:
    assert init_name("") == "from scratch"
    assert init_name("detectron2://ImageNetPretrained/MSRA/R-50.pkl").startswith("from ImageNet")
    assert init_name("detectron2://COCO-Detection/x/model_final.pkl") == (
        "weights detectron2://COCO-Detection/x/model_final.pkl"
    )
    assert init_name("model.pth") == "weights model.pth"


def test_the_alone_row_reads_the_harmony_of_the_chosen_threshold(tmp_path: Path) -> None:
    import json

    from tbd.summaries import alone_row

    cfg = distill_config("retinanet_R18_FPN", "fcos_R50_FPN")
    cfg.OUTPUT_DIR = str(tmp_path)
    cfg.DISTILL.WITH_BASELINE = True
    rows = [
        {"iteration": 9, "baseline/bbox/AP": 1.0, "baseline/harmony_score0.5/harmonious_share": 0.1},
        {
            "iteration": 19,
            "baseline/bbox/AP": 5.0,
            "baseline/harmony_score0.5/harmonious_share": 0.2,
            "baseline/harmony_score0.3/harmonious_share": 0.6,
        },
    ]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    at_05, at_03 = alone_row(cfg), alone_row(cfg, 0.3)
    assert at_05 is not None and at_03 is not None
    assert at_05["bbox"] == {"AP": 5.0} and at_05["iteration"] == 19  # the last evaluation
    assert at_05["harmony"] == {"harmonious_share": 0.2}
    assert at_03["harmony"] == {"harmonious_share": 0.6}
    cfg.DISTILL.WITH_BASELINE = False
    assert alone_row(cfg) is None
