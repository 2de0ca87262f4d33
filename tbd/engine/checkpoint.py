"""Detectron2 checkpoints written atomically, and never with non-finite weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)


class NonFiniteWeightsError(RuntimeError):
    """Raised instead of writing a checkpoint whose weights contain NaN or Inf."""


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of floating-point parameters and buffers that hold NaN or Inf."""
    bad = []
    for name, tensor in model.state_dict().items():
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary sibling, fsync, then rename over ``path``.

    A process killed half-way leaves at most a stray ``.tmp`` file; the previous ``path`` stays.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` whose files are replaced atomically.

    ``save`` refuses (raises :class:`NonFiniteWeightsError`) when the model holds NaN/Inf, so the
    last good checkpoint is never overwritten by a diverged one.
    """

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        bad = nonfinite_parameters(self.model)
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to write checkpoint {name!r}: {len(bad)} tensors hold NaN/Inf "
                f"(first: {bad[0]}); the last good checkpoint in {self.save_dir} is kept"
            )
        data: dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        os.makedirs(self.save_dir, exist_ok=True)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)
