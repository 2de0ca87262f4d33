"""Helpers shared by the TAL/TOOD/ET tests and scripts: a few real batches, a few training steps."""

from __future__ import annotations

from pathlib import Path

import torch
from detectron2.config import CfgNode as CN
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.utils.events import EventStorage
from torch import nn


def shapes_batch(cfg: CN, root: str | Path, num_images: int = 4) -> list[dict]:
    """The first ``num_images`` training images of the embedded dataset, mapped without augmentation."""
    from tbd.data.shapes import register_shapes

    train_name, _ = register_shapes(root=str(root), num_train=max(8, num_images), num_val=4)
    dicts = DatasetCatalog.get(train_name)[:num_images]
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[])
    return [mapper(d) for d in dicts]


def train_steps(
    model: nn.Module, batch: list[dict], iters: int, lr: float, clip: float = 10.0
) -> list[float]:
    """SGD steps on one fixed batch; returns the total loss of every step."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    history = []
    with EventStorage(0) as storage:
        for _ in range(iters):
            losses = model(batch)
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            storage.step()
            history.append(float(loss.detach()))
    return history


def freeze_assignment(model: nn.Module) -> None:
    """Make ``model`` reuse the first assignment its (real) assigner computes: the loss then has a
    fixed target, so gradient steps must lower it (the live TAL targets rise with the IoUs)."""
    original = model.assign
    cache: list = []

    def assign(*args, **kwargs):
        if not cache:
            cache.append(original(*args, **kwargs))
        return cache[0]

    model.assign = assign


TINY_OPTS = [
    "MODEL.FPN.OUT_CHANNELS", "32",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
]  # fmt: skip
