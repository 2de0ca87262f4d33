"""`tbd distill --with-baseline` end to end: three rows, the gain in summary.json, the baseline logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tbd.cli.main import main


@pytest.mark.slow
def test_with_baseline_reports_teacher_student_alone_and_distilled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "distill", "--teacher", "r50", "--student", "r18", "--head", "retinanet",
        "--teacher-iters", "2", "--iters", "2", "--no-harmony", "--with-baseline",
        "--teacher-cache", str(tmp_path / "cache"), "--output", str(tmp_path / "run"),
        "--data-dir", str(tmp_path / "data"), "--num-train-images", "8", "--num-val-images", "4",
        "--batch-size", "2", "--device", "cpu",
        # two iterations score nothing above the default 0.05: keep every box so AP is a number
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
    ]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "student r18 alone" in out and "student r18 distilled" in out and "gain (distilled − alone)" in out
    # every model named by what it is: detector, backbone, init (docs: issue 25 item 3)
    assert "teacher r50: FCOS, R-50-FPN" in out and "student r18 (retinanet): RetinaNet, R-18-FPN" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["distill"]["with_baseline"] is True
    assert summary["teacher"]["description"].startswith("FCOS, R-50-FPN 128 ch, weights ")
    assert summary["student"]["description"] == summary["student_alone"]["description"]
    assert summary["student"]["description"].startswith("RetinaNet, R-18-FPN")
    alone, distilled = summary["student_alone"]["bbox"], summary["student"]["bbox"]
    gain = summary["gain"]["bbox"]
    assert set(gain) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert gain["AP"] is not None and alone["AP"] is not None, "both students must predict something"
    for key, value in gain.items():
        if value is None:  # undefined metric (no object of that size): null in both places
            assert alone[key] is None or distilled[key] is None
        else:
            assert value == pytest.approx(distilled[key] - alone[key])
    assert summary["gain"]["note"]
    # the end note names a teacher that the student alone passed (the teacher row's AP reaches it)
    teacher_ap, margin = summary["teacher"]["bbox"]["AP"], summary["gain"]["margin_AP"]
    assert margin == 0.5  # DISTILL.BASELINE_MARGIN's default
    passed = teacher_ap is not None and alone["AP"] > teacher_ap and gain["AP"] <= margin
    assert ("ended above the teacher" in summary["gain"]["note"]) == passed, (alone["AP"], teacher_ap)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "WITH_BASELINE: true" in config
    assert "TFD_WEIGHT: 0.4" in config  # an R-18 from scratch: the beta measured for it


def test_without_baseline_the_gain_is_said_to_be_unknown() -> None:
    from tbd.distill.baseline import gain_note

    level, text = gain_note({"AP": 26.2}, None, 0.5)
    assert level == "note" and "the gain of distillation is unknown" in text and "--with-baseline" in text
