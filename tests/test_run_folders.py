"""Run folders a user can trust, through the real CLI on tiny data: ``--overwrite`` removes only tbd's
files, every check runs before the folder is touched, ``--resume`` continues the stored run (and
refuses another), and every JSON file a run writes is strict JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_random_teacher, write_tiny_coco

from tbd.cli.main import main
from tbd.engine.run_folder import (
    RUN_RECORD,
    UnsafeDeletionError,
    clear_run,
    protected_places,
    remove_owned,
    run_files,
)

pytestmark = pytest.mark.usefixtures("isolated_cli")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two tiny user datasets (2 classes; a third with 3 classes) and a 2-class teacher checkpoint."""
    root = tmp_path_factory.mktemp("run_folder_data")
    train_json, train_images = write_tiny_coco(root / "train", num_images=6, seed=1)
    other_json, other_images = write_tiny_coco(root / "other", num_images=6, seed=5)
    val_json, val_images = write_tiny_coco(root / "val", num_images=3, seed=2)
    three = json.loads(train_json.read_text())
    three["categories"].append({"id": 3, "name": "third"})
    three["annotations"][0]["category_id"] = 3
    three_json = root / "train" / "three_classes.json"
    three_json.write_text(json.dumps(three))
    teacher = save_random_teacher(root)
    return {
        "train": ["--train-json", str(train_json), "--train-images", str(train_images)],
        "other": ["--train-json", str(other_json), "--train-images", str(other_images)],
        "three": ["--train-json", str(three_json), "--train-images", str(train_images)],
        "val": ["--val-json", str(val_json), "--val-images", str(val_images)],
        "teacher": teacher,
    }


_SMALL = ["--batch-size", "2", "--device", "cpu", "--profile", "embedded"]
_AT_64PX = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64"]
_AT_64PX += ["INPUT.MAX_SIZE_TEST", "64"]
#: a learning rate that does not depend on the run's length (no steps, one warm-up iteration)
_FLAT_LR = ["SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1"]


def _cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def _train(capsys, data, out: Path, *flags: str, opts: tuple[str, ...] = ()) -> tuple[int, str]:
    argv = ["train", "--head", "retinanet", "--iters", "2", "-o", str(out), *flags]
    return _cli(capsys, [*argv, *data["train"], *_SMALL, *_AT_64PX, *opts])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ the deletion function
def test_remove_owned_refuses_anything_outside_its_folder(tmp_path: Path) -> None:
    inside = tmp_path / "run"
    inside.mkdir()
    (inside / "a.txt").write_text("x")
    outside = tmp_path / "thesis.txt"
    outside.write_text("mine")
    for bad in (outside, inside, inside / ".." / "thesis.txt"):
        with pytest.raises(UnsafeDeletionError):
            remove_owned([bad], inside)
    assert outside.read_text() == "mine" and (inside / "a.txt").exists()
    sub = inside / "sub"
    sub.mkdir()
    with pytest.raises(UnsafeDeletionError, match="not recursive"):
        remove_owned([sub], inside)
    assert remove_owned([inside / "a.txt"], inside) == [inside / "a.txt"]
    assert Path.home().resolve() in protected_places() and Path("/") in protected_places()


def test_clear_run_keeps_what_tbd_did_not_write(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "inference").mkdir(parents=True)
    (run / "sub").mkdir()
    for name in ("model_final.pth", "last_checkpoint", "metrics.json", "config.yaml", RUN_RECORD):
        (run / name).write_text("tbd")
    (run / "inference" / "coco_instances_results.json").write_text("[]")
    (run / "inference" / "notes.md").write_text("mine, in tbd's folder")
    (run / "thesis.txt").write_text("mine")
    (run / "sub" / "config.yaml").write_text("mine, one level down")
    removed, kept = clear_run(run)
    assert {p.name for p in removed} == {
        "model_final.pth", "last_checkpoint", "metrics.json", "config.yaml", RUN_RECORD,
        "coco_instances_results.json",
    }  # fmt: skip
    assert sorted(str(p.relative_to(run)) for p in kept) == ["inference/notes.md", "sub", "thesis.txt"]
    assert (run / "sub" / "config.yaml").read_text() == "mine, one level down"
    assert run_files(run) == []


