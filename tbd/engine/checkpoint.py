"""Detectron2 checkpoints written atomically, and never with non-finite weights."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

# the atomic writes moved to tbd.engine.atomic; imported here under their old names too
from tbd.engine.atomic import (  # noqa: F401
    atomic_torch_save,
    atomic_write_text,
    remove_stale_temporaries,
)
from tbd.export import is_training_only


class NonFiniteWeightsError(RuntimeError):
    """Raised instead of writing a checkpoint whose weights contain NaN or Inf."""


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of floating-point parameters and buffers that hold NaN or Inf."""
    bad = []
    for name, tensor in model.state_dict().items():
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


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
    """A checkpoint that does not fit the model it is loaded into.

    ``shapes`` holds ``(key, shape in the file, shape in the model)`` of the tensors that differ,
    ``missing`` the model tensors the file lacks, ``detail`` the two in words.
    """

    def __init__(
        self,
        message: str,
        path: str = "",
        detail: str = "",
        shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
        missing: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.detail = detail
        self.shapes = list(shapes or [])
        self.missing = list(missing or [])


class UnreadableWeightsError(WeightsMismatchError):
    """A weights file that is not a checkpoint at all (empty, text, another format)."""


WEIGHTS_FORMAT_HINT = (
    "a PyTorch checkpoint (.pth: torch.save / Detectron2's checkpointer, e.g. a run's model_final.pth) "
    "or a Detectron2 model-zoo pickle (.pkl)"
)


def check_weights_file(path: str, what: str = "model") -> None:
    """Refuse at once a local weights file that cannot be a checkpoint (empty, or not a zip/pickle).

    Reads only the first bytes: ``torch.save`` writes a zip archive (``PK``) or, in its legacy
    format, a pickle (protocol byte ``0x80``), as do Detectron2's ``.pkl`` files.
    """
    if "://" in path or not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise UnreadableWeightsError(
            f"{what} weights {path} is an empty file; expected {WEIGHTS_FORMAT_HINT}"
        )
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        kind = "a text file" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not a checkpoint"
        raise UnreadableWeightsError(
            f"{what} weights {path} is {kind} (it starts with {head!r}); expected {WEIGHTS_FORMAT_HINT}"
        )


#: names of the layers whose output size follows the class count (classification, per-class boxes)
_CLASS_LAYER = re.compile(r"cls|class|score|logit|bbox_pred")


def class_count_of_weights(
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]], num_classes: int
) -> int | None:
    """The class count a checkpoint was trained for, when only class-sized outputs differ, else ``None``.

    The model was built for ``num_classes``; each differing tensor must be a classification (or
    per-class box) layer's and differ in its first dimension only, which is ``k * num_classes`` (RetinaNet: anchors x classes; FCOS/TOOD: classes; box
    regression per class: 4 x classes) or ``num_classes + 1`` (Faster R-CNN's background column).
    """
    found: set[int] = set()
    for key, got, want in shapes:
        if not _CLASS_LAYER.search(key) or not got or len(got) != len(want) or got[1:] != want[1:]:
            return None
        if want[0] == num_classes + 1:
            found.add(got[0] - 1)
        elif want[0] % num_classes == 0 and got[0] % (want[0] // num_classes) == 0:
            found.add(got[0] // (want[0] // num_classes))
        else:
            return None
    if len(found) != 1:
        return None
    count = found.pop()
    return count if count > 0 and count != num_classes else None


def load_weights_checked(model: torch.nn.Module, path: str, what: str = "model") -> None:
    """Load ``path`` with Detectron2's checkpointer and fail when it does not fit the model.

    Detectron2 only logs missing keys and skips tensors of the wrong shape; for a teacher or an
    evaluated model that silently yields a half-random network, so here it is an error. A file that
    is no checkpoint at all raises :class:`UnreadableWeightsError`.
    """
    ck = DetectionCheckpointer(model)
    local = ck.path_manager.get_local_path(path)
    check_weights_file(local, what)
    try:
        checkpoint = ck._load_file(local)
    except Exception as err:  # a damaged or foreign file: whatever the unpickler trips over
        raise UnreadableWeightsError(
            f"{what} weights {path} cannot be read ({type(err).__name__}: {err}); expected {WEIGHTS_FORMAT_HINT}"
        ) from err
    if not isinstance(checkpoint.get("model"), dict):
        raise UnreadableWeightsError(
            f"{what} weights {path} hold no state dict (found {type(checkpoint.get('model')).__name__}); "
            f"expected {WEIGHTS_FORMAT_HINT}"
        )
    # training-only modules (auxiliary heads, MODEL.AUX_HEADS) of a run's checkpoint: not an
    # inference model's, so not "unused keys" worth a warning
    own = model.state_dict().keys()
    checkpoint["model"] = {
        k: v for k, v in checkpoint["model"].items() if k in own or not is_training_only(k)
    }
    incompatible = ck._load_model(checkpoint)
    shapes = [(k, tuple(got), tuple(want)) for k, got, want in incompatible.incorrect_shapes]
    reshaped = {k for k, _, _ in shapes}  # Detectron2 also lists these as missing: they were not loaded
    missing = [
        k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked") and k not in reshaped
    ]
    if shapes or missing:
        detail = []
        if shapes:
            k, got, want = shapes[0]
            detail.append(f"{len(shapes)} tensors have another shape (e.g. {k}: {got} vs {want})")
        if missing:
            detail.append(f"{len(missing)} model tensors are missing (e.g. {missing[0]})")
        text = "; ".join(detail)
        advice = "Pass the config these weights were trained with (depth, head, number of classes must match)"
        if missing and not shapes and all(is_training_only(k) for k in missing):
            advice = (
                "Only the auxiliary heads (MODEL.AUX_HEADS) are missing: these are exported weights "
                "(`tbd export` drops those training-only heads). Pass the run's own checkpoint "
                "(model_final.pth) or the exported config (config_student.yaml) with them; a Co-DETR "
                "teacher needs the former, its ATSS head is what TBD reads"
            )
        raise WeightsMismatchError(
            f"{what} weights {path} do not fit its config: {text}. {advice}",
            path=path,
            detail=text,
            shapes=shapes,
            missing=missing,
        )
