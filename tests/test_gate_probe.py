"""scripts/gate_probe.py and TBDistiller.probe_task_maps: the maps a diagnostic reads are the ones the
training step gates with, and the gate summaries by hand-worked values."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_distill_run
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import tbd.distill.distiller as distiller_module
from tbd.distill.losses import TaskMaps
from tbd.distill.testing import distill_config, synthetic_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "gate_probe.py"
_spec = importlib.util.spec_from_file_location("gate_probe", _PATH)
assert _spec and _spec.loader
gate_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gate_probe)


def _maps(p_c: list[float], p_r: list[float]) -> TaskMaps:
    return TaskMaps(torch.tensor([[p_c]]), torch.tensor([[p_r]]))


def test_summary_by_hand() -> None:
    # location 0: a teacher object (0.6, 0.9) beside an untrained student (0.01, 0.1);
    # location 1: background for both, the student's box slightly better (p_r 0.3 vs 0.2)
    teacher = [_maps([0.6, 0.01], [0.9, 0.2])]
    student = [_maps([0.01, 0.01], [0.1, 0.3])]
    out = gate_probe.summarise(teacher, student, margin=0.05, score=0.3)
    assert (out["locations"], out["teacher_objects"]) == (2, 1)
    g = out["gate"]
    # harmony: HS^t(0) = 1 - tanh 0.3 < HS^s(0) = 1 - tanh 0.09 -> 0 (the untrained student "leads");
    # HS^t(1) = 1 - tanh 0.19 > HS^s(1) = 1 - tanh 0.29 by 0.094 -> 1
    assert g["harmony"]["teacher_objects"] == 0.0 and g["harmony"]["all"] == pytest.approx(0.5)
    # iou: 0.8 ahead at 0 -> 1; 0.1 behind at 1 -> 0
    assert g["iou"]["all"] == pytest.approx(0.5) and g["iou"]["teacher_objects"] == 1.0
    # quality: sqrt(0.54) vs sqrt(0.001) at 0 -> 1; sqrt(0.002) - sqrt(0.003) = -0.0101 at 1 -> 0.399
    q1 = ((0.002**0.5 - 0.003**0.5) + 0.05) / 0.1
    assert g["quality"]["all"] == pytest.approx((1 + q1) / 2, abs=1e-5)
    # TFD masks: cls weighted by p_c^t (0.6, 0.01), reg by p_r^t (0.9, 0.2)
    assert g["quality"]["tfd_cls"] == pytest.approx((0.6 + 0.01 * q1) / 0.61, abs=1e-5)
    assert g["iou"]["tfd_reg"] == pytest.approx(0.9 / 1.1, abs=1e-6)
    at = out["at_teacher_objects"]
    assert at["teacher"]["p_c"] == pytest.approx(0.6) and at["student"]["p_r"] == pytest.approx(0.1)
    # where the masks look: cls (0.6, 0.01) / 0.61, reg (0.9, 0.2) / 1.1; location 1 has p_c^t < 0.3
    m = out["masks"]
    assert m["tfd_cls"]["at_teacher_objects"] == pytest.approx(0.6 / 0.61, abs=1e-6)
    assert m["tfd_reg"]["where_teacher_sees_no_object"] == pytest.approx(0.2 / 1.1, abs=1e-6)
    assert m["overlap"] == pytest.approx(0.9 / 1.1 + 0.01 / 0.61, abs=1e-6)
    # teacher and student swapped: every ramp gate g becomes 1 - g
    swapped = gate_probe.summarise(student, teacher, margin=0.05, score=0.0)["gate"]
    for mode in g:
        assert swapped[mode]["all"] == pytest.approx(1 - g[mode]["all"], abs=1e-6)


def test_probe_maps_are_the_ones_the_training_step_gates_with(monkeypatch) -> None:
    torch.manual_seed(0)
    small = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "DISTILL.GATE", "quality"]
    model = build_model(distill_config("retinanet_R18_FPN", "retinanet_R18_FPN", small))
    model.train()
    batch = synthetic_batch(2, 64, seed=3)
    seen: list[tuple[list[TaskMaps], list[TaskMaps]]] = []
    real = distiller_module.level_gates

    def spy(mode, teacher, student, margin):
        seen.append((teacher, student))
        return real(mode, teacher, student, margin)

    monkeypatch.setattr(distiller_module, "level_gates", spy)
    with EventStorage(0):
        model(batch)
        teacher, student = model.probe_task_maps(batch)
    (t_train, s_train) = seen[0]
    assert len(teacher) == len(t_train) == len(model.strides)
    for a, b in zip(teacher + student, t_train + s_train):
        assert torch.allclose(a.p_c, b.p_c, atol=1e-6) and torch.allclose(a.p_r, b.p_r, atol=1e-6)
    # the two models' maps differ (a cut wire returning one model twice would pass the loop above)
    assert not torch.allclose(teacher[0].p_c, student[0].p_c)


@pytest.mark.usefixtures("isolated_cli")
def test_gate_probe_on_a_run(tmp_path: Path) -> None:
    out = tiny_distill_run(tmp_path)
    result_path = tmp_path / "gates.json"
    gate_probe.main(["--run", str(out), "--batches", "2", "--json", str(result_path)])
    result = json.loads(result_path.read_text())
    # every location of every distilled level of both batches: 64 px, strides 8..128 ->
    # 8*8 + 4*4 + 2*2 + 1 + 1 = 86 per image, 2 images per batch, 2 batches
    assert result["locations"] == 86 * 2 * 2
    assert set(result["gate"]) == {"harmony", "iou", "quality"}
    for g in result["gate"].values():
        assert 0.0 <= g["all"] <= 1.0
