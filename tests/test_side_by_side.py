"""scripts/side_by_side.py: the distilled student against itself alone, read from run folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "side_by_side.py"
_spec = importlib.util.spec_from_file_location("side_by_side", _PATH)
assert _spec and _spec.loader
sbs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sbs)


def _run(root: Path, name: str, alone: float, distilled: float, hd: float, tfd: float) -> Path:
    run = root / name
    run.mkdir(parents=True)
    bbox = lambda ap: {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2}  # noqa: E731
    summary = {
        "teacher": {"bbox": {"AP": 50.0}, "input": "128/128 px", "harmony": {"harmonious_share": 0.8}},
        "teacher_own_input": {"bbox": {"AP": 60.0}, "input": "192/192 px"},
        "student": {"bbox": bbox(distilled)},
        "student_alone": {"bbox": bbox(alone)},
        "gain": {"bbox": {"AP": distilled - alone, "AP50": 2 * (distilled - alone)}},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [
        # an early row (outside the tail) whose share would change the mean if it were counted
        {"iteration": 9, "total_loss": 1.0, "loss_hd": 1.0, "loss_tfd": 0.0, "loss_cls": 0.0},
        {"iteration": 19, "total_loss": 2.0, "loss_hd": hd, "loss_tfd": tfd, "loss_cls": 1.0,
         "baseline/loss_cls": 0.8},
        {"iteration": 19, "bbox/AP": distilled - 1, "baseline/bbox/AP": alone - 2,
         "harmony_score0.5/harmonious_share": 0.6, "baseline/harmony_score0.5/harmonious_share": 0.5},
        {"iteration": 29, "total_loss": 4.0, "loss_hd": 2 * hd, "loss_tfd": 2 * tfd, "loss_cls": 3.0,
         "baseline/loss_cls": 1.2},
        {"iteration": 29, "bbox/AP": distilled, "baseline/bbox/AP": alone,
         "harmony_score0.5/harmonious_share": 0.7, "baseline/harmony_score0.5/harmonious_share": 0.65},
    ]  # fmt: skip
    (run / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run


def test_rows_and_group_means_by_hand(tmp_path: Path) -> None:
    a = _run(tmp_path, "s0", alone=40.0, distilled=43.0, hd=0.5, tfd=0.3)
    b = _run(tmp_path, "s1", alone=42.0, distilled=41.0, hd=0.2, tfd=0.2)
    out = tmp_path / "sbs.json"
    result = sbs.main(["--group", f"strong={a},{b}", "--tail", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    first, second = result["groups"]["strong"]["runs"]
    assert first["gain"] == pytest.approx(3.0) and second["gain"] == pytest.approx(-1.0)
    assert first["teacher"] == {
        "AP": 50.0, "input": "128/128 px", "AP_own_input": 60.0, "own_input": "192/192 px", "harmonious_share": 0.8,
    }  # fmt: skip
    # per evaluation, distilled and alone side by side (the first evaluation: +1 = (43-1) - (40-2))
    assert [(e["distilled"] - e["alone"]) for e in first["evaluations"]] == pytest.approx([4.0, 3.0])
    # the share of the loss over the last two training rows: (0.8/2 + 1.6/4) / 2 = 0.4
    assert first["distill_share_of_loss"] == pytest.approx(0.4)
    assert second["distill_share_of_loss"] == pytest.approx(0.2)
    assert first["detection_losses"]["cls"] == {"distilled": pytest.approx(2.0), "alone": pytest.approx(1.0)}
    assert first["harmonious_share"]["0.5"] == {"alone": 0.65, "distilled": 0.7}
    assert first["harmonious_share"]["0.3"] == {"alone": None, "distilled": None}
    summary = result["groups"]["strong"]["summary"]
    assert summary["seeds"] == 2
    assert summary["gain"]["mean"] == pytest.approx(1.0) and summary["gain"]["std"] == pytest.approx(2**1.5)
    assert summary["alone_AP"]["mean"] == pytest.approx(41.0)
    assert summary["distilled_AP"]["mean"] == pytest.approx(42.0)


def test_a_run_without_the_baseline_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "plain"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"teacher": {}, "student": {"bbox": {"AP": 1.0}}}))
    with pytest.raises(SystemExit, match="--with-baseline"):
        sbs.main(["--group", f"x={run}"])