# ------------------------------------------------------------------------------ --overwrite
def test_overwrite_keeps_the_users_files(capsys, tmp_path, data) -> None:
    out = tmp_path / "run"
    assert _train(capsys, data, out)[0] == 0
    (out / "thesis.txt").write_text("three years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("a,b\n1,2\n")
    old_final = (out / "model_final.pth").read_bytes()
    code, msg = _train(capsys, data, out, "--overwrite", "--seed", "3")
    assert code == 0, msg
    assert (out / "thesis.txt").read_text() == "three years of work"
    assert (out / "sub" / "data.csv").read_text() == "a,b\n1,2\n"
    assert "kept 2 file(s) that tbd did not write: sub, thesis.txt" in msg
    assert (out / "model_final.pth").read_bytes() != old_final  # a new run, seed 3
    assert json.loads((out / RUN_RECORD).read_text())["args"]["seed"] == 3


@pytest.mark.parametrize(
    "bad", [["--head", "nosuchhead"], ["--weights", "missing.pth"], ["--train-json", "missing.json"]]
)
def test_overwrite_with_a_bad_flag_leaves_the_old_run_intact(capsys, tmp_path, data, bad) -> None:
    out = tmp_path / "run"
    assert _train(capsys, data, out)[0] == 0
    before = _snapshot(out)
    argv = ["train", "--head", "retinanet", "--iters", "2", "-o", str(out), "--overwrite"]
    code, msg = _cli(capsys, [*argv, *data["train"], *_SMALL, *bad, *_AT_64PX])
    assert code == 2 and "error:" in msg
    assert _snapshot(out) == before


def test_distill_overwrite_with_a_typo_leaves_the_old_run_intact(capsys, tmp_path, data) -> None:
    out = tmp_path / "distill"
    teacher = ["--teacher-config", "retinanet_R18_FPN", "--teacher-weights", str(data["teacher"])]
    base = ["distill", *teacher, "--head", "retinanet", "--iters", "1", "--no-harmony", "-o", str(out)]
    code, msg = _cli(capsys, [*base, *data["train"], *data["val"], *_SMALL, *_AT_64PX])
    assert code == 0, msg
    before = _snapshot(out)
    code, msg = _cli(
        capsys, [*base, "--overwrite", "--student", "r19", *data["train"], *data["val"], *_SMALL, *_AT_64PX]
    )
    assert code == 2 and "r19" in msg
    assert _snapshot(out) == before
    # --resume of the distillation with another student head: refused, its record untouched
    code, msg = _cli(capsys, ["distill", *teacher, "--head", "fcos", "--resume", "-o", str(out)])
    assert code == 2, msg
    assert "DISTILL.STUDENT_META_ARCHITECTURE: stored 'RetinaNet', now 'FCOSDetector'" in msg, msg
    assert _snapshot(out) == before


# ------------------------------------------------------------------------------ --output where it must not be
@pytest.mark.parametrize("where", [".", "..", "~"])
def test_output_at_the_current_directory_or_above_is_refused(
    capsys, tmp_path, data, monkeypatch, where
) -> None:
    project = tmp_path / "home" / "project"
    (project / "src").mkdir(parents=True)
    (project / "train_net.py").write_text("print('mine')\n")
    (project / "src" / "model.py").write_text("x = 1\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(project)
    before = _snapshot(tmp_path / "home")
    for flags in ([], ["--overwrite"]):
        code, msg = _train(capsys, data, Path(where), *flags)
        assert code == 2, msg
        assert "a run needs a folder of its own" in msg
        assert _snapshot(tmp_path / "home") == before
        assert sorted(p.name for p in project.iterdir()) == ["src", "train_net.py"]


def test_a_fresh_run_refuses_to_overwrite_a_users_file(capsys, tmp_path, data) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my own config\n")
    (out / "notes.txt").write_text("notes\n")
    code, msg = _train(capsys, data, out)
    assert code == 2 and "not a tbd run but holds config.yaml" in msg
    assert (out / "config.yaml").read_text() == "my own config\n"
    # a folder with only other files is fine: the run writes beside them
    (out / "config.yaml").unlink()
    assert _train(capsys, data, out)[0] == 0
    assert (out / "notes.txt").read_text() == "notes\n"


# ------------------------------------------------------------------------------ --resume
def test_resume_without_schedule_flags_continues_the_stored_schedule(capsys, tmp_path, data) -> None:
    out = tmp_path / "run"
    code, msg = _train(capsys, data, out, "--iters", "3", opts=("SOLVER.CHECKPOINT_PERIOD", "2"))
    assert code == 0, msg
    # the run as if it had stopped at its checkpoint of iteration 2
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000001.pth")
    code, msg = _cli(capsys, ["train", "--resume", "-o", str(out)])  # nothing else given
    assert code == 0, msg
    cfg_text = (out / "config.yaml").read_text()
    assert "MAX_ITER: 3" in cfg_text and "IMS_PER_BATCH: 2" in cfg_text
    losses = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [row["iteration"] for row in losses if "total_loss" in row][-1] == 2  # 0-based: the third
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 2


@pytest.mark.parametrize(
    "change, key",
    [
        (["--head", "fcos"], "MODEL.META_ARCHITECTURE"),
        (["THREE"], "MODEL.RETINANET.NUM_CLASSES"),
        (["OTHER"], "data: train_json"),
        (["--batch-size", "4"], "SOLVER.IMS_PER_BATCH"),
    ],
)
def test_resume_of_another_run_is_refused_and_changes_nothing(capsys, tmp_path, data, change, key) -> None:
    out = tmp_path / "run"
    assert _train(capsys, data, out)[0] == 0
    before = _snapshot(out)
    flags = data["three"] if change == ["THREE"] else data["other"] if change == ["OTHER"] else change
    code, msg = _cli(capsys, ["train", "--resume", "-o", str(out), *flags])
    assert code == 2, msg
    assert key in msg and "stored" in msg and "--overwrite" in msg
    assert _snapshot(out) == before  # config.yaml, the record, the checkpoints: byte-identical


def test_resume_extending_iters_is_bit_exact(capsys, tmp_path, data) -> None:
    short, straight = tmp_path / "short", tmp_path / "straight"
    assert _train(capsys, data, short, "--iters", "2", opts=tuple(_FLAT_LR))[0] == 0
    code, msg = _cli(capsys, ["train", "--resume", "--iters", "4", "-o", str(short)])
    assert code == 0, msg
    assert _train(capsys, data, straight, "--iters", "4", opts=tuple(_FLAT_LR))[0] == 0
    a = torch.load(short / "model_final.pth", map_location="cpu", weights_only=False)
    b = torch.load(straight / "model_final.pth", map_location="cpu", weights_only=False)
    assert a["iteration"] == b["iteration"] == 3
    assert "another machine" not in msg  # resumed where it started: no warning
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert "MAX_ITER: 4" in (short / "config.yaml").read_text()
    # an override given on resume adds to the stored ones (which stay: 64 px, the flat schedule)
    code, msg = _cli(capsys, ["train", "--resume", "-o", str(short), "DATALOADER.NUM_WORKERS", "0"])
    assert code == 0, msg
    assert json.loads((short / RUN_RECORD).read_text())["args"]["iters"] == 4


def test_resume_on_another_machine_warns_and_records_the_new_one(capsys, tmp_path, data) -> None:
    out = tmp_path / "run"
    assert _train(capsys, data, out, opts=tuple(_FLAT_LR))[0] == 0
    record = json.loads((out / RUN_RECORD).read_text())
    here = record["environment"]
    assert here["cpu"] and here["torch"] == torch.__version__ and here["threads"] == torch.get_num_threads()
    record["environment"] = {**here, "cpu": "Elsewhere CPU (cpu family 1)", "python": "2.7"}
    (out / RUN_RECORD).write_text(json.dumps(record))
    code, msg = _cli(capsys, ["train", "--resume", "--iters", "3", "-o", str(out)])
    assert code == 0, msg
    assert "another machine" in msg and "Elsewhere CPU (cpu family 1) then" in msg
    assert "2.7" not in msg  # the Python version does not change the numbers
    assert json.loads((out / RUN_RECORD).read_text())["environment"] == here  # the record now: here


# ------------------------------------------------------------------------------ strict JSON
def _strict(text: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_a_run_writes_is_strict(capsys, tmp_path, data) -> None:
    out = tmp_path / "run"
    # a model without a single prediction above its threshold: COCO's AP is undefined
    code, msg = _train(capsys, data, out, opts=("MODEL.RETINANET.SCORE_THRESH_TEST", "0.999"))
    assert code == 0, msg
    files = [p for p in out.rglob("*.json")]
    assert {p.name for p in files} >= {"results.json", "metrics.json", "data.json", RUN_RECORD}
    for path in files:
        text = path.read_text()
        lines = text.splitlines() if path.name == "metrics.json" else [text]
        for line in lines:
            _strict(line)
    results = _strict((out / "results.json").read_text())
    assert results["bbox"]["AP"] is None
    assert "no predictions" in results["notes"]["bbox"]
    assert any(
        "bbox/AP" in row and row["bbox/AP"] is None
        for row in map(_strict, (out / "metrics.json").read_text().splitlines())
    )
    assert re.search(r"AP50 .* AP75 .*(│ - ){6}│", msg), msg
    assert "-: undefined: the model made no predictions" in msg


def test_strict_json_module() -> None:
    from tbd import jsonio

    text = jsonio.dumps({"a": float("nan"), "b": [1.0, float("inf")], "c": torch.tensor(2.5)})
    assert _strict(text) == {"a": None, "b": [1.0, None], "c": 2.5}
    assert jsonio.fmt_metric(float("nan")) == "-" and jsonio.fmt_metric(None) == "-"
    assert jsonio.fmt_metric(12.345) == "12.3"


def test_given_flags_are_told_from_defaults(tmp_path: Path) -> None:
    """What the user typed (--resume keeps the stored values of everything else)."""
    from tbd.cli.main import build_parser
    from tbd.cli.runrecord import given_dests

    given = given_dests(build_parser(), ["train", "--iters", "5", "-o", str(tmp_path), "SOLVER.BASE_LR", "1"])
    assert given == {"iters", "output", "opts"}
    assert given_dests(build_parser(), ["distill", "--resume"]) == {"resume"}
