"""Resuming a distillation run: a run continued from a periodic checkpoint ends bit-identical to the
uninterrupted run (student, adapters, TWG, optimizer momentum), the checkpoint holds no teacher,
and the resumed process reloads the teacher from DISTILL.TEACHER_WEIGHTS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from tbd.distill import TBDistiller
from tbd.distill.testing import distill_config
from tbd.engine.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _teacher_file(tmp_path: Path) -> Path:
    from tbd.config import load_config

    torch.manual_seed(123)
    teacher = build_model(load_config("retinanet_R18_FPN", ["MODEL.RETINANET.NUM_CLASSES", "2"]))
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    return path


def _cfg(dataset: str, out: Path, teacher: Path):
    return distill_config(
        "retinanet_R18_FPN",
        "retinanet_R18_FPN",
        [
            "MODEL.RETINANET.NUM_CLASSES", "2",
            "DISTILL.TEACHER_OPTS", "['MODEL.RETINANET.NUM_CLASSES', '2']",
            "DISTILL.TEACHER_WEIGHTS", str(teacher),
            "DISTILL.TFD_WEIGHT", "1.0",  # TFD and TWG matter at every step
            "DATASETS.TRAIN", f"('{dataset}',)",
            "DATASETS.TEST", "()",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
            "INPUT.RANDOM_FLIP", "none",
            "DATALOADER.NUM_WORKERS", "0",
            "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01", "SOLVER.MOMENTUM", "0.9",
            "SOLVER.MAX_ITER", "3",
            "SOLVER.STEPS", "(2,)",
            "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.CHECKPOINT_PERIOD", "2",
            "TEST.EVAL_PERIOD", "0",
            "SEED", "0",
            "OUTPUT_DIR", str(out),
        ],
    )  # fmt: skip


def _trainer(cfg, resume: bool) -> Trainer:
    seed_all_rng(0)
    trainer = Trainer(cfg, progress=False)
    trainer.resume_or_load(resume=resume)
    return trainer


def _momenta(trainer: Trainer) -> list[torch.Tensor]:
    """The optimizer's momentum buffers, in parameter order."""
    opt = trainer.optimizer
    return [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]]


def test_resumed_distillation_equals_the_uninterrupted_run(tiny_coco: str, tmp_path: Path) -> None:
    teacher_file = _teacher_file(tmp_path)
    cfg = _cfg(tiny_coco, tmp_path / "run", teacher_file)
    full = _trainer(cfg, resume=False)
    full.train()
    model = full.model
    assert isinstance(model, TBDistiller) and model.twg is not None
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    ref_momenta = _momenta(full)
    # the checkpoint the resumed run starts from, as a run killed after step 1 would leave it
    checkpoint = torch.load(tmp_path / "run" / "model_0000001.pth", weights_only=False)
    saved = checkpoint["model"]
    assert not [k for k in saved if "teacher" in k]  # the teacher is never written
    assert any(k.startswith("adapters.") for k in saved) and any(k.startswith("twg.") for k in saved)
    # the state moved between step 1 and the end (else the comparison below would prove little)
    assert not torch.equal(saved["twg.fc2.weight"], reference["twg.fc2.weight"])
    assert not torch.equal(saved["adapters.layers.8.weight"], reference["adapters.layers.8.weight"])
    (tmp_path / "run" / "last_checkpoint").write_text("model_0000001.pth")

    resumed = _trainer(cfg, resume=True)
    assert resumed.start_iter == 2
    state = resumed.model.state_dict()
    for key in ("twg.fc2.weight", "adapters.layers.8.weight", "student.head.cls_score.weight"):
        assert torch.equal(state[key], saved[key]), key
    # the optimizer's momentum is the checkpoint's (a fresh optimizer would have none)
    opt = resumed.optimizer
    assert all("momentum_buffer" in opt.state[p] for g in opt.param_groups for p in g["params"])
    # the teacher is rebuilt and reloaded from its file, not left at a random initialisation
    teacher_state = torch.load(teacher_file, weights_only=False)["model"]
    for key, value in resumed.model.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key

    resumed.train()
    state = resumed.model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key  # bit-identical, adapters and TWG included
    for a, b in zip(_momenta(resumed), ref_momenta):
        assert torch.equal(a, b)
