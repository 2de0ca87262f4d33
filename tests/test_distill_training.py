"""A few distillation steps on the embedded dataset lower the distillation losses."""

from __future__ import annotations

import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import tbd  # noqa: F401
from tbd.data import register_shapes
from tbd.distill.testing import calibrate_batchnorm, distill_config


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("student", "teacher"), [("retinanet_R18_FPN", "faster_rcnn_R18_FPN")])
def test_distillation_steps_lower_hd_and_tfd(tmp_path, student: str, teacher: str) -> None:
    train, _ = register_shapes(root=tmp_path, num_train=16, num_val=4, image_size=64)
    opts = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.RANDOM_FLIP", "none"]
    # a student from scratch: the β and gate tbd distill gives it (pinned: the test is about the steps)
    opts += ["DISTILL.TFD_WEIGHT", "0.4", "DISTILL.GATE", "none"]
    cfg = distill_config(student, teacher, opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    mapper = DatasetMapper(cfg, is_train=True)
    dicts = DatasetCatalog.get(train)
    batches = [[mapper(d) for d in dicts[i : i + 4]] for i in range(0, 16, 4)]
    calibrate_batchnorm(model.teacher, batches)  # an untrained teacher with realistic BN statistics
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    model.train()
    hd, tfd = [], []
    for step in range(10):
        with EventStorage(step) as storage:
            losses = model(batches[0])
            optimizer.zero_grad()
            sum(losses.values()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            hd.append(storage.histories()["tbd/hd"].latest())
            tfd.append(storage.histories()["tbd/tfd"].latest())
    assert all(map(torch.isfinite, map(torch.tensor, hd + tfd)))
    assert sum(tfd[-2:]) < 0.95 * sum(tfd[:2]), tfd
    assert sum(hd[-2:]) < sum(hd[:2]), hd
