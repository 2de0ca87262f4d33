"""The embedded tbd_shapes dataset: rendering, cache, registration, evaluation."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from pycocotools.coco import COCO

import tbd.data.shapes as shapes_mod
from tbd.data import (
    SHAPE_CLASSES,
    TRAIN_NAME,
    VAL_NAME,
    coco_stats,
    ensure_shapes,
    ensure_split,
    num_classes,
    register_shapes,
    resolve_datasets,
    shapes_options_from_cfg,
    shapes_root,
    split_dir,
    split_files,
)
from tbd.data.shapes_render import RenderParams, _Layer, _rasterise, _visibility, render_image


@pytest.fixture
def restore_shapes_registration():
    """Put tbd_shapes_* back as they were, so other tests see the registration they made."""
    saved = {}
    for name in (TRAIN_NAME, VAL_NAME):
        if name in DatasetCatalog.list():
            saved[name] = (DatasetCatalog[name], MetadataCatalog.get(name).as_dict())
    yield
    for name in (TRAIN_NAME, VAL_NAME):
        DatasetCatalog.pop(name, None)
        MetadataCatalog.pop(name, None)
        if name in saved:
            func, meta = saved[name]
            DatasetCatalog.register(name, func)
            meta.pop("name", None)
            MetadataCatalog.get(name).set(**meta)


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------ rendering
def test_render_is_a_function_of_the_seed() -> None:
    a_img, a_obj = render_image(np.random.default_rng([0, 1, 5]))
    b_img, b_obj = render_image(np.random.default_rng([0, 1, 5]))
    c_img, _ = render_image(np.random.default_rng([0, 1, 6]))
    assert a_img.shape == (128, 128, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_obj == b_obj
    assert not np.array_equal(a_img, c_img)


def test_rasterised_square_has_exact_area_and_position() -> None:
    square = np.array([[10.0, 20.0], [30.0, 20.0], [30.0, 30.0], [10.0, 30.0]])
    layer = _Layer([square], [], 1, np.array([10.0, 20.0, 30.0, 30.0]))
    _rasterise(layer, 4)
    assert (layer.x0, layer.y0) == (10, 20)
    assert layer.alpha.shape == (10, 20)
    assert layer.alpha.sum() == pytest.approx(200.0, rel=0.02)


def test_visibility_counts_occluders_above_and_the_border() -> None:
    def square(x: float, y: float, s: float) -> _Layer:
        pts = np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]])
        layer = _Layer([pts], [], 1, np.array([x, y, x + s, y + s]))
        _rasterise(layer, 4)
        return layer

    bottom, top = square(10, 10, 20), square(20, 10, 20)  # top hides the right half of bottom
    vis = _visibility([bottom, top], 64)
    assert vis[0] == pytest.approx(0.5, abs=0.02) and vis[1] == pytest.approx(1.0, abs=1e-6)
    vis = _visibility([top, bottom], 64)  # order swapped: now bottom is on top
    assert vis[0] == pytest.approx(0.5, abs=0.02) and vis[1] == pytest.approx(1.0, abs=1e-6)
    cut = square(54, 0, 20)  # 10 of 20 px wide inside a 64 px image
    assert _visibility([cut], 64)[0] == pytest.approx(0.5, abs=0.02)


def test_objects_respect_the_occlusion_limit_and_the_image() -> None:
    params = RenderParams()
    for i in range(30):
        _, objects = render_image(np.random.default_rng([3, 1, i]), params)
        assert len(objects) <= 10
        for obj in objects:
            x, y, w, h = obj["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 128.0 + 1e-6 and y + h <= 128.0 + 1e-6
            assert w > 2 and h > 2
            assert 1 <= obj["category_id"] <= len(SHAPE_CLASSES)
            assert obj["visible"] >= 1 - params.max_occlusion - 1e-3


# ------------------------------------------------------------------------------------ cache
def test_shapes_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TBD_DATA_DIR", raising=False)
    assert shapes_root() == Path.home() / ".cache" / "tbd"
    monkeypatch.setenv("TBD_DATA_DIR", str(tmp_path / "env"))
    assert shapes_root() == tmp_path / "env"
    assert shapes_root(tmp_path / "arg") == tmp_path / "arg"


def test_generation_is_byte_identical_and_reused(tmp_path: Path) -> None:
    a = ensure_split("train", 8, root=tmp_path / "a", workers=1)
    b = ensure_split("train", 8, root=tmp_path / "b", workers=2)  # a process pool gives the same
    assert a.name == "train-8" and a.parent.name.startswith("v")
    fa, fb = _files(a), _files(b)
    assert len([k for k in fa if k.startswith("images/")]) == 8
    assert fa == fb
    stamp_mtime = (a / "stamp.json").stat().st_mtime_ns
    assert ensure_split("train", 8, root=tmp_path / "a") == a
    assert (a / "stamp.json").stat().st_mtime_ns == stamp_mtime  # reused, not regenerated
    # train and val draw different images; a longer split starts with the same images
    val = ensure_split("val", 8, root=tmp_path / "a", workers=1)
    assert (val / "images/000000.png").read_bytes() != fa["images/000000.png"]
    longer = ensure_split("train", 9, root=tmp_path / "a", workers=1)
    assert (longer / "images/000007.png").read_bytes() == fa["images/000007.png"]
    assert not [p for p in a.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("damage", ["stamp", "image"])
def test_stale_or_incomplete_cache_is_regenerated(tmp_path: Path, damage: str) -> None:
    d = ensure_split("val", 4, root=tmp_path, workers=1)
    before = _files(d)
    if damage == "stamp":
        stamp = json.loads((d / "stamp.json").read_text())
        stamp["version"] = -1
        (d / "stamp.json").write_text(json.dumps(stamp))
    else:
        (d / "images" / "000002.png").unlink()
    assert ensure_split("val", 4, root=tmp_path, workers=1) == d
    assert _files(d) == before
    assert [p.name for p in d.parent.iterdir() if not p.name.endswith(".lock")] == ["val-4"]


def _race(root: str, barrier, queue) -> None:  # runs in a forked child
    barrier.wait()
    queue.put(str(ensure_split("train", 6, root=root, workers=1)))


@pytest.mark.parametrize("locked", [True, False])
def test_racing_processes_leave_one_complete_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, locked: bool
) -> None:
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs fork")
    if not locked:  # without the lock both generate: the atomic rename must settle it
        monkeypatch.setattr(shapes_mod, "_file_lock", lambda path: nullcontext())
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = {queue.get(timeout=5) for _ in procs}
    assert len(results) == 1
    d = Path(results.pop())
    assert _files(d) == _files(ensure_split("train", 6, root=tmp_path / "ref", workers=1))
    assert sorted(p.name for p in d.parent.iterdir() if not p.name.endswith(".lock")) == ["train-6"]


def test_json_is_valid_coco_with_diverse_content(tmp_path: Path) -> None:
    d = ensure_split("train", 48, root=tmp_path, workers=1)
    json_file, images = split_files(d)
    coco = COCO(str(json_file))
    assert sorted(coco.getCatIds()) == list(range(1, 9))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CLASSES)
    assert len(coco.getImgIds()) == 48
    anns = coco.loadAnns(coco.getAnnIds())
    assert len({a["id"] for a in anns}) == len(anns)
    for a in anns:
        img = coco.imgs[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"]
        assert a["area"] == pytest.approx(w * h, abs=0.02)
        assert (images / img["file_name"]).is_file()
    stats = coco_stats(json_file)
    assert set(stats.classes) == set(SHAPE_CLASSES)  # every class appears
    assert (
        stats.sizes["small"] >= 0.2 * stats.num_objects and stats.sizes["medium"] >= 0.2 * stats.num_objects
    )
    assert stats.under_12px <= 0.1 * stats.num_objects
    assert 0.1 * stats.num_objects <= stats.occluded <= 0.7 * stats.num_objects
    assert min(stats.objects_per_image) <= 2 and max(stats.objects_per_image) >= 7
    assert 3.0 <= stats.num_objects / stats.num_images <= 7.0


# ------------------------------------------------------------------------------------ registry
@pytest.mark.usefixtures("restore_shapes_registration")
def test_register_is_lazy_idempotent_and_loads_detectron2_dicts(tmp_path: Path) -> None:
    names = register_shapes(root=tmp_path, num_train=6, num_val=3)
    assert names == (TRAIN_NAME, VAL_NAME)
    assert not (tmp_path / "tbd_shapes").exists()  # nothing generated yet
    assert num_classes(TRAIN_NAME) == 8
    meta = MetadataCatalog.get(VAL_NAME)
    assert meta.evaluator_type == "coco" and meta.thing_classes == list(SHAPE_CLASSES)
    func = DatasetCatalog[TRAIN_NAME]
    assert register_shapes(root=tmp_path, num_train=6, num_val=3) == names
    assert DatasetCatalog[TRAIN_NAME] is func  # same parameters: untouched

    dicts = DatasetCatalog.get(TRAIN_NAME)
    assert len(dicts) == 6
    assert Path(MetadataCatalog.get(TRAIN_NAME).json_file).is_file()
    for d in dicts:
        assert Path(d["file_name"]).is_file() and d["height"] == d["width"] == 128
        for a in d["annotations"]:
            assert a["bbox_mode"] == BoxMode.XYWH_ABS and 0 <= a["category_id"] < 8

    register_shapes(root=tmp_path, num_train=5, num_val=3)  # other parameters: replaced
    assert MetadataCatalog.get(TRAIN_NAME).json_file.endswith(os.path.join("train-5", "annotations.json"))
    assert len(DatasetCatalog.get(TRAIN_NAME)) == 5
    assert resolve_datasets(None, shapes_options={"root": tmp_path, "num_train": 5, "num_val": 3}) == names


@pytest.mark.usefixtures("restore_shapes_registration")
def test_coco_evaluator_scores_ground_truth_as_perfect(tmp_path: Path) -> None:
    from detectron2.evaluation import COCOEvaluator

    register_shapes(root=tmp_path, num_train=2, num_val=4)
    dicts = DatasetCatalog.get(VAL_NAME)
    evaluator = COCOEvaluator(VAL_NAME, output_dir=str(tmp_path / "eval"))
    evaluator.reset()
    for d in dicts:
        inst = Instances((d["height"], d["width"]))
        xywh = torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
        inst.scores = torch.ones(len(xywh))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]], dtype=torch.int64)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0, abs=0.5)


def test_ensure_shapes_builds_both_splits(tmp_path: Path) -> None:
    root = ensure_shapes(root=tmp_path, num_train=3, num_val=2, workers=1)
    assert split_dir("train", 3, tmp_path).parent == root
    assert (root / "train-3" / "stamp.json").is_file() and (root / "val-2" / "stamp.json").is_file()
    with pytest.raises(ValueError, match="split"):
        ensure_split("test", 3, root=tmp_path)
    with pytest.raises(ValueError, match=">= 1"):
        ensure_split("train", 0, root=tmp_path)


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    code = (
        "import os, tbd.data\n"
        "from detectron2.data import DatasetCatalog\n"
        "assert 'tbd_shapes_train' not in DatasetCatalog.list()\n"
        "assert not os.listdir(os.environ['TBD_DATA_DIR'])\n"
    )
    env = dict(os.environ, TBD_DATA_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_shapes_options_follow_the_config(tmp_path: Path) -> None:
    from tbd.config import get_cfg

    cfg = get_cfg()
    assert shapes_options_from_cfg(cfg) == {
        "root": None,
        "num_train": 2000,
        "num_val": 200,
        "image_size": 128,
    }
    cfg.TBD.DATA_DIR, cfg.TBD.NUM_TRAIN_IMAGES = str(tmp_path), 10
    assert shapes_options_from_cfg(cfg)["root"] == str(tmp_path)
    assert shapes_options_from_cfg(cfg)["num_train"] == 10
