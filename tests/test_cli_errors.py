"""Bad input on the command line: one clear ``error: ...`` (exit code 2) before any training.

Every case goes through ``tbd.cli.main.main`` as a user would, and checks the printed message for
the problem *and* the way out (``docs/ERRORS.md`` lists every case and its message).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from tbd.cli.common import prepare_output_dir
from tbd.cli.main import main

EMBEDDED_CLASSES = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedded-dataset cache (8 train / 4 val images) shared by the module."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    # --data-dir sets $TBD_DATA_DIR for the process: monkeypatch puts it back after each test;
    # a wide console keeps rich from wrapping the messages we look for
    monkeypatch.setenv("TBD_DATA_DIR", str(data_dir))
    monkeypatch.setenv("COLUMNS", "1000")


def _save_retinanet(path: Path, num_classes: int) -> Path:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from tbd.config import load_config

    cfg = load_config(
        "retinanet_R18_FPN", ["MODEL.RETINANET.NUM_CLASSES", str(num_classes), "MODEL.DEVICE", "cpu"]
    )
    DetectionCheckpointer(build_model(cfg), save_dir=str(path.parent)).save(path.stem)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """R-18 RetinaNet checkpoints: one that fits the embedded dataset (8 classes), one with 3 classes."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    return {
        "fits": _save_retinanet(root / "r18_8cls.pth", EMBEDDED_CLASSES),
        "3cls": _save_retinanet(root / "r18_3cls.pth", 3),
    }


def _data_args(data_dir: Path) -> list[str]:
    return [
        "--data-dir", str(data_dir),
        "--num-train-images", "8",
        "--num-val-images", "4",
        "--batch-size", "2",
        "--device", "cpu",
    ]  # fmt: skip


def _cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    """Run ``tbd argv``; returns the exit code and stdout+stderr with whitespace normalised."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def _tracebacks(msg: str) -> int:
    """Tracebacks in the output, not counting logging's own ``--- Logging error ---`` reports (a
    Detectron2 log handler set up by an earlier test may still write to that test's closed capture)."""
    return re.sub(r"--- Logging error ---.*?Arguments: \([^)]*\)", "", msg).count("Traceback")


def _distill(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    data_dir: Path,
    *flags: str,
    teacher: list[str] | None = None,
    opts: tuple[str, ...] = (),
) -> tuple[int, str]:
    """``tbd distill`` with a user teacher (``teacher``) and KEY VALUE ``opts`` last, as a user writes it."""
    argv = ["distill", *(teacher or []), *flags]
    if "--output" not in flags:
        argv += ["--output", str(tmp_path / "run")]
    return _cli(capsys, [*argv, *_data_args(data_dir), *opts])


def _user_teacher(checkpoints: dict[str, Path], weights: str = "fits", config: str = "retinanet_R18_FPN"):
    return ["--teacher-config", config, "--teacher-weights", str(checkpoints[weights])]


def _assert_nothing_started(out: Path) -> None:
    """No training left a trace, and the same --output can be used again once the input is fixed."""
    if out.exists():
        assert not {"metrics.json", "last_checkpoint"} & {p.name for p in out.iterdir()}
        assert not list(out.glob("*.pth"))
    prepare_output_dir(out, resume=False, overwrite=False)  # not refused as "already holds a run"


# ------------------------------------------------------------------------------ names
def test_unknown_teacher(capsys, tmp_path, data_dir) -> None:
    code, msg = _distill(capsys, tmp_path, data_dir, "--teacher", "r102")
    assert code == 2
    assert "error: unknown teacher 'r102'" in msg
    assert "known: " in msg and " r101" in msg and "see `tbd teachers`" in msg
    _assert_nothing_started(tmp_path / "run")


def test_unknown_student(capsys, tmp_path, data_dir, checkpoints) -> None:
    code, msg = _distill(capsys, tmp_path, data_dir, "--student", "r19", teacher=_user_teacher(checkpoints))
    assert code == 2
    assert "unknown student 'r19'; known: r18, r34, r50" in msg
    _assert_nothing_started(tmp_path / "run")


def test_unknown_head(capsys, tmp_path, data_dir, checkpoints) -> None:
    code, msg = _distill(capsys, tmp_path, data_dir, "--head", "yolo", teacher=_user_teacher(checkpoints))
    assert code == 2
    assert "unknown head 'yolo'; choose one of: tal, et, dw, retinanet, fcos" in msg
    _assert_nothing_started(tmp_path / "run")


