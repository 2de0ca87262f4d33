"""`tbd distill` / `tbd export` / `tbd eval` end to end on a tiny embedded dataset."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tbd.cli.main import main


def _common(tmp_path: Path) -> list[str]:
    return [
        "--data-dir", str(tmp_path / "data"),
        "--num-train-images", "8",
        "--num-val-images", "4",
        "--batch-size", "2",
        "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("distill")
    args = [
        "distill", "--teacher", "r50", "--student", "r18", "--head", "retinanet",
        "--teacher-iters", "2", "--iters", "2",
        "--teacher-cache", str(tmp / "cache"), "--output", str(tmp / "run"),
        *_common(tmp),
        # every candidate box is kept: after 2 iterations no score reaches the default 0.05, and
        # the export and AP comparisons below must compare boxes, not two empty lists
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
    ]  # fmt: skip
    assert main(args) == 0
    return tmp


def test_distill_trains_teacher_then_student_and_summarises(distilled: Path) -> None:
    run = distilled / "run"
    assert (run / "model_final.pth").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"]["name"] == "r50" and summary["student"]["head"] == "retinanet"
    assert "AP" in summary["teacher"]["bbox"] and "AP" in summary["student"]["bbox"]
    assert summary["teacher"]["config"].endswith("fcos_R50_FPN.yaml")  # the embedded-dataset r50
    assert summary["distill"]["method"] == "tbd" and summary["distill"]["feature_norm"] == "teacher_energy"
    teachers = list((distilled / "cache").iterdir())
    assert len(teachers) == 1 and (teachers[0] / "model_final.pth").is_file()
    # the 2-iteration teacher wrote a periodic checkpoint at iteration 1; the cache keeps the final one
    assert sorted(p.name for p in teachers[0].glob("*.pth")) == ["model_final.pth"]
    metrics = (run / "metrics.json").read_text()
    assert "loss_hd" in metrics and "loss_tfd" in metrics
    # config.yaml records the embedded data this run really used (--num-train/val-images)
    from tbd.config import load_config

    for cfg in (load_config(run / "config.yaml"), load_config(teachers[0] / "config.yaml")):
        assert (cfg.TBD.NUM_TRAIN_IMAGES, cfg.TBD.NUM_VAL_IMAGES) == (8, 4)


def test_second_run_reuses_cached_teacher_and_refuses_finished_output(
    distilled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "distill", "--teacher", "r50", "--student", "r18", "--head", "retinanet",
        "--teacher-iters", "2", "--iters", "1", "--no-harmony",
        "--teacher-cache", str(distilled / "cache"),
        *_common(distilled),
    ]  # fmt: skip
    assert main([*base, "--output", str(distilled / "run")]) == 2
    assert "already holds a finished run" in capsys.readouterr().out
    assert main([*base, "--output", str(distilled / "run2")]) == 0
    assert "using the cached checkpoint" in capsys.readouterr().out


def test_export_loads_in_plain_detectron2_with_same_ap(distilled: Path) -> None:
    run = distilled / "run"
    assert main(["export", "--run", str(run)]) == 0
    weights, config = run / "export" / "model_student.pth", run / "export" / "config_student.yaml"
    assert weights.is_file() and config.is_file()
    assert "DISTILL" not in config.read_text()
    # a fresh interpreter where `import tbd` is impossible: only the environment fixes Detectron2
    # 0.6 needs on this stack are loaded, from compat.py's file, under another module name
    compat = Path(__file__).resolve().parent.parent / "tbd" / "compat.py"
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.modules["tbd"] = None  # any import of tbd fails
        spec = importlib.util.spec_from_file_location("env_fixes", {str(compat)!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); mod.apply()
        import torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model
        cfg = get_cfg()
        cfg.merge_from_file({str(config)!r})
        model = build_model(cfg)
        ck = DetectionCheckpointer(model)
        incompatible = ck._load_model(ck._load_file({str(weights)!r}))
        assert not incompatible.missing_keys and not incompatible.incorrect_shapes, incompatible
        model.eval()
        x = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0)) * 255
        with torch.no_grad():
            boxes = model([{{"image": x}}])[0]["instances"].pred_boxes.tensor
        torch.save(boxes, {str(distilled / "plain_boxes.pth")!r})
        print("OK", type(model).__name__)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "OK RetinaNet" in proc.stdout, proc.stderr[-2000:]
    # the same boxes as the run's own model (the distiller's checkpoint, as tbd loads it)
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from tbd.config import load_config

    distiller = build_model(load_config(run / "config.yaml")).eval()
    DetectionCheckpointer(distiller).load(str(run / "model_final.pth"))
    x = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        boxes = distiller([{"image": x}])[0]["instances"].pred_boxes.tensor
    assert len(boxes) > 0, "nothing predicted: the comparison would be empty"
    torch.testing.assert_close(torch.load(distilled / "plain_boxes.pth"), boxes, rtol=0, atol=1e-4)

    # the exported student evaluates (through tbd eval) to the AP the run reported
    assert (
        main(
            [
                "eval",
                "--config",
                str(config),
                "--weights",
                str(weights),
                "-o",
                str(distilled / "ev"),
                *_common(distilled)[:6],
            ]
        )
        == 0
    )
    evaluated = json.loads((distilled / "ev" / "eval_results.json").read_text())["bbox"]["AP"]
    reported = json.loads((run / "summary.json").read_text())["student"]["bbox"]["AP"]
    assert reported is not None, "AP undefined: nothing was detected, so the comparison would be empty"
    assert evaluated == pytest.approx(reported, abs=1e-6)


def test_one_image_per_process_with_batchnorm_is_refused(tmp_path: Path, capsys) -> None:
    args = ["train", "--model", "r18", "--num-gpus", "2", "--output", str(tmp_path / "r"), *_common(tmp_path)]
    assert main(args) == 2
    assert "BatchNorm needs at least 2" in capsys.readouterr().out


def test_distill_runs_in_two_cpu_processes_with_gloo(tmp_path: Path) -> None:
    """`--num-gpus 2` on a CPU machine: detectron2.engine.launch starts 2 GLOO workers."""
    args = [
        "distill", "--teacher", "r50", "--student", "r18", "--head", "tal", "--num-gpus", "2",
        "--teacher-iters", "1", "--iters", "2", "--no-harmony",
        "--teacher-cache", str(tmp_path / "cache"), "--output", str(tmp_path / "run"),
        *_common(tmp_path), "--batch-size", "4",  # 2 images per process: BatchNorm needs >= 2
    ]  # fmt: skip
    # as a user runs it: a fresh interpreter whose __main__ (re-imported by every spawned worker)
    # is tbd's command line
    proc = subprocess.run(
        [sys.executable, "-m", "tbd.cli.main", *args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "model_final.pth").is_file()
    rows = [json.loads(line) for line in (run / "metrics.json").read_text().splitlines()]
    assert any("loss_hd" in r and r.get("iteration") == 1 for r in rows)
    assert "bbox" in json.loads((run / "summary.json").read_text())["student"]


def test_teacher_cache_key_follows_what_shapes_the_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    import tbd.data
    from tbd.cli.distill import teacher_key
    from tbd.config import load_config

    cfg = load_config("retinanet_R50_FPN.yaml")
    key = teacher_key(cfg)
    moved = cfg.clone()
    moved.OUTPUT_DIR, moved.MODEL.DEVICE = "/elsewhere", "cuda"
    assert teacher_key(moved) == key  # where and on what it trains does not matter
    moved.DISTILL.TFD_WEIGHT, moved.DISTILL.FEATURE_NORM = 123.0, "none"
    assert teacher_key(moved) == key  # nor the distillation keys every config carries
    other = cfg.clone()
    other.SOLVER.BASE_LR = 0.002
    assert teacher_key(other) != key
    monkeypatch.setattr(tbd.data, "GENERATOR_VERSION", 999)
    assert teacher_key(cfg) != key  # a regenerated embedded dataset needs a new teacher


def test_a_teacher_cached_by_an_earlier_version_is_found_by_its_settings(tmp_path: Path) -> None:
    import yaml

    from tbd.cli.distill import GENERATOR_MARKER, equivalent_cached_teacher, teacher_key
    from tbd.config import load_config
    from tbd.data import GENERATOR_VERSION

    cfg = load_config("fcos_R50_FPN.yaml")
    cfg.MODEL.RPN.BBOX_REG_WEIGHTS, cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = [1.0, 2.0], [1.0, 2.0]
    # the same values as one list object shared by two keys: dumped as a YAML anchor, same key
    shared = cfg.clone()
    shared.MODEL.RPN.BBOX_REG_WEIGHTS = shared.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS
    assert "&id" in shared.dump() and "&id" not in cfg.dump()
    assert teacher_key(shared) == teacher_key(cfg)

    # an earlier tbd wrote its full config, without the keys added since (here MODEL.AUX_HEADS,
    # MODEL.CODETR), into a folder named by its own key
    old = yaml.safe_load(cfg.dump())
    del old["MODEL"]["AUX_HEADS"], old["MODEL"]["CODETR"]
    earlier = tmp_path / "r50_tbd_shapes_train2000_1500it_0123abcd"
    earlier.mkdir()
    (earlier / "config.yaml").write_text(yaml.safe_dump(old))
    (earlier / "model_final.pth").write_bytes(b"weights")
    (earlier / "log.txt").write_text(f"loading tbd_shapes/v{GENERATOR_VERSION}-128px-seed0/train.json\n")
    now = tmp_path / f"r50_tbd_shapes_train2000_1500it_{teacher_key(cfg)}"
    assert equivalent_cached_teacher(now, cfg) == earlier / "model_final.pth"
    new_key = cfg.clone()
    new_key.MODEL.CODETR.NUM_CLASSES = 3  # a key that folder does not have: ignored
    assert equivalent_cached_teacher(now, new_key) == earlier / "model_final.pth"

    changed = cfg.clone()
    changed.SOLVER.BASE_LR = 0.5  # a setting it has, with another value: not that teacher
    assert equivalent_cached_teacher(now, changed) is None
    other_schedule = tmp_path / f"r50_tbd_shapes_train2000_3000it_{teacher_key(cfg)}"
    assert equivalent_cached_teacher(other_schedule, cfg) is None  # only same name, data, iterations
    (earlier / GENERATOR_MARKER).write_text(f"{GENERATOR_VERSION + 1}\n")
    assert equivalent_cached_teacher(now, cfg) is None  # trained on another embedded dataset
    (earlier / GENERATOR_MARKER).unlink()
    (earlier / "log.txt").unlink()
    assert equivalent_cached_teacher(now, cfg) is None  # unknown data version: not provably the same


def test_teacher_label_of_a_run_config_is_the_run_folder() -> None:
    import argparse

    from tbd.cli.distill import teacher_label

    def label(config: str | None) -> str:
        return teacher_label(argparse.Namespace(teacher_config=config, teacher="r101"))

    assert label("runs/teacher_384/config.yaml") == "teacher_384"
    assert label("configs/retinanet_R18_FPN.yaml") == "retinanet_R18_FPN"
    assert label(None) == "r101"


@pytest.mark.parametrize(("columns", "width"), [(None, 120), ("90", 90)])
def test_redirected_output_is_not_folded_at_80_columns(columns: str | None, width: int) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    code = "from tbd.cli.common import console; print(console.width)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == width


def test_pruning_a_cached_teacher_deletes_only_its_periodic_checkpoints(tmp_path: Path) -> None:
    from tbd.teachers import prune_periodic_checkpoints

    for name in ("model_0000499.pth", "model_0000999.pth", "model_final.pth", "model_best.pth", "notes.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "last_checkpoint").write_text("model_0000999.pth")
    assert prune_periodic_checkpoints(tmp_path) == []  # unfinished: the pointer names a periodic one
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    gone = prune_periodic_checkpoints(tmp_path)
    assert [p.name for p in gone] == ["model_0000499.pth", "model_0000999.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last_checkpoint", "model_best.pth", "model_final.pth", "notes.txt"
    ]  # fmt: skip
    (tmp_path / "model_final.pth").unlink()
    (tmp_path / "model_0001499.pth").write_text("x")
    assert prune_periodic_checkpoints(tmp_path) == []  # no final checkpoint: nothing is deleted
