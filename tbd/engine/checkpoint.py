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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries that :func:`atomic_torch_save` / :func:`atomic_write_text` left behind.

    A process killed (``kill -9``, out of memory) while writing leaves ``.<name>.<pid>.tmp``; the
    file it was replacing is intact. Files of a process that is still running are kept.
    """
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        pid = tmp.name[: -len(".tmp")].rsplit(".", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _process_alive(int(pid))):
            continue
        try:
            tmp.unlink()
        except FileNotFoundError:
            continue
        removed.append(tmp)
    if removed:
        logger.info("removed %d stale temporary file(s) of an interrupted save: %s", len(removed), removed)
    return removed


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


class WeightsMismatchError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def load_weights_checked(model: torch.nn.Module, path: str, what: str = "model") -> None:
    """Load ``path`` with Detectron2's checkpointer and fail when it does not fit the model.

    Detectron2 only logs missing keys and skips tensors of the wrong shape; for a teacher or an
    evaluated model that silently yields a half-random network, so here it is an error.
    """
    ck = DetectionCheckpointer(model)
    local = ck.path_manager.get_local_path(path)
    checkpoint = ck._load_file(local)
    incompatible = ck._load_model(checkpoint)
    shapes = list(incompatible.incorrect_shapes)
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    if shapes or missing:
        detail = []
        if shapes:
            k, got, want = shapes[0]
            detail.append(
                f"{len(shapes)} tensors have another shape (e.g. {k}: {tuple(got)} vs {tuple(want)})"
            )
        if missing:
            detail.append(f"{len(missing)} model tensors are missing (e.g. {missing[0]})")
        raise WeightsMismatchError(
            f"{what} weights {path} do not fit its config: {'; '.join(detail)}. Pass the config "
            "these weights were trained with (depth, head, number of classes must match)"
        )