def test_train_unknown_model(capsys, tmp_path, data_dir) -> None:
    code, msg = _cli(capsys, ["train", "--model", "r19", "-o", str(tmp_path / "run"), *_data_args(data_dir)])
    assert code == 2
    assert "unknown model 'r19': not a student (r18, r34, r50, r101, mnv2), not a teacher" in msg
    assert "not a config file" in msg


# ------------------------------------------------------------------------------ teacher config / weights
def test_teacher_config_without_weights(capsys, tmp_path, data_dir) -> None:
    code, msg = _distill(capsys, tmp_path, data_dir, "--teacher-config", "retinanet_R50_FPN")
    assert code == 2
    assert "--teacher-config needs --teacher-weights (the checkpoint of that teacher)" in msg


def test_teacher_config_missing(capsys, tmp_path, data_dir, checkpoints) -> None:
    teacher = _user_teacher(checkpoints, config=str(tmp_path / "mine.yaml"))
    code, msg = _distill(capsys, tmp_path, data_dir, teacher=teacher)
    assert code == 2
    assert "mine.yaml' not found" in msg and "pass a path to a Detectron2 YAML config" in msg


@pytest.mark.parametrize("teacher_flag", [["--teacher", "r50"], ["--teacher-config", "retinanet_R50_FPN"]])
def test_teacher_weights_file_missing(capsys, tmp_path, data_dir, teacher_flag) -> None:
    missing = tmp_path / "teacher_final.pth"
    code, msg = _distill(
        capsys, tmp_path, data_dir, teacher=[*teacher_flag, "--teacher-weights", str(missing)]
    )
    assert code == 2
    assert f"--teacher-weights {missing} does not exist" in msg
    _assert_nothing_started(tmp_path / "run")


def test_teacher_weights_for_other_classes(capsys, tmp_path, data_dir, checkpoints) -> None:
    # a teacher trained on another label space (3 classes); the data has 8 and the CLI sets the
    # class count from the data, so "pass the config these weights were trained with" cannot help
    teacher = _user_teacher(checkpoints, "3cls", "retinanet_R18_FPN")
    code, msg = _distill(
        capsys, tmp_path, data_dir, "--student", "r18", "--head", "retinanet", teacher=teacher
    )
    assert code == 2
    assert (
        f"teacher weights {checkpoints['3cls']} were trained for 3 classes, but tbd_shapes_val has 8" in msg
    )
    assert "head.cls_score.weight: (27, 128, 3, 3) vs (72, 128, 3, 3)" in msg
    assert "the teacher must be trained or fine-tuned on these 8 classes" in msg
    assert "or use data whose categories are the 3 the weights were trained on" in msg
    assert "Pass the config these weights were trained with" not in msg
    _assert_nothing_started(tmp_path / "run")


def test_teacher_weights_of_another_depth(capsys, tmp_path, data_dir, checkpoints) -> None:
    teacher = _user_teacher(checkpoints, "fits", "retinanet_R50_FPN")  # R-18 weights, R-50 config
    code, msg = _distill(
        capsys, tmp_path, data_dir, "--student", "r18", "--head", "retinanet", teacher=teacher
    )
    assert code == 2
    assert f"teacher weights {checkpoints['fits']} do not fit its config" in msg
    assert "model tensors are missing" in msg
    assert "Pass the config these weights were trained with (backbone depth and head must match" in msg
    _assert_nothing_started(tmp_path / "run")


_EMPTY = (b"", "is an empty file")
_TEXT = (
    b"https://dl.fbaipublicfiles.com/detectron2/model_final.pkl\n",
    "is a text file (it starts with b'http')",
)
_DAMAGED = (b"\x80\x04garbage", "cannot be read (UnpicklingError: ")


