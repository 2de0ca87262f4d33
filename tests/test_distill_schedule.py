"""``DISTILL.WEIGHT_SCHEDULE``: the distillation terms' multiplier over the run, and its wiring."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import student_distill_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tbd.distill import TBDistiller
from tbd.distill.schedule import weight_multiplier
from tbd.distill.testing import distill_config, synthetic_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"]
SCHEDULE = ["SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(60, 90)", "SOLVER.GAMMA", "0.2"]


def test_multipliers_by_hand() -> None:
    # lr_steps follows WarmupMultiStepLR: gamma ** (number of steps <= t)
    assert [weight_multiplier("lr_steps", t, 100, (60, 90), 0.2) for t in (0, 59, 60, 89, 90, 99)] == (
        pytest.approx([1.0, 1.0, 0.2, 0.2, 0.04, 0.04])
    )
    assert weight_multiplier("lr_steps", 70, 100, (90, 60), 0.2) == pytest.approx(0.2)  # unsorted steps
    # cosine: 1 at the start, 1/2 half-way, 0 at the end
    assert weight_multiplier("cosine", 0, 100) == 1.0
    assert weight_multiplier("cosine", 25, 100) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert weight_multiplier("cosine", 50, 100) == pytest.approx(0.5)
    assert weight_multiplier("cosine", 100, 100) == pytest.approx(0.0)
    assert weight_multiplier("constant", 99, 100, (10,), 0.1) == 1.0
    with pytest.raises(ValueError, match="WEIGHT_SCHEDULE"):
        weight_multiplier("linear", 0, 100)


def _losses(schedule: str, iteration: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    opts = [*SMALL, *SCHEDULE, "DISTILL.WEIGHT_SCHEDULE", schedule]
    model = build_model(distill_config("retinanet_R18_FPN", "retinanet_R18_FPN", opts))
    assert isinstance(model, TBDistiller)
    model.train()
    with EventStorage(iteration) as storage:
        losses = model(synthetic_batch(2, 64, 3))
        if schedule != "constant":
            assert storage.history("tbd/weight_schedule").latest() == pytest.approx(
                weight_multiplier(schedule, iteration, 100, (60, 90), 0.2)
            )
    return {k: v.detach() for k, v in losses.items()}


@pytest.mark.parametrize(("schedule", "iteration", "factor"), [("lr_steps", 95, 0.04), ("cosine", 50, 0.5)])
def test_the_schedule_scales_the_distillation_terms_and_nothing_else(
    schedule: str, iteration: int, factor: float
) -> None:
    constant, scheduled = _losses("constant", iteration), _losses(schedule, iteration)
    assert constant.keys() == scheduled.keys()
    for key in ("loss_hd", "loss_tfd"):
        assert float(constant[key]) > 0
        assert float(scheduled[key]) == pytest.approx(factor * float(constant[key]), rel=1e-5)
    for key in constant.keys() - {"loss_hd", "loss_tfd"}:  # the student's own losses: untouched
        assert torch.equal(constant[key], scheduled[key]), key


def test_lr_steps_before_the_first_step_is_the_paper() -> None:
    constant, scheduled = _losses("constant", 10), _losses("lr_steps", 10)
    for key in constant:
        assert torch.equal(constant[key], scheduled[key]), key


def test_a_bad_schedule_is_refused_naming_the_key() -> None:
    cfg = distill_config("retinanet_R18_FPN", "retinanet_R18_FPN", ["DISTILL.WEIGHT_SCHEDULE", "linear"])
    with pytest.raises(ValueError, match="DISTILL.WEIGHT_SCHEDULE"):
        build_model(cfg)


# ------------------------------------------------------------- beta by the student's initialisation
def test_beta_follows_the_students_init_unless_the_user_sets_it(tmp_path: Path) -> None:
    from tbd.data.shapes import register_shapes
    from tbd.distill.config import EMBEDDED_PRETRAINED_TFD_WEIGHT, PRETRAINED_TFD_WEIGHT, SCRATCH_TFD_WEIGHT

    _, val = register_shapes(tmp_path, num_train=4, num_val=2)  # lazy: only the class names are read

    def beta(weights: str, opts: list[str] | None = None, profile: str = "") -> float:
        return student_distill_cfg(val, weights, opts, profile).DISTILL.TFD_WEIGHT

    assert (PRETRAINED_TFD_WEIGHT, EMBEDDED_PRETRAINED_TFD_WEIGHT, SCRATCH_TFD_WEIGHT) == (0.01, 0.1, 0.4)
    imagenet = "torchvision://mobilenet_v2"
    # what real users have: an ImageNet student in Detectron2's setting (custom / coco profile, or
    # no profile at all: a train_net.py)
    assert beta(imagenet, profile="custom") == beta(imagenet, profile="coco") == PRETRAINED_TFD_WEIGHT
    assert beta(imagenet) == PRETRAINED_TFD_WEIGHT
    assert beta(imagenet, profile="embedded") == EMBEDDED_PRETRAINED_TFD_WEIGHT  # trainable BN, AdamW
    assert beta("") == beta("", profile="custom") == SCRATCH_TFD_WEIGHT  # from scratch: measured for it
    assert beta("", ["DISTILL.TFD_WEIGHT", "0.25"]) == 0.25  # the user's value wins either way
    assert beta(imagenet, ["DISTILL.TFD_WEIGHT", "0.4"], profile="custom") == 0.4
    assert beta(imagenet, ["DISTILL.TFD_WEIGHT", "0.05"], profile="embedded") == 0.05


def test_gate_follows_the_students_init_and_profile_unless_the_user_sets_it(tmp_path: Path) -> None:
    from tbd.config import load_config
    from tbd.data.shapes import register_shapes
    from tbd.distill.config import DEFAULT_GATE, EMBEDDED_PRETRAINED_GATE

    _, val = register_shapes(tmp_path, num_train=4, num_val=2)

    def gate(weights: str, opts: list[str] | None = None, profile: str = "") -> str:
        return student_distill_cfg(val, weights, opts, profile).DISTILL.GATE

    imagenet = "torchvision://mobilenet_v2"
    assert (DEFAULT_GATE, EMBEDDED_PRETRAINED_GATE) == ("none", "harmony")
    assert load_config("tood_MNV2_FPN").DISTILL.GATE == DEFAULT_GATE  # the config default: a train_net.py
    assert gate(imagenet) == gate(imagenet, profile="custom") == gate(imagenet, profile="coco") == "none"
    assert gate(imagenet, profile="embedded") == "harmony"  # measured there (BENCHMARKS.md §1e)
    assert (
        gate("") == gate("", profile="embedded") == "none"
    )  # from scratch: the paper's TBD, measured for it
    assert gate("", ["DISTILL.GATE", "iou"], profile="embedded") == "iou"  # the user's value wins either way
    assert gate(imagenet, ["DISTILL.GATE", "none"], profile="embedded") == "none"
    assert gate(imagenet, ["DISTILL.GATE", "quality"], profile="custom") == "quality"
