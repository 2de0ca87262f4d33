"""The README recipe, run as written (on the embedded dataset, shrunk to two iterations)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import tbd  # noqa: F401
from tbd.config import CONFIG_DIR, PROJECT_ROOT, load_config

MARKER = "trainer = DistillTrainer(cfg)"


def _recipe_code() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = readme.split("<!-- recipe:start -->", 1)[1].split("<!-- recipe:end -->", 1)[0]
    code = re.findall(r"```python\n(.*?)```", block, flags=re.S)
    assert len(code) == 1, "the recipe block holds exactly one python snippet"
    assert MARKER in code[0]
    return code[0]


def test_recipe_is_a_handful_of_lines() -> None:
    lines = [ln for ln in _recipe_code().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) <= 20


@pytest.fixture
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_recipe_runs(tmp_path, monkeypatch, _one_thread) -> None:
    from tbd.data import register_shapes

    register_shapes(root=tmp_path / "data", num_train=8, num_val=2, image_size=64)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(CONFIG_DIR)
    # the teacher checkpoint the recipe names (an untrained R-50 RetinaNet)
    teacher = load_config("retinanet_R50_FPN")
    teacher.MODEL.META_ARCHITECTURE = "RetinaNet"
    from detectron2.modeling import build_model

    (tmp_path / "output" / "teacher_r50").mkdir(parents=True)
    torch.save({"model": build_model(teacher).state_dict()}, tmp_path / "output/teacher_r50/model_final.pth")

    setup, run = _recipe_code().split(MARKER)
    scope: dict = {}
    exec(compile(setup, "README-recipe", "exec"), scope)
    cfg = scope["cfg"]
    cfg.merge_from_list(
        [
            "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
            "OUTPUT_DIR", str(tmp_path / "output" / "run"),
        ]
    )  # fmt: skip
    exec(compile(MARKER + run, "README-recipe", "exec"), scope)

    trainer = scope["trainer"]
    teacher_params = {id(p) for p in trainer.model.teacher.parameters()}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized and not optimized & teacher_params
    metrics = [json.loads(x) for x in (tmp_path / "output/run/metrics.json").read_text().splitlines()]
    assert any("loss_hd" in m and "loss_tfd" in m and "tbd/tfd" in m for m in metrics)

    exported = torch.load(tmp_path / "output/student_r18_tbd.pth", weights_only=False)["model"]
    student_cfg = load_config("retinanet_R18_FPN")
    build_model(student_cfg).load_state_dict(exported, strict=True)
    final = torch.load(tmp_path / "output/run/model_final.pth", weights_only=False)["model"]
    assert any(k.startswith("adapters.") for k in final) and any(k.startswith("twg.") for k in final)