@pytest.mark.parametrize(
    ("command", "content", "expected"),
    [("distill", *_EMPTY), ("distill", *_TEXT), ("distill", *_DAMAGED),
     ("eval", *_EMPTY), ("eval", *_TEXT), ("eval", *_DAMAGED),
     # train --weights: the first bytes are checked before training (the rest is Detectron2's load)
     ("train", *_EMPTY), ("train", *_TEXT)],
)  # fmt: skip
def test_weights_file_that_is_no_checkpoint(
    capsys, tmp_path, data_dir, checkpoints, command, content, expected
) -> None:
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(content)
    if command == "distill":
        teacher = ["--teacher-config", "retinanet_R18_FPN", "--teacher-weights", str(weights)]
        code, msg = _distill(capsys, tmp_path, data_dir, "--head", "retinanet", teacher=teacher)
        what = "teacher"
    elif command == "eval":
        argv = ["eval", "--config", "retinanet_R18_FPN", "--weights", str(weights), *_data_args(data_dir)[:6]]
        code, msg = _cli(capsys, argv)
        what = "model"
    else:
        argv = ["train", "--weights", str(weights), "--iters", "1", "-o", str(tmp_path / "run")]
        code, msg = _cli(capsys, [*argv, *_data_args(data_dir)])
        what = "initial"
    assert code == 2 and f"{what} weights {weights} {expected}" in msg and not _tracebacks(msg)
    assert "expected a PyTorch checkpoint (.pth" in msg and "or a Detectron2 model-zoo pickle (.pkl)" in msg


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        # RetinaNet, 9 anchors: cls_score has 9 x classes outputs (model built for 8, file for 3)
        ([("head.cls_score.weight", (27, 128, 3, 3), (72, 128, 3, 3)), ("head.cls_score.bias", (27,), (72,))], 3),
        # Faster R-CNN: classes + 1 scores and 4 x classes box deltas (model for 8, file for 80)
        ([("roi_heads.box_predictor.cls_score.weight", (81, 1024), (9, 1024)),
          ("roi_heads.box_predictor.bbox_pred.weight", (320, 1024), (32, 1024))], 80),
        # another width in a layer that has nothing to do with classes: not a class-count question
        ([("backbone.fpn_lateral3.weight", (128, 256, 1, 1), (256, 256, 1, 1))], None),
        ([("head.cls_score.weight", (27, 64, 3, 3), (72, 128, 3, 3))], None),
    ],
)  # fmt: skip
def test_class_count_of_weights(shapes, expected) -> None:
    from tbd.engine.checkpoint import class_count_of_weights

    assert class_count_of_weights(shapes, 8) == expected


def test_teacher_input_format_cannot_be_converted(capsys, tmp_path, data_dir, checkpoints) -> None:
    base = Path(__file__).resolve().parent.parent / "configs" / "retinanet_R18_FPN.yaml"
    config = tmp_path / "teacher_gray.yaml"
    config.write_text(f"_BASE_: {base}\nINPUT:\n  FORMAT: L\n")
    teacher = _user_teacher(checkpoints, "fits", str(config))
    code, msg = _distill(
        capsys, tmp_path, data_dir, "--student", "r18", "--head", "retinanet", teacher=teacher
    )
    assert code == 2
    assert "the teacher reads L images and the student's data is BGR" in msg
    _assert_nothing_started(tmp_path / "run")


@pytest.mark.parametrize(
    ("flags", "opts", "expected"),
    [
        (["--student", "r19"], (), "unknown student 'r19'"),
        (["--head", "yolo"], (), "unknown head 'yolo'"),
        ([], ("SOLVER.NOPE", "1"), "Non-existent key: SOLVER.NOPE"),
    ],
    ids=["student", "head", "override"],
)
def test_student_and_overrides_checked_before_a_teacher_is_trained(
    capsys, tmp_path, data_dir, flags, opts, expected
) -> None:
    # tripwire: the teacher cache is a plain file, so an attempt to train the teacher there fails
    # at once instead of running a training that the bad input makes pointless
    cache = tmp_path / "teacher_cache"
    cache.write_bytes(b"")
    code, msg = _distill(
        capsys,
        tmp_path,
        data_dir,
        "--teacher", "r50", "--teacher-iters", "1", "--teacher-cache", str(cache), *flags,
        opts=opts,
    )  # fmt: skip
    assert code == 2 and expected in msg
    assert "training it here" not in msg and cache.read_bytes() == b""


