"""A Co-DETR teacher for a dense student (issue 17, part 3): the probe adapter that reads a CoDETR
through its auxiliary ATSS head, TBDistiller around it, and `tbd train` -> `tbd distill` ->
`tbd harmony` end to end on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tbd.cli.main import main
from tbd.config import load_config
from tbd.distill import Probe, TBDistiller, get_probe_adapter
from tbd.distill.testing import synthetic_batch
from tbd.modeling.codetr.detector import CoDETR
from tbd.modeling.codetr.probe import CoDETRProbeAdapter

TINY = [
    "MODEL.CODETR.HIDDEN_DIM", "32", "MODEL.CODETR.NHEADS", "4", "MODEL.CODETR.DIM_FEEDFORWARD", "64",
    "MODEL.CODETR.ENC_LAYERS", "1", "MODEL.CODETR.DEC_LAYERS", "2", "MODEL.CODETR.NUM_QUERIES", "20",
    "MODEL.CODETR.ENC_N_POINTS", "2", "MODEL.CODETR.DEC_N_POINTS", "2",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _codetr(*opts: str) -> CoDETR:
    torch.manual_seed(0)
    model = build_model(load_config("codetr_R18", [*TINY, *opts]))
    assert isinstance(model, CoDETR)
    return model.eval()


def test_adapter_reads_the_atss_head_on_the_encoder_pyramid() -> None:
    model = _codetr()
    adapter = get_probe_adapter(model)
    assert isinstance(adapter, CoDETRProbeAdapter)
    assert adapter.strides(model) == [8, 16, 32, 64, 128] == model.pyramid_strides
    assert adapter.channels(model) == [32] * 5 and adapter.num_classes(model) == 8
    batch = synthetic_batch(2, (64, 96), 2)
    with torch.no_grad():
        levels = adapter.run_dense(model, batch)
        pyramid = model.pyramid(model.encode(model.preprocess(batch)))
        logits, ltrb = model.aux_heads[0].predict(pyramid)
    assert [lv.stride for lv in levels] == [8, 16, 32, 64, 128]
    assert [lv.size for lv in levels] == [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]
    for lv, feat, cls, reg in zip(levels, pyramid, logits, ltrb):
        torch.testing.assert_close(lv.feature, feat)  # the pyramid maps are the distilled features
        b, h, w = 2, *lv.size
        assert lv.logits.shape == (b, h, w, 1, 8) and lv.boxes.shape == (b, h, w, 1, 4)
        torch.testing.assert_close(lv.logits[..., 0, :], cls.permute(0, 2, 3, 1))
        # location (i, j) sits at ((j + 0.5) s, (i + 0.5) s); its box is that point minus l, t plus r, b
        s = lv.stride
        i, j = h - 1, w - 1
        x, y = (j + 0.5) * s, (i + 0.5) * s
        left, top, right, bottom = reg[1, :, i, j].tolist()
        assert lv.boxes[1, i, j, 0].tolist() == pytest.approx(
            [x - left, y - top, x + right, y + bottom], rel=1e-5
        )


def test_a_codetr_teacher_distils_into_a_dense_student() -> None:
    teacher = _codetr()
    student_cfg = load_config("tood_R18_FPN", ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"])
    torch.manual_seed(1)
    model = TBDistiller(teacher=teacher, student=build_model(student_cfg))
    assert model.strides == [8, 16, 32, 64, 128]
    assert model.adapters.layers["8"].weight.shape[:2] == (32, 128)  # student FPN 128 -> DETR width 32
    model.train()
    with EventStorage():
        losses = model(synthetic_batch(2, 64, 3, seed=2))
        sum(losses.values()).backward()
    assert {"loss_hd", "loss_tfd"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_hd"] > 0 and losses["loss_tfd"] > 0
    # the 1x1 stride-128 level of this 32-wide DETR is flat (GroupNorm of one value per group):
    # it is left out instead of dividing by its ~0 energy (which made loss_tfd ~1e6)
    assert losses["loss_tfd"] < 10
    assert all(p.grad is None for p in teacher.parameters())  # the DETR stays frozen
    fpn = model.student.backbone.fpn_output3.weight.grad
    assert fpn is not None and fpn.abs().sum() > 0


def test_a_codetr_without_atss_or_as_a_student_is_a_clear_error() -> None:
    rcnn_only = _codetr("MODEL.AUX_HEADS.NAMES", "['rcnn']")
    with pytest.raises(ValueError, match=r"no 'atss' auxiliary head.*MODEL.AUX_HEADS.NAMES"):
        get_probe_adapter(rcnn_only).run_dense(rcnn_only, synthetic_batch(1, 64))
    with pytest.raises(TypeError, match="teacher .* but not a student"):
        Probe(_codetr())


def test_tbd_distill_from_a_trained_codetr_and_harmony_of_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "data"), "--num-train-images", "8", "--num-val-images", "4"]
    common = [*data, "--device", "cpu"]
    teacher = tmp_path / "codetr"
    train = ["train", "--model", "configs/codetr_R18.yaml", "--iters", "2", "--batch-size", "2"]
    assert main([*train, "--output", str(teacher), *common, *TINY]) == 0
    student = tmp_path / "student"
    distill = [
        "distill", "--teacher-config", str(teacher / "config.yaml"), "--teacher-weights",
        str(teacher / "model_final.pth"), "--student", "r18", "--head", "tal", "--profile", "embedded",
        "--iters", "2", "--batch-size", "2", "--output", str(student),
    ]  # fmt: skip
    assert main([*distill, *common]) == 0
    rows = [json.loads(line) for line in (student / "metrics.json").read_text().splitlines()]
    assert any("loss_hd" in r and "loss_tfd" in r for r in rows)
    summary = json.loads((student / "summary.json").read_text())
    assert "bbox" in summary["student"]
    # an exported Co-DETR has lost the ATSS head: both ways of passing it name the fix
    assert main(["export", "--run", str(teacher)]) == 0
    exported = teacher / "export"
    for config, weights, expected in [
        (exported / "config_student.yaml", exported / "model_student.pth", "no 'atss' auxiliary head"),
        (teacher / "config.yaml", exported / "model_student.pth", "Only the auxiliary heads"),
    ]:
        swap = {"--teacher-config": str(config), "--teacher-weights": str(weights)}
        argv = [swap.get(prev, a) for prev, a in zip(["", *distill], distill)]
        argv[argv.index("--output") + 1] = str(tmp_path / "refused")
        assert main([*argv, *common, "--overwrite"]) == 2
        assert expected in " ".join(capsys.readouterr().out.split())
    # harmony of the DETR from its decoder's final predictions: after 2 iterations every score is
    # ~0.01, so the thresholds go below it and all 100 predictions per image are measured
    out = tmp_path / "harmony"
    runs = ["--run", f"codetr={teacher}", "--run", f"distilled={student}"]
    low = ["--score-thresh", "0.001", "--score-floor", "0.001"]
    assert main(["harmony", *runs, *low, "--output", str(out), *common]) == 0
    models = json.loads((out / "harmony.json").read_text())["models"]
    codetr = models["codetr"]
    assert codetr["architecture"] == "CoDETR" and codetr["num_images"] == 4
    assert codetr["num_predictions"] == 4 * 100  # TEST.DETECTIONS_PER_IMAGE of the decoder's queries
    assert 0.0 <= codetr["mean_hs"] <= 1.0 and models["distilled"]["architecture"] == "TOOD"
