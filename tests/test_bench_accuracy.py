"""scripts/bench_accuracy.py: which runs are done, what is still to measure, and the aggregation."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "bench_accuracy.py"
_spec = importlib.util.spec_from_file_location("bench_accuracy", _PATH)
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _harmony(folder: Path, share: float | None, mean_hs: float | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model = {"harmonious_share": share, "mean_hs_easy": mean_hs}
    (folder / "harmony.json").write_text(json.dumps({"models": {"student": model}}))


def _baseline(run: Path, ap: float, share_03: float | None = None) -> None:
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"bbox": {"AP": ap, "AP50": 2 * ap, "AP75": ap}}))
    _harmony(run / "harmony", None, None)  # nothing scores >= 0.5
    if share_03 is not None:
        _harmony(run / "harmony_s0.3", share_03, 0.6)


def _distilled(run: Path, ap: float, teacher_ap: float) -> None:
    run.mkdir(parents=True, exist_ok=True)
    summary = {
        "student": {"bbox": {"AP": ap, "AP50": 2 * ap, "AP75": ap}, "harmony": None},
        "teacher": {"bbox": {"AP": teacher_ap}, "harmony": {"harmonious_share": 0.4, "mean_hs_easy": 0.6}},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    cfg = (
        "DISTILL:\n  TEACHER_CONFIG: configs/fcos_R50_FPN.yaml\n  TEACHER_WEIGHTS: /cache/t/model_final.pth\n"
    )
    (run / "config.yaml").write_text(cfg)


def _args(out: Path, seeds: list[int], thresholds: list[float]) -> object:
    return bench.parse_args(
        ["--out", str(out), "--seeds", *map(str, seeds), "--harmony-score-thresh", *map(str, thresholds)]
    )


def test_extra_threshold_commands_cover_missing_runs_and_the_teacher_once(tmp_path: Path) -> None:
    _baseline(tmp_path / "baseline" / "seed0", 6.0, share_03=0.2)  # already measured at 0.3
    _baseline(tmp_path / "baseline" / "seed1", 7.0)
    _distilled(tmp_path / "tbd_full" / "seed0", 10.0, 16.6)
    _distilled(tmp_path / "tbd_full" / "seed1", 11.0, 16.6)
    (tmp_path / "hd_only" / "seed0").mkdir(parents=True)  # unfinished: nothing to measure yet
    args = _args(tmp_path, [0, 1], [0.3])
    todo = bench.harmony_commands(args, bench.variant_overrides(args))
    outs = [out.relative_to(tmp_path).as_posix() for out, _ in todo]
    assert outs == [
        "baseline/seed1/harmony_s0.3",
        "tbd_full/seed0/harmony_s0.3",
        "tbd_full/seed1/harmony_s0.3",
        "teacher/harmony_s0.3",
    ]
    teacher_cmd = todo[-1][1]
    assert "teacher=configs/fcos_R50_FPN.yaml:/cache/t/model_final.pth" in teacher_cmd
    assert teacher_cmd[teacher_cmd.index("--score-thresh") + 1] == "0.3"
    student_cmd = todo[0][1]
    assert f"student={tmp_path / 'baseline' / 'seed1'}" in student_cmd
    assert student_cmd[student_cmd.index("--num-train-images") + 1] == str(args.num_train_images)


def test_aggregation_mean_and_sample_std_with_extra_thresholds(tmp_path: Path) -> None:
    _baseline(tmp_path / "baseline" / "seed0", 6.0, share_03=0.2)
    _baseline(tmp_path / "baseline" / "seed1", 8.0, share_03=0.4)
    rows = [bench.read_run(tmp_path / "baseline" / f"seed{s}", None, [0.3])["student"] for s in (0, 1)]
    stats = bench.aggregate(rows, [0.3])
    assert stats["AP"]["mean"] == pytest.approx(7.0)
    assert stats["AP"]["std"] == pytest.approx(math.sqrt(2.0))  # sample std of (6, 8)
    assert stats["AP50"]["mean"] == pytest.approx(14.0)
    assert stats["harmonious_share"] == {"mean": None, "std": None, "n": 0}  # undefined at 0.5
    assert stats["harmonious_share@0.3"]["mean"] == pytest.approx(0.3)
    assert stats["harmonious_share@0.3"]["n"] == 2
    table = bench.format_table({"baseline": stats}, {"baseline": 2}, [0.3])
    header, _, row = table.splitlines()
    assert "harm. % @0.3" in header
    assert "30.0 ± 14.1" in row  # shares are printed in percent
    assert "7.0 ± 1.4" in row


def test_unfinished_runs_are_not_read(tmp_path: Path) -> None:
    run = tmp_path / "tbd_full" / "seed0"
    run.mkdir(parents=True)
    assert bench.read_run(run, [], [0.3]) is None
    _distilled(run, 10.0, 16.6)
    got = bench.read_run(run, [], [0.3])
    assert got["student"]["AP"] == 10.0
    assert got["student"]["harmonious_share@0.3"] is None  # not measured yet
    assert got["teacher"]["harmonious_share"] == pytest.approx(0.4)


def test_plot_writes_a_png_for_the_finished_variants(tmp_path: Path) -> None:
    per_variant = {
        "baseline": [{"AP": 6.0}, {"AP": 7.0}],
        "tbd_full": [{"AP": 10.0}],
        "hd_only": [{"AP": None}],  # nothing detected: left out of the plot
    }
    path = bench.plot_accuracy(per_variant, {"AP": 16.6}, tmp_path / "accuracy.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_stats_read_the_last_logged_step(tmp_path: Path) -> None:
    lines = [
        {"iteration": 19, "time": 1.0, "total_loss": 4.0, "loss_cls": 2.0, "loss_hd": 1.0, "loss_tfd": 1.0},
        {
            "iteration": 39,
            "time": 3.0,
            "total_loss": 2.0,
            "loss_cls": 1.5,
            "loss_tfd": 0.5,
            "tbd/twg_w_cls_s8": 0.2,
            "tbd/twg_w_cls_s16": 0.4,
        },
        {"iteration": 39, "bbox/AP": 5.0},  # the evaluation record has no step time
        {
            "iteration": 59,
            "time": 2.0,
            "total_loss": 2.0,
            "loss_cls": 1.0,
            "loss_hd": 0.5,
            "loss_tfd": 0.5,
            "tbd/twg_w_cls_s8": 0.1,
            "tbd/twg_w_cls_s16": 0.3,
        },
    ]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    stats = bench.training_stats(tmp_path)
    assert stats["step_s"] == pytest.approx(2.0)  # median of 1, 3, 2
    assert stats["distill_share_last"] == pytest.approx(0.5)  # (0.5 + 0.5) / 2
    assert stats["twg_w_cls_last"] == pytest.approx(0.2)  # mean of 0.1 and 0.3
    assert bench.training_stats(tmp_path / "missing") == {
        "step_s": None,
        "distill_share_last": None,
        "twg_w_cls_last": None,
    }


def test_student_weights_reach_train_and_distill_commands(tmp_path: Path) -> None:
    args = bench.parse_args(
        ["--out", str(tmp_path), "--student", "mnv2", "--student-weights", "torchvision://mobilenet_v2"]
    )
    train = bench.run_commands(args, "baseline", None, 0, tmp_path / "baseline" / "seed0")[0]
    assert train[train.index("--model") + 1] == "mnv2"
    assert train[train.index("--weights") + 1] == "torchvision://mobilenet_v2"
    distill = bench.run_commands(args, "tbd_full", [], 0, tmp_path / "tbd_full" / "seed0")[0]
    assert distill[distill.index("--student-weights") + 1] == "torchvision://mobilenet_v2"
    plain = bench.parse_args(["--out", str(tmp_path)])
    assert "--weights" not in bench.run_commands(plain, "baseline", None, 0, tmp_path / "b")[0]


def test_accuracy_table_combines_studies_with_hand_worked_statistics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("accuracy_table", _PATH.with_name("accuracy_table.py"))
    assert spec and spec.loader
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)

    def run(ap: float, share: float | None, step: float) -> dict:
        student = {"AP": ap, "AP50": ap + 5, "AP75": ap - 1, "harmonious_share@0.3": share}
        return {"student": student, "training": {"step_s": step}}

    one = tmp_path / "one.json"
    one.write_text(json.dumps({"runs": {"baseline/seed0": run(4.0, 0.1, 1.0), "baseline/seed1": run(6.0, 0.3, 3.0),
                                        "tbd_full/seed0": run(9.0, None, 2.0)}}))  # fmt: skip
    assert table.main(["a=" + f"{one}:baseline", "b=" + f"{one}:tbd_full"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # mean 5.0, sample std sqrt(2) = 1.4; shares 10 % and 30 %: 20.0 ± 14.1; median step 2.0
    assert lines[2] == "| a | 2 | 5.0 ± 1.4 | 10.0 ± 1.4 | 4.0 ± 1.4 | 20.0 ± 14.1 | 2.00 | 4.0 / 6.0 |"
    assert lines[3] == "| b | 1 | 9.0 ± 0.0 | 14.0 ± 0.0 | 8.0 ± 0.0 | - | 2.00 | 9.0 |"
    assert table.main([f"c={one}:mimic_mse"]) == 2  # a variant without runs is an error, not a blank row
    with pytest.raises(SystemExit):
        table.main(["no-separator"])