def test_teacher_weights_url_unreachable(capsys, tmp_path, data_dir, monkeypatch) -> None:
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "downloads"))
    url = "http://127.0.0.1:9/model_final.pkl"  # the discard port: refused at once, no network used
    teacher = ["--teacher-config", "retinanet_R18_FPN", "--teacher-weights", url]
    code, msg = _distill(
        capsys, tmp_path, data_dir, "--student", "r18", "--head", "retinanet", teacher=teacher
    )
    assert code == 2
    assert f"could not download the teacher weights {url}" in msg
    assert "fetch that file on another machine and pass it with --teacher-weights" in msg
    _assert_nothing_started(tmp_path / "run")


def test_registry_teacher_without_entry_for_the_dataset(capsys, tmp_path, data_dir) -> None:
    from conftest import write_tiny_coco
    from detectron2.data import DatasetCatalog, MetadataCatalog

    js, images = write_tiny_coco(tmp_path / "mine", num_images=2)
    before = set(DatasetCatalog.list())
    try:
        code, msg = _distill(
            capsys,
            tmp_path,
            data_dir,
            "--teacher",
            "r101",
            "--train-json",
            str(js),
            "--train-images",
            str(images),
        )
    finally:
        for name in set(DatasetCatalog.list()) - before:
            DatasetCatalog.remove(name)
            MetadataCatalog.pop(name, None)
    assert code == 2
    assert "teacher 'r101' has no entry for dataset 'user_instances' (it has: coco_2017, tbd_shapes)" in msg
    assert "pass --teacher-config and --teacher-weights for your own teacher" in msg
    _assert_nothing_started(tmp_path / "run")


def test_broken_teacher_file_is_a_clear_error(capsys, tmp_path, monkeypatch) -> None:
    import tbd.registry

    (tmp_path / "mine.yaml").write_text("name: mine\ndescription: R-50: lighter\n")
    monkeypatch.setattr(tbd.registry, "TEACHER_DIR", tmp_path)
    code, msg = _cli(capsys, ["teachers"])
    assert code == 2 and "mine.yaml: not valid YAML" in msg and "Traceback" not in msg


# ------------------------------------------------------------------------------ datasets
def test_user_json_missing(capsys, tmp_path, data_dir) -> None:
    missing = tmp_path / "instances_train.json"
    code, msg = _distill(
        capsys, tmp_path, data_dir, "--train-json", str(missing), "--train-images", str(tmp_path)
    )
    assert code == 2
    assert f"error: train_json: annotation file {missing} does not exist (check the path)" in msg


def test_user_json_not_coco(capsys, tmp_path, data_dir) -> None:
    bad = tmp_path / "labels.json"
    bad.write_text('{"boxes": [[0, 0, 10, 10]]}')
    code, msg = _distill(
        capsys, tmp_path, data_dir, "--train-json", str(bad), "--train-images", str(tmp_path)
    )
    assert code == 2
    assert (
        f"{bad} is not a COCO instances file: missing key(s) ['images', 'annotations', 'categories']" in msg
    )
    assert "https://cocodataset.org/#format-data" in msg  # the way out: the format, with a link


def test_user_json_without_image_dir(capsys, tmp_path, data_dir) -> None:
    js = tmp_path / "labels.json"
    js.write_text("{}")
    code, msg = _distill(capsys, tmp_path, data_dir, "--train-json", str(js))
    assert code == 2
    assert "train_images is missing: train_json and train_images go together" in msg


def test_unknown_dataset_name(capsys, tmp_path, data_dir) -> None:
    code, msg = _distill(capsys, tmp_path, data_dir, "--dataset", "coco_2071")
    assert code == 2
    assert "unknown dataset 'coco_2071'. Close matches: coco_2017" in msg and "--train-json" in msg


# ------------------------------------------------------------------------------ output directory
def test_resume_without_checkpoint(capsys, tmp_path, data_dir, checkpoints) -> None:
    code, msg = _distill(capsys, tmp_path, data_dir, "--resume", teacher=_user_teacher(checkpoints))
    assert code == 2
    assert f"--resume: {tmp_path / 'run'} has no checkpoint to resume from (no last_checkpoint file)" in msg


@pytest.mark.parametrize(
    ("files", "what"),
    [({"model_final.pth": b"x", "last_checkpoint": b"model_final.pth"}, "a finished run"),
     ({"model_0000009.pth": b"x", "last_checkpoint": b"model_0000009.pth", "metrics.json": b"{}\n"},
      "an unfinished run")],
)  # fmt: skip
def test_output_dir_with_a_previous_run(capsys, tmp_path, data_dir, checkpoints, files, what) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for name, content in files.items():
        (out / name).write_bytes(content)
    code, msg = _distill(capsys, tmp_path, data_dir, teacher=_user_teacher(checkpoints))
    assert code == 2
    assert f"{out} already holds {what}. Pass --resume to continue it, --overwrite to replace it" in msg
    assert {p.name for p in out.iterdir()} == set(files)  # nothing of the old run touched


