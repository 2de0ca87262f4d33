"""Does the teacher see what it was trained on? Compare its config with the student's data pipeline.

During distillation the teacher runs on the student's batches: images resized by the *student's*
``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN`` and decoded in the student's ``INPUT.FORMAT``. The
teacher normalises them with its own pixel mean/std (``preprocess_image``) and the distiller flips
BGR/RGB for it, so only the input size can really be wrong: a teacher trained at 800 px fed 128 px
images (or the reverse) gives poor predictions to distil from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median

from detectron2.config import CfgNode

#: student/teacher ratio of typical training shorter sides: inside OK, inside WARN a warning, else an error
OK_RATIO = (0.8, 1.25)
WARN_RATIO = (0.5, 2.0)
_SWAPPABLE = {"BGR", "RGB"}


class TeacherInputError(ValueError):
    """A teacher that would be fed inputs far from the ones it was trained on."""


@dataclass
class InputCheck:
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    size_ratio: float = 1.0


def _sizes(sizes: tuple[int, ...] | list[int] | int) -> list[int]:
    return [int(sizes)] if isinstance(sizes, int) else [int(s) for s in sizes]


def _span(sizes: list[int], max_size: int) -> str:
    lo, hi = min(sizes), max(sizes)
    return f"{lo if lo == hi else f'{lo}-{hi}'} / {max_size} px"


def check_teacher_inputs(student: CfgNode, teacher: CfgNode) -> InputCheck:
    """Compare sizes, channel order and normalisation of ``teacher`` with the ``student`` pipeline."""
    check = InputCheck()
    s_train = _sizes(student.INPUT.MIN_SIZE_TRAIN)
    t_train = _sizes(teacher.INPUT.MIN_SIZE_TRAIN)
    ratio = median(s_train) / max(1.0, median(t_train))
    check.size_ratio = ratio
    sizes = (
        f"the student's batches are {_span(s_train, student.INPUT.MAX_SIZE_TRAIN)}, the teacher was trained "
        f"at {_span(t_train, teacher.INPUT.MAX_SIZE_TRAIN)} (test {teacher.INPUT.MIN_SIZE_TEST} / "
        f"{teacher.INPUT.MAX_SIZE_TEST} px)"
    )
    fix = (
        "Use the student profile that matches the teacher (--profile coco for a COCO model-zoo teacher, "
        f"or --input-size {int(median(t_train))}), or a teacher trained at the student's size "
        "(tbd train on the same data); --allow-input-mismatch (TBD.ALLOW_TEACHER_INPUT_MISMATCH) "
        "distils anyway"
    )
    if OK_RATIO[0] <= ratio <= OK_RATIO[1]:
        check.notes.append(f"input sizes agree: {sizes}")
    elif WARN_RATIO[0] <= ratio <= WARN_RATIO[1]:
        check.warnings.append(
            f"the teacher sees images {ratio:.2f}x the size it was trained on: {sizes}. {fix}"
        )
    else:
        check.errors.append(
            f"the teacher would see images {ratio:.2f}x the size it was trained on: {sizes}. {fix}"
        )

    s_fmt, t_fmt = student.INPUT.FORMAT, teacher.INPUT.FORMAT
    norm = f"mean {list(teacher.MODEL.PIXEL_MEAN)}, std {list(teacher.MODEL.PIXEL_STD)}"
    if s_fmt == t_fmt:
        check.notes.append(f"teacher input: {t_fmt} like the student's, its own normalisation ({norm})")
    elif {s_fmt, t_fmt} <= _SWAPPABLE:
        check.notes.append(
            f"teacher input: {t_fmt} (the student's batches are {s_fmt}: channels are flipped for the teacher), "
            f"its own normalisation ({norm})"
        )
    else:
        check.errors.append(
            f"the teacher reads {t_fmt} images and the student's data is {s_fmt}; tbd converts only between "
            "BGR and RGB. Set the student's INPUT.FORMAT to the teacher's"
        )
    return check
