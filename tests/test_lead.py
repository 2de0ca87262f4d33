"""DISTILL.LEAD_HD_WEIGHT: alpha follows the teacher's lead over the distilled student (tbd/distill/lead.py).

The rule by hand-worked values; the harmony loss actually weighted by the alpha in use; and through
tbd's Trainer on tiny data: a teacher that trails leaves the run bit-identical to the rule switched
off, a teacher that leads raises alpha from the step after the evaluation on, and a run resumed from
the checkpoint written just before that evaluation ends bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import student_distill_cfg
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from tbd.config import load_config
from tbd.distill.config import validate_tbd_config
from tbd.distill.lead import TeacherLeadHook, lead_alpha
from tbd.distill.testing import distill_config, synthetic_batch
from tbd.engine.trainer import Trainer
from tbd.summaries import alpha_history, alpha_note

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_rule_by_hand() -> None:
    # teacher 14.7 AP vs student 5.9: leads by 8.8 > 1 -> the lead weight
    assert lead_alpha(14.7, 5.9, 1.0, 3.0, 1.0) == 3.0
    # teacher 2.8 vs student 6.3: trails -> alpha stays
    assert lead_alpha(2.8, 6.3, 1.0, 3.0, 1.0) == 1.0
    # a lead of exactly the margin is not "more than the margin"; just above it is
    assert lead_alpha(11.0, 10.0, 1.0, 3.0, 1.0) == 1.0
    assert lead_alpha(11.01, 10.0, 1.0, 3.0, 1.0) == 3.0
    # the lead weight may also be lower than HD_WEIGHT (a user's choice): it is used as given
    assert lead_alpha(30.0, 10.0, 2.0, 0.5, 1.0) == 0.5
    # unknown APs (nothing detected: NaN -> None) and the rule switched off leave alpha alone
    assert lead_alpha(None, 5.0, 1.0, 3.0, 1.0) == 1.0
    assert lead_alpha(14.7, None, 1.0, 3.0, 1.0) == 1.0
    assert lead_alpha(14.7, 5.9, 1.0, 0.0, 1.0) == 1.0


def test_the_end_of_run_line_says_what_the_rule_did() -> None:
    assert alpha_note(1.0, 3.0, 1.0, []).startswith("alpha stayed 1: no periodic evaluation")
    assert alpha_note(1.0, 3.0, 1.0, [(99, 1.0)]).startswith("alpha stayed 1 (")
    assert alpha_note(1.0, 3.0, 1.0, [(99, 3.0), (199, 3.0), (299, 1.0)]).startswith(
        "alpha 1 -> 3 after iteration 100, 3 -> 1 after iteration 300 ("
    )


def test_negative_lead_keys_are_refused() -> None:
    cfg = load_config("retinanet_R18_FPN")
    cfg.DISTILL.LEAD_HD_WEIGHT = -1.0
    with pytest.raises(ValueError, match="LEAD_HD_WEIGHT"):
        validate_tbd_config(cfg)
    cfg.DISTILL.LEAD_HD_WEIGHT, cfg.DISTILL.LEAD_MARGIN = 3.0, -0.5
    with pytest.raises(ValueError, match="LEAD_MARGIN"):
        validate_tbd_config(cfg)


def test_the_harmony_loss_is_weighted_by_the_alpha_in_use() -> None:
    opts = [
        "MODEL.RETINANET.NUM_CLASSES",
        "8",
        "DISTILL.TEACHER_OPTS",
        "['MODEL.RETINANET.NUM_CLASSES', '8']",
    ]
    batch = synthetic_batch(2, 64, seed=3)

    def losses(lead: float, alpha: float | None) -> dict[str, torch.Tensor]:
        cfg = distill_config(
            "retinanet_R18_FPN", "retinanet_R18_FPN", [*opts, "DISTILL.LEAD_HD_WEIGHT", str(lead)]
        )
        torch.manual_seed(0)
        model = build_model(cfg)
        model.train()
        if alpha is not None:
            model.hd_alpha.fill_(alpha)
        with EventStorage():
            return model(batch)

    off = losses(0.0, None)
    assert off["loss_hd"] > 0
    # the rule on, alpha still HD_WEIGHT (no evaluation yet): the same loss to the last bit
    on = losses(3.0, None)
    assert torch.equal(on["loss_hd"], off["loss_hd"]) and torch.equal(on["loss_tfd"], off["loss_tfd"])
    # alpha set to 3 by the hook: three times the harmony loss, the feature loss untouched
    led = losses(3.0, 3.0)
    assert led["loss_hd"].item() == pytest.approx(3 * off["loss_hd"].item(), rel=1e-6)
    assert torch.equal(led["loss_tfd"], off["loss_tfd"])
    # a peer method has no harmony term: nothing for the rule to weight, no state for it
    peer = distill_config(
        "retinanet_R18_FPN",
        "retinanet_R18_FPN",
        [*opts, "DISTILL.METHOD", "mimic_mse", "DISTILL.LEAD_HD_WEIGHT", "3.0"],
    )
    assert not hasattr(build_model(peer), "hd_alpha")
    # HD switched off (the TFD-only ablation) stays off: the rule does not bring it back
    no_hd = distill_config(
        "retinanet_R18_FPN",
        "retinanet_R18_FPN",
        [*opts, "DISTILL.HD_WEIGHT", "0.0", "DISTILL.LEAD_HD_WEIGHT", "3.0"],
    )
    assert not hasattr(build_model(no_hd), "hd_alpha")


def _cfg(dataset: str, out: Path, lead: float, iters: int = 4) -> object:
    return distill_config(
        "retinanet_R18_FPN",
        "retinanet_R18_FPN",
        [
            "MODEL.RETINANET.NUM_CLASSES", "2",
            "DISTILL.TEACHER_OPTS", "['MODEL.RETINANET.NUM_CLASSES', '2']",
            "DISTILL.LEAD_HD_WEIGHT", str(lead),
            "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", f"('{dataset}',)",
            "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
            "INPUT.RANDOM_FLIP", "none", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01", "SOLVER.MOMENTUM", "0.9",
            "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "2", "SEED", "0",
            "OUTPUT_DIR", str(out),
        ],
    )  # fmt: skip


def _trainer(cfg, resume: bool = False, teacher_ap: float | None = None) -> Trainer:
    seed_all_rng(0)
    trainer = Trainer(cfg, progress=False)
    trainer.resume_or_load(resume=resume)
    if teacher_ap is not None:  # as if the teacher had been evaluated at that AP
        trainer.model.lead_ap.fill_(teacher_ap)
    return trainer


def _student(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.student.state_dict().items()}


def _history(trainer: Trainer, key: str) -> list[float]:
    return [v for v, _ in trainer.storage.history(key).values()]


def test_a_trailing_teacher_leaves_the_run_as_it_was_and_a_leading_one_raises_alpha(
    tiny_coco: str, tmp_path: Path
) -> None:
    off = _trainer(_cfg(tiny_coco, tmp_path / "off", lead=0.0))  # the rule switched off
    off.train()
    assert not any(isinstance(h, TeacherLeadHook) for h in off._hooks)
    # no periodic evaluation: the rule can never compare, so no hook and no teacher evaluation for it
    never = _cfg(tiny_coco, tmp_path / "never", lead=3.0, iters=1)
    never.TEST.EVAL_PERIOD = 0
    unevaluated = _trainer(never)
    assert not any(isinstance(h, TeacherLeadHook) for h in unevaluated._hooks)

    # a random teacher detects nothing (AP 0): it does not lead the student, alpha stays 1
    trailing = _trainer(_cfg(tiny_coco, tmp_path / "trailing", lead=3.0))
    trailing.train()
    assert float(trailing.model.lead_ap) == pytest.approx(0.0, abs=1.0)  # evaluated at the start
    assert _history(trailing, "tbd/hd_weight") == [1.0]  # one periodic evaluation (iteration 2 of 4)
    assert float(trailing.model.hd_alpha) == 1.0
    a, b = _student(off), _student(trailing)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the rule switched off
    rows = [json.loads(x) for x in (tmp_path / "trailing" / "metrics.json").read_text().splitlines()]
    assert any("teacher/bbox/AP" in r for r in rows)
    assert alpha_history(tmp_path / "trailing" / "metrics.json") == [(1, 1.0)]  # read back for summary.json

    # a teacher far ahead (its AP set as if evaluated at 90): alpha 3 from the step after the first
    # evaluation; two evaluations (iterations 2 and 4 of 6) within one of Detectron2's 20-iteration
    # writer windows, and metrics.json (so summary.json) has both choices
    leading = _trainer(_cfg(tiny_coco, tmp_path / "leading", lead=3.0, iters=6), teacher_ap=90.0)
    leading.train()
    assert _history(leading, "tbd/hd_weight") == [3.0, 3.0] and float(leading.model.hd_alpha) == 3.0
    assert alpha_history(tmp_path / "leading" / "metrics.json") == [(1, 3.0), (3, 3.0)]
    hd = _history(leading, "tbd/hd")
    weighted = _history(leading, "loss_hd")
    ratios = [w / h for w, h in zip(weighted, hd)]
    assert ratios[:2] == pytest.approx([1.0, 1.0], rel=1e-5) and ratios[2:] == pytest.approx(
        [3.0] * 4, rel=1e-5
    )
    c = _student(leading)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # and it changed the training


def test_a_run_resumed_before_the_evaluation_redoes_the_choice(tiny_coco: str, tmp_path: Path) -> None:
    cfg = _cfg(tiny_coco, tmp_path / "run", lead=3.0)
    full = _trainer(cfg, teacher_ap=90.0)
    full.train()
    reference = {k: v.clone() for k, v in full.model.state_dict().items()}
    # the periodic checkpoint of iteration 2 is written before that iteration's evaluation
    saved = torch.load(tmp_path / "run" / "model_0000001.pth", weights_only=False)["model"]
    assert float(saved["hd_alpha"]) == 1.0 and int(saved["lead_checked_iter"]) == -1
    assert float(saved["lead_ap"]) == 90.0
    (tmp_path / "run" / "last_checkpoint").write_text("model_0000001.pth")

    resumed = _trainer(cfg, resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    assert float(resumed.model.hd_alpha) == 3.0
    state = resumed.model.state_dict()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def test_the_rule_is_on_where_it_was_measured_unless_the_user_sets_it(tmp_path: Path) -> None:
    from tbd.data.shapes import register_shapes
    from tbd.distill.config import LEAD_RULE_OFF, PRETRAINED_LEAD_HD_WEIGHT

    _, val = register_shapes(tmp_path, num_train=4, num_val=2)  # lazy: only the class names are read

    def lead(weights: str, opts: list[str] | None = None, profile: str = "") -> float:
        return student_distill_cfg(val, weights, opts, profile).DISTILL.LEAD_HD_WEIGHT

    assert (PRETRAINED_LEAD_HD_WEIGHT, LEAD_RULE_OFF) == (3.0, 0.0)
    imagenet = "torchvision://mobilenet_v2"
    # measured for an ImageNet student in Detectron2's setting (BENCHMARKS.md §1h): on there, and in
    # a train_net.py (the config's own default)
    assert load_config("tood_MNV2_FPN").DISTILL.LEAD_HD_WEIGHT == PRETRAINED_LEAD_HD_WEIGHT
    assert lead(imagenet) == lead(imagenet, profile="custom") == lead(imagenet, profile="coco") == 3.0
    # not measured on the embedded profile nor for students from scratch: off there
    assert lead(imagenet, profile="embedded") == lead("") == lead("", profile="custom") == 0.0
    # the user's value wins either way
    assert lead("", ["DISTILL.LEAD_HD_WEIGHT", "2.0"]) == 2.0
    assert lead(imagenet, ["DISTILL.LEAD_HD_WEIGHT", "0.0"], profile="custom") == 0.0