def test_attempt_that_stopped_before_its_first_checkpoint_does_not_block(capsys, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"iteration": 3}\n')
    (out / "events.out.tfevents.1.host").write_bytes(b"x")
    (out / "log.txt").write_text("the reason it stopped\n")
    (out / "tbd_run.json").write_text("{}\n")  # a tbd run writes its record first
    assert prepare_output_dir(out, resume=False, overwrite=False) == out
    # its metrics/events would mix with the next run's; its log stays
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "tbd_run.json"]
    assert "removed " in capsys.readouterr().out


def _read_only_place(tmp_path: Path) -> Path:
    """A folder that cannot be created: under a read-only folder, or (as root, who may write anywhere
    the permission bits forbid) under /sys, which does not take new folders."""
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    for place in (parent / "run", Path("/sys/tbd_run")):
        try:
            place.mkdir()
        except OSError:
            return place
        place.rmdir()
    pytest.skip("no read-only place to write to on this machine")


@pytest.mark.parametrize("command", ["train", "distill"])
def test_output_on_a_read_only_place(capsys, tmp_path, data_dir, checkpoints, command) -> None:
    out = _read_only_place(tmp_path)
    teacher = _user_teacher(checkpoints) if command == "distill" else []
    code, msg = _cli(capsys, [command, *teacher, "--iters", "1", "-o", str(out), *_data_args(data_dir)])
    assert code == 2 and f"error: cannot write to the output folder {out} (" in msg
    assert "choose a writable --output" in msg and not _tracebacks(msg)


def test_resume_and_overwrite_together(capsys, tmp_path, data_dir, checkpoints) -> None:
    code, msg = _distill(
        capsys, tmp_path, data_dir, "--resume", "--overwrite", teacher=_user_teacher(checkpoints)
    )
    assert code == 2
    assert "--resume and --overwrite contradict each other; pass one" in msg


# ------------------------------------------------------------------------------ KEY VALUE overrides
@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        (("SOLVER.NOPE", "1"), "bad config override: Non-existent key: SOLVER.NOPE"),
        (("SOLVER.BASE_LR", "fast"), "bad config override: Type mismatch"),
        (("SOLVER.BASE_LR",), "config overrides come in KEY VALUE pairs; got ['SOLVER.BASE_LR']"),
    ],
    ids=["unknown-key", "wrong-type", "odd-count"],
)
def test_bad_override(capsys, tmp_path, data_dir, checkpoints, opts, expected) -> None:
    code, msg = _distill(capsys, tmp_path, data_dir, teacher=_user_teacher(checkpoints), opts=opts)
    assert code == 2 and expected in msg
    _assert_nothing_started(tmp_path / "run")


def test_train_bad_override(capsys, tmp_path, data_dir) -> None:
    argv = ["train", "-o", str(tmp_path / "run"), *_data_args(data_dir), "MODEL.RETINANET.NUM_CLASES", "3"]
    code, msg = _cli(capsys, argv)
    assert code == 2 and "Non-existent key: MODEL.RETINANET.NUM_CLASES" in msg


# ------------------------------------------------------------------------------ devices, eval, export
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(capsys, tmp_path, data_dir) -> None:
    argv = ["train", "-o", str(tmp_path / "run"), *_data_args(data_dir)[:-2], "--device", "cuda"]
    code, msg = _cli(capsys, argv)
    assert code == 2 and "--device cuda was asked for but torch sees no CUDA device; use --device cpu" in msg


def test_eval_missing_weights_and_not_a_run(capsys, tmp_path) -> None:
    code, msg = _cli(capsys, ["eval", "--config", "retinanet_R18_FPN", "--weights", str(tmp_path / "w.pth")])
    assert code == 2 and f"weights file {tmp_path / 'w.pth'} does not exist" in msg
    code, msg = _cli(capsys, ["eval", "--run", str(tmp_path)])
    assert code == 2 and f"{tmp_path} is not a tbd run directory (no config.yaml)" in msg
    (tmp_path / "config.yaml").write_text("")
    code, msg = _cli(capsys, ["export", "--run", str(tmp_path)])
    assert code == 2 and "has no checkpoint (no model_final.pth or last_checkpoint)" in msg


