"""``tbd plot``: curves read from hand-written metrics.json / summary.json, and one real tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tbd.analysis.curves import (
    EvaluationNotes,
    RunDataError,
    evaluation_figure,
    harmony_summaries,
    load_run,
    training_figure,
)
from tbd.cli.main import main

EDGES = [0.0, 0.5, 0.7, 1.0]


def _harmony(shares: list[float], share: float, score_thresh: float = 0.5) -> dict[str, Any]:
    return {
        "score_thresh": score_thresh,
        "iou_thresh": 0.7,
        "score_floor": 0.05,
        "bin_edges": EDGES,
        "class_agnostic": False,
        "reported_iou_thresholds": [0.5, 0.7],
        "num_easy": 10,
        "harmonious_share": share,
        "easy_iou_shares": shares,
        "mean_hs": 0.8,
        "mean_hs_easy": 0.7,
    }


def det_loss(it: int) -> float:
    return 3.0 - it / 100  # loss_cls + loss_box_giou, split 1:2 below


def write_run(
    folder: Path,
    iters: int = 100,
    eval_every: int | None = 50,
    distill: bool = True,
    baseline: bool = False,
    summary: dict[str, Any] | None = None,
) -> Path:
    """A run folder with known values: training rows every 20 iterations (last at iters - 1),
    evaluations with AP = iteration / 10 and harmonious share = iteration / 200."""
    folder.mkdir(parents=True)
    rows = []
    for it in [*range(19, iters, 20), iters - 1]:
        row: dict[str, Any] = {
            "iteration": it,
            "loss_cls": det_loss(it) / 3,
            "loss_box_giou": 2 * det_loss(it) / 3,
            "lr": 0.001,
            "total_loss": 99.0,
        }
        if distill:
            row.update({"loss_hd": 0.5, "loss_tfd": 1.0 + it / 1000, "tbd/hd": 0.5})
            row.update({"tbd/twg_w_cls_s8": 0.3, "tbd/twg_w_cls_s16": 0.5, "tbd/twg_w_cls_s32": 0.4})
        if baseline:
            row.update({"baseline/loss_cls": 1.0, "baseline/loss_box_giou": 1.5})
        rows.append(row)
    evals = [*range(eval_every - 1, iters, eval_every)] if eval_every else [iters - 1]
    for it in evals:
        row = {"iteration": it, "bbox/AP": it / 10, "bbox/AP50": it / 5, "harmony/harmonious_share": it / 200}
        if baseline:
            row["baseline/bbox/AP"] = it / 20
        rows.append(row)
    rows.append({"iteration": iters - 1, "bbox/AP": float("nan")})  # undefined values are skipped
    (folder / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def distill_summary(teacher_ap: float = 45.0, student_share: float = 0.6) -> dict[str, Any]:
    return {
        "teacher": {
            "name": "mnv2in",
            "config": "configs/t.yaml",
            "bbox": {"AP": teacher_ap},
            "harmony": _harmony([0.2, 0.3, 0.5], 0.5),
        },
        "student": {"name": "mnv2", "bbox": {"AP": 9.9}, "harmony": _harmony([0.1, 0.3, 0.6], student_share)},
    }


def lines_by_label(ax: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in ax.get_lines()}


# --------------------------------------------------------------------------- reading
def test_load_run_reads_series_and_sums_the_detector_losses(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path / "r", baseline=True))
    its, det = run.detection_loss()
    assert its.tolist() == [19, 39, 59, 79, 99]
    np.testing.assert_allclose(det, [det_loss(i) for i in its])  # HD/TFD and total_loss left out
    b_its, b_det = run.detection_loss("baseline/")
    np.testing.assert_allclose(b_det, 2.5)
    assert b_its.tolist() == its.tolist()
    its, ap = run.evaluations()
    assert its.tolist() == [49, 99] and ap.tolist() == [4.9, 9.9]  # the NaN row did not overwrite 9.9
    assert run.evaluations("baseline/")[1].tolist() == [2.45, 4.95]
    assert sorted(run.twg_levels()) == [8, 16, 32]


def test_a_resumed_run_keeps_the_last_value_of_a_repeated_iteration(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "r", distill=False)
    with (folder / "metrics.json").open("a") as f:  # resumed from 39: iteration 59 logged again
        f.write(json.dumps({"iteration": 59, "loss_cls": 10.0, "loss_box_giou": 20.0}) + "\n")
    its, det = load_run(folder).detection_loss()
    assert dict(zip(its.tolist(), det.tolist()))[59] == 30.0


def test_missing_folder_or_metrics_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RunDataError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDataError, match="has no metrics.json"):
        load_run(tmp_path / "empty")


# --------------------------------------------------------------------------- figures
def test_training_figure_draws_each_curve_with_the_logged_values(tmp_path: Path) -> None:
    runs = [
        load_run(write_run(tmp_path / "a", baseline=True), "tbd"),
        load_run(write_run(tmp_path / "b", distill=False), "alone"),
    ]
    fig = training_figure(runs)
    det, hd, tfd, twg = fig.axes
    assert "detection loss" in det.get_title() and det.get_ylabel() == "loss"
    assert twg.get_xlabel() == "iteration" and "ω_c" in twg.get_title()
    det_lines = lines_by_label(det)
    assert set(det_lines) == {"tbd", "tbd: baseline", "alone"}
    np.testing.assert_allclose(det_lines["tbd"].get_ydata(), [det_loss(i) for i in (19, 39, 59, 79, 99)])
    assert det_lines["tbd: baseline"].get_linestyle() == "--"
    assert list(lines_by_label(hd)) == ["tbd"]  # the run without a teacher has no HD curve
    np.testing.assert_allclose(lines_by_label(tfd)["tbd (loss_tfd)"].get_ydata()[0], 1.019)
    (twg_line,) = twg.get_lines()
    np.testing.assert_allclose(twg_line.get_ydata(), 0.4)  # mean of 0.3, 0.5, 0.4 over the levels


def test_training_figure_says_what_a_plain_run_lacks(tmp_path: Path) -> None:
    fig = training_figure([load_run(write_run(tmp_path / "a", distill=False))])
    texts = [t.get_text() for ax in fig.axes[1:] for t in ax.texts]
    assert any("no loss_hd" in t for t in texts) and any("no TWG" in t for t in texts)


def test_evaluation_figure_puts_ap_share_and_teacher_on_one_axes(tmp_path: Path) -> None:
    runs = [
        load_run(write_run(tmp_path / "a", baseline=True, summary=distill_summary()), "tbd"),
        load_run(write_run(tmp_path / "b", distill=False, eval_every=25), "alone"),
    ]
    fig = evaluation_figure(runs)
    ax, share_ax = fig.axes
    assert ax.get_xlabel() == "iteration" and ax.get_ylabel().startswith("AP")
    assert "harmonious" in share_ax.get_ylabel()
    lines = lines_by_label(ax)
    assert lines["tbd: AP"].get_ydata().tolist() == [4.9, 9.9]
    assert lines["tbd: baseline AP"].get_ydata().tolist() == [2.45, 4.95]
    assert lines["alone: AP"].get_xdata().tolist() == [24, 49, 74, 99]
    assert lines["teacher mnv2in: 45.0 AP"].get_ydata()[0] == 45.0
    shares = lines_by_label(share_ax)
    np.testing.assert_allclose(shares["tbd: harmonious %"].get_ydata(), [24.5, 49.5])  # per evaluation
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "tbd: harmonious %" in legend and "alone: AP" in legend


def test_final_share_from_summary_when_evaluations_did_not_measure_it(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "a", summary=distill_summary(student_share=0.625))
    rows = [json.loads(x) for x in (folder / "metrics.json").read_text().splitlines()]
    for row in rows:
        row.pop("harmony/harmonious_share", None)
    (folder / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, share_ax = evaluation_figure([load_run(folder, "old")]).axes
    (line,) = share_ax.get_lines()
    assert line.get_label() == "old: harmonious % (final)"
    assert line.get_xdata().tolist() == [99] and line.get_ydata().tolist() == [62.5]


def test_a_run_evaluated_only_at_the_end_gets_a_note(tmp_path: Path) -> None:
    notes = EvaluationNotes()
    fig = evaluation_figure([load_run(write_run(tmp_path / "a", eval_every=None), "once")], notes)
    assert len(notes.lines) == 1 and "--eval-period" in notes.lines[0] and "iteration 100" in notes.lines[0]
    assert any("--eval-period" in t.get_text() for t in fig.texts)  # on the figure too
    assert lines_by_label(fig.axes[0])["once: AP"].get_ydata().tolist() == [9.9]


def test_harmony_summaries_take_the_shared_teacher_once(tmp_path: Path) -> None:
    runs = [
        load_run(write_run(tmp_path / "a", summary=distill_summary()), "s1"),
        load_run(write_run(tmp_path / "b", summary=distill_summary()), "s2"),
        load_run(write_run(tmp_path / "c"), "trained"),
    ]
    found, notes = harmony_summaries(runs)
    assert list(found) == ["teacher mnv2in", "s1", "s2"]
    assert len(notes) == 1 and "trained" in notes[0] and "tbd harmony --run" in notes[0]


def test_harmony_summaries_add_the_student_trained_alone(tmp_path: Path) -> None:
    summary = distill_summary()
    flat = {f"easy_iou_share-{a:g}-{b:g}": v for a, b, v in zip(EDGES[:-1], EDGES[1:], (0.7, 0.2, 0.1))}
    summary["student_alone"] = {
        "name": "mnv2",
        "harmony": {
            **flat,
            "harmonious_share": 0.1,
            "num_easy": 7.0,
            "mean_hs": 0.6,
            "score_thresh": 0.5,
            "iou_thresh": 0.7,
            "score_floor": 0.05,
        },
    }
    found, _ = harmony_summaries([load_run(write_run(tmp_path / "a", summary=summary), "demo")])
    assert list(found) == ["teacher mnv2in", "demo", "demo: student alone"]
    alone = found["demo: student alone"]
    assert alone["easy_iou_shares"] == [0.7, 0.2, 0.1] and alone["harmonious_share"] == 0.1
    assert alone["num_easy"] == 7 and alone["bin_edges"] == EDGES
    # measured at another score threshold than the distilled student: not drawn beside it
    summary["student_alone"]["harmony"]["score_thresh"] = 0.3
    found, _ = harmony_summaries([load_run(write_run(tmp_path / "b", summary=summary), "demo")])
    assert list(found) == ["teacher mnv2in", "demo"]


# --------------------------------------------------------------------------- command
def test_cli_writes_png_and_svg_of_each_figure(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", baseline=True, summary=distill_summary())
    b = write_run(
        tmp_path / "b", summary={**distill_summary(), "student": {"harmony": _harmony([1, 0, 0], 0.0, 0.3)}}
    )
    out = tmp_path / "plots"
    assert main(["plot", "--run", f"tbd={a}", "--run", str(b), "--output", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    # b's student was measured at another score threshold: a second harmony figure
    stems = ["evaluation", "harmony", "harmony_2", "training"]
    assert names == sorted(f"{s}.{ext}" for s in stems for ext in ("png", "svg"))
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (out / "evaluation.svg").read_bytes()[:1000]


def test_cli_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", "--run", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["plot", "--run", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "no metrics.json" in capsys.readouterr().out
    assert main(["plot", "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_real_tiny_distillation_run(tmp_path: Path) -> None:
    """End to end: `tbd distill` with an evaluation every 2 iterations, then `tbd plot` on it."""
    common = ["--num-train-images", "4", "--num-val-images", "2", "--batch-size", "2", "--device", "cpu"]
    run = tmp_path / "run"
    argv = ["distill", "--teacher", "r50", "--teacher-iters", "1", "--student", "r18", "--iters", "2"]
    argv += ["--eval-period", "1", "--no-harmony", "--teacher-cache", str(tmp_path / "cache"), "-o", str(run)]
    assert main(argv + common) == 0
    curves = load_run(run)
    # HD, TFD, TWG and the detector's losses logged; AP and harmony per evaluation (NaN this early:
    # an evaluation row is written after iterations 1 and 2 all the same)
    assert {"loss_hd", "loss_tfd", "loss_cls", "tbd/twg_w_cls_s8"} <= set(curves.keys())
    rows = [json.loads(x) for x in (run / "metrics.json").read_text().splitlines()]
    evaluated = [r["iteration"] for r in rows if "bbox/AP" in r and "harmony/harmonious_share" in r]
    assert len(evaluated) == 2 and evaluated[0] == 0  # the periodic one and the final one
    fig = training_figure([curves])
    assert lines_by_label(fig.axes[1])[curves.name].get_ydata().size >= 1
    out = tmp_path / "plots"
    assert main(["plot", "--run", str(run), "-o", str(out), "--format", "png"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.png", "training.png"]
    assert all(math.isfinite(v) for v in lines_by_label(fig.axes[2])[f"{curves.name} (loss_tfd)"].get_ydata())


def test_a_half_written_last_line_is_skipped_but_a_broken_middle_line_is_an_error(tmp_path: Path) -> None:
    folder = write_run(tmp_path / "r")
    text = (folder / "metrics.json").read_text()
    (folder / "metrics.json").write_text(text + '{"iteration": 120, "loss_c')
    assert load_run(folder).evaluations()[1].tolist() == [4.9, 9.9]
    (folder / "metrics.json").write_text('{"iteration": 1, "loss_c\n' + text)
    with pytest.raises(RunDataError, match="line 1 is not JSON"):
        load_run(folder)