def test_eval_weights_that_do_not_fit(capsys, tmp_path, data_dir, checkpoints) -> None:
    weights = str(checkpoints["3cls"])
    argv = ["eval", "--config", "retinanet_R18_FPN", "--weights", weights, "-o", str(tmp_path)]
    argv += [*_data_args(data_dir)[:6], "--device", "cpu"]
    # no detections: should the check ever be lost again, the wrong evaluation stays quick
    code, msg = _cli(capsys, [*argv, "MODEL.RETINANET.SCORE_THRESH_TEST", "1.0"])
    assert (
        code == 2 and f"model weights {weights} were trained for 3 classes, but tbd_shapes_val has 8" in msg
    )
    assert not (tmp_path / "eval_results.json").exists()


def test_train_initial_weights_missing(capsys, tmp_path, data_dir) -> None:
    missing = tmp_path / "init.pth"
    argv = ["train", "--weights", str(missing), "--iters", "1", "-o", str(tmp_path / "run")]
    code, msg = _cli(capsys, [*argv, *_data_args(data_dir)])
    assert code == 2 and str(missing) in msg and "does not exist" in msg


# ------------------------------------------------------------------------------ faults during training
@pytest.mark.slow
def test_diverging_training_stops_with_a_message(capsys, tmp_path, data_dir) -> None:
    argv = ["train", "--model", "r18", "--head", "retinanet", "--iters", "3", "-o", str(tmp_path / "run")]
    # step 0 multiplies the weights by ~1e30, step 1 has a non-finite loss: one is allowed in a row
    opts = ["SOLVER.BASE_LR", "1e30", "SOLVER.WARMUP_ITERS", "0", "TBD.MAX_NONFINITE_STEPS", "1"]
    try:
        code = main([*argv, *_data_args(data_dir), *opts])
    except SystemExit as stop:
        code = stop.code
    msg = " ".join(capsys.readouterr().out.split())
    assert code not in (0, None)
    assert "1 training steps in a row had a non-finite loss" in msg and "Lower SOLVER.BASE_LR" in msg
    assert not list((tmp_path / "run").glob("*.pth"))


def test_unreadable_image_outside_the_decode_sample(capsys, tmp_path, data_dir, monkeypatch) -> None:
    from conftest import write_tiny_coco
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import tbd.data.validate

    monkeypatch.setattr(tbd.data.validate, "DECODE_CHECK_LIMIT", 1)  # validation decodes 0000.png only
    js, images = write_tiny_coco(tmp_path / "mine", num_images=4)
    # JPEG: its size (and EXIF) come from the header alone, so only a full decode finds the damage
    coco = json.loads(js.read_text())
    for k, entry in enumerate(coco["images"]):
        png = images / entry["file_name"]
        entry["file_name"] = png.with_suffix(".jpg").name
        Image.open(png).save(images / entry["file_name"])
        if k > 0:  # every batch of 2 holds a damaged file
            data = (images / entry["file_name"]).read_bytes()
            (images / entry["file_name"]).write_bytes(data[: len(data) // 2])
    js.write_text(json.dumps(coco))
    out = tmp_path / "run"
    argv = ["train", "--head", "retinanet", "--iters", "4", "-o", str(out)]
    argv += ["--train-json", str(js), "--train-images", str(images), "--batch-size", "2", "--device", "cpu"]
    argv += ["--profile", "embedded"]  # the test config as it is, no ImageNet weights to fetch
    before = set(DatasetCatalog.list())
    try:
        code, msg = _cli(capsys, argv)
        assert code == 2
        assert f"error: cannot read image {images}/000" in msg and "(OSError: " in msg
        assert "remove it from the dataset's json" in msg and not _tracebacks(msg)
        # the failed attempt left no checkpoint, so the same --output is accepted again
        assert not list(out.glob("*.pth"))
        prepare_output_dir(out, resume=False, overwrite=False)
    finally:
        for name in set(DatasetCatalog.list()) - before:
            DatasetCatalog.remove(name)
            MetadataCatalog.pop(name, None)
