"""User COCO data and dataset names: validation errors, skip reports, registration, resolution."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO

from tbd.data import DatasetError, dataset_report, num_classes, register_user_coco, resolve_datasets
from tbd.data.validate import SKIP_NEGATIVE, SKIP_NONFINITE, SKIP_OUTSIDE, SKIP_ZERO


@pytest.fixture(autouse=True)
def isolated_catalog(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Cleaned jsons go to tmp; datasets registered by a test are removed after it."""
    monkeypatch.setenv("TBD_DATA_DIR", str(tmp_path / "cache"))
    before = set(DatasetCatalog.list())
    yield
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.pop(name, None)


def make_coco(
    root: Path,
    stem: str = "instances",
    *,
    images: int = 3,
    size: tuple[int, int] = (40, 30),
    categories: list[dict] | None = None,
    annotations: list[dict] | None = None,
) -> tuple[Path, Path]:
    """Images of ``size`` (w, h) named 0.png..; one valid 10x10 box per image unless given."""
    img_dir = root / f"{stem}_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(images):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, dtype=np.uint8)).save(img_dir / f"{i}.png")
        entries.append({"id": i + 1, "file_name": f"{i}.png", "width": size[0], "height": size[1]})
    cats = categories if categories is not None else [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    if annotations is None:
        annotations = [
            {"id": i + 1, "image_id": i + 1, "category_id": cats[i % len(cats)]["id"], "bbox": [2, 3, 10, 10]}
            for i in range(images)
        ]
    data = {"images": entries, "annotations": annotations, "categories": cats}
    path = root / f"{stem}.json"
    path.write_text(json.dumps(data))
    return path, img_dir


def rewrite(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------ happy path
def test_user_json_registers_train_and_val(tmp_path: Path) -> None:
    tj, ti = make_coco(tmp_path, "shop_train")
    vj, vi = make_coco(tmp_path, "shop_val", images=2)
    train, test = resolve_datasets(train_json=tj, train_images=ti, val_json=vj, val_images=vi)
    assert (train, test) == ("user_shop_train_train", "user_shop_val_val")
    dicts = DatasetCatalog.get(train)
    assert len(dicts) == 3 and num_classes(train) == 2
    ann = dicts[0]["annotations"][0]
    assert ann["bbox"] == [2.0, 3.0, 12.0, 13.0] and ann["bbox_mode"] == BoxMode.XYXY_ABS
    assert Path(dicts[0]["file_name"]).is_file()
    meta = MetadataCatalog.get(test)
    assert meta.evaluator_type == "coco" and meta.json_file == str(vj)  # clean: the original json
    report = dataset_report(test)
    assert report is not None and report.clean and report.kept_annotations == 2


def test_train_only_evaluates_on_train(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tj, ti = make_coco(tmp_path, "solo")
    with caplog.at_level(logging.WARNING, logger="tbd.data.resolve"):
        assert resolve_datasets(None, train_json=tj, train_images=ti) == ("user_solo_train",) * 2
    assert "evaluating on the training set" in caplog.text


def test_non_contiguous_category_ids_map_in_id_order(tmp_path: Path) -> None:
    cats = [{"id": 12, "name": "z"}, {"id": 3, "name": "x"}, {"id": 7, "name": "y"}]
    anns = [
        {"id": k, "image_id": 1, "category_id": c, "bbox": [1, 1, 5, 5]} for k, c in enumerate((12, 3, 7), 1)
    ]
    tj, ti = make_coco(tmp_path, "sparse", images=1, categories=cats, annotations=anns)
    name = register_user_coco(tj, ti, "train")
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["x", "y", "z"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 12: 2}
    assert [a["category_id"] for a in DatasetCatalog.get(name)[0]["annotations"]] == [2, 0, 1]


# ------------------------------------------------------------------------------------ bad annotations
def test_bad_boxes_are_skipped_or_clipped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    boxes = {
        1: [2, 3, 10, 10],  # fine
        2: [5, 5, 0, 8],  # zero area
        3: [5, 5, -4, 8],  # negative width
        4: [50, 5, 10, 10],  # right of a 40 px wide image: outside
        5: [35, 20, 10, 20],  # partly outside: clipped to [35, 20, 40, 30]
        6: [1, 1, float("nan"), 3],  # non-finite
        7: [-5, -5, 5, 5],  # touches the image only at a corner: outside
    }
    anns = [{"id": k, "image_id": 1 if k < 4 else 2, "category_id": 1, "bbox": b} for k, b in boxes.items()]
    anns.append({"id": 8, "image_id": 3, "category_id": 2, "bbox": [0, 0, 0, 0]})  # image 3: nothing usable
    tj, ti = make_coco(tmp_path, "messy", images=4, annotations=anns)  # image 4: no annotation at all
    with caplog.at_level(logging.WARNING, logger="tbd.data.validate"):
        name = register_user_coco(tj, ti, "train")
    report = dataset_report(name)
    assert report is not None and not report.clean
    assert report.skipped_annotations == {SKIP_ZERO: 2, SKIP_NEGATIVE: 1, SKIP_OUTSIDE: 2, SKIP_NONFINITE: 1}
    assert report.examples[SKIP_OUTSIDE] == [4, 7] and report.examples["clipped"] == [5]
    assert report.clipped_annotations == 1 and report.kept_annotations == 2
    assert report.empty_images == 2 and report.kept_images == 2  # train: empty images dropped
    assert "skipped 2 annotation(s): bbox entirely outside" in caplog.text
    dicts = {d["image_id"]: d for d in DatasetCatalog.get(name)}
    assert sorted(dicts) == [1, 2]
    assert dicts[2]["annotations"][0]["bbox"] == [35.0, 20.0, 40.0, 30.0]
    # the metadata json (what COCOEvaluator compares with) is the cleaned copy
    meta = MetadataCatalog.get(name)
    assert meta.json_file != str(tj) and meta.original_json_file == str(tj)
    cleaned = COCO(meta.json_file)
    assert sorted(cleaned.anns) == [1, 5]
    assert cleaned.anns[5]["bbox"] == [35.0, 20.0, 5.0, 10.0] and cleaned.anns[5]["area"] == 50.0


def test_val_keeps_images_without_annotations(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8]}]
    vj, vi = make_coco(tmp_path, "sparse_val", images=3, annotations=anns)
    name = register_user_coco(vj, vi, "val")
    report = dataset_report(name)
    assert report is not None and report.empty_images == 2 and not report.empty_images_dropped
    assert len(DatasetCatalog.get(name)) == 3
    assert "kept for evaluation" in report.summary()


def test_nothing_usable_left_is_an_error(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 0, 8]}]
    tj, ti = make_coco(tmp_path, "empty", images=1, annotations=anns)
    with pytest.raises(DatasetError, match="no usable annotation"):
        register_user_coco(tj, ti, "train")


# ------------------------------------------------------------------------------------ errors
def _error(tmp_path: Path, edit: Any = None, **kwargs: Any) -> str:
    tj, ti = make_coco(tmp_path, "bad", **kwargs)
    if edit is not None:
        edit(tj, ti)
    with pytest.raises(DatasetError) as info:
        resolve_datasets(train_json=tj, train_images=ti)
    assert "user_bad_train" not in DatasetCatalog.list()
    return str(info.value)


def test_missing_json(tmp_path: Path) -> None:
    _, ti = make_coco(tmp_path)
    with pytest.raises(DatasetError, match=r"train_json: annotation file .*nope\.json does not exist"):
        resolve_datasets(train_json=tmp_path / "nope.json", train_images=ti)


def test_missing_image_dir(tmp_path: Path) -> None:
    tj, _ = make_coco(tmp_path)
    with pytest.raises(DatasetError, match=r"train_images: image directory .*nowhere does not exist"):
        resolve_datasets(train_json=tj, train_images=tmp_path / "nowhere")


def test_not_json(tmp_path: Path) -> None:
    msg = _error(tmp_path, lambda j, i: j.write_text('{"images": [,]}'))
    assert "bad.json is not valid JSON" in msg and "line 1" in msg


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d.pop("annotations"), "missing key(s) ['annotations']"),
        (lambda d: d.update(images={}), "'images' must be a list"),
        (lambda d: d["images"][1].update(id="2"), "images[1]['id'] = '2' is not an integer"),
        (lambda d: d["images"][0].pop("width"), "images[0] has no 'width'"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "a list of 4 numbers"),
        (lambda d: d["categories"].append({"id": 1, "name": "again"}), "duplicate category ids [1]"),
        (lambda d: d["annotations"][2].update(image_id=99), "refer to image ids [99]"),
    ],
)
def test_not_coco(tmp_path: Path, edit: Any, expected: str) -> None:
    msg = _error(tmp_path, lambda j, i: rewrite(j, edit))
    assert expected in msg and "bad.json" in msg


def test_unknown_category_ids(tmp_path: Path) -> None:
    msg = _error(tmp_path, lambda j, i: rewrite(j, lambda d: d["annotations"][1].update(category_id=5)))
    assert "1 annotation(s) use category ids [5]" in msg and "known ids: [1, 2]" in msg


def test_images_missing_on_disk(tmp_path: Path) -> None:
    def drop(j: Path, i: Path) -> None:
        (i / "1.png").unlink()
        (i / "3.png").unlink()

    msg = _error(tmp_path, drop, images=5)
    assert "2 of 5 images listed in" in msg and "['1.png', '3.png']" in msg


def test_unreadable_image(tmp_path: Path) -> None:
    msg = _error(tmp_path, lambda j, i: (i / "2.png").write_bytes(b"not a png at all"))
    assert "cannot be read" in msg and "2.png" in msg


def test_image_size_mismatch(tmp_path: Path) -> None:
    msg = _error(tmp_path, lambda j, i: rewrite(j, lambda d: d["images"][0].update(width=41)))
    assert "file 40x30, json 41x30" in msg


def test_argument_combinations(tmp_path: Path) -> None:
    tj, ti = make_coco(tmp_path)
    with pytest.raises(DatasetError, match="train_images is missing"):
        resolve_datasets(train_json=tj)
    with pytest.raises(DatasetError, match="not both"):
        resolve_datasets("coco_2017", train_json=tj, train_images=ti)
    with pytest.raises(DatasetError, match="without train_json"):
        resolve_datasets(val_json=tj, val_images=ti)


def test_train_and_val_with_different_categories(tmp_path: Path) -> None:
    tj, ti = make_coco(tmp_path, "t")
    vj, vi = make_coco(tmp_path, "v", categories=[{"id": 1, "name": "a"}, {"id": 2, "name": "c"}])
    with pytest.raises(DatasetError, match="different categories"):
        resolve_datasets(train_json=tj, train_images=ti, val_json=vj, val_images=vi)


# ------------------------------------------------------------------------------------ names
def test_registered_names_and_prefixes(tmp_path: Path) -> None:
    tj, ti = make_coco(tmp_path)
    for name in ("zz_mine", "zz_pair_train", "zz_pair_val"):
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"], json_file=str(tj), image_root=str(ti))
    assert resolve_datasets("zz_mine") == ("zz_mine", "zz_mine")
    assert resolve_datasets("zz_pair") == ("zz_pair_train", "zz_pair_val")
    assert num_classes("zz_pair_val") == 3


def test_builtin_coco_without_files_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./datasets here
    json_file = MetadataCatalog.get("coco_2017_train").json_file
    if Path(json_file).exists():
        pytest.skip("COCO is installed on this machine")
    with pytest.raises(DatasetError) as info:
        resolve_datasets("coco_2017")
    msg = str(info.value)
    assert json_file in msg and "instances_train2017.json" in msg and "DETECTRON2_DATASETS" in msg


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(DatasetError) as info:
        resolve_datasets("coco_2071_val")
    msg = str(info.value)
    assert "unknown dataset 'coco_2071_val'" in msg and "coco_2017_val" in msg and "--train-json" in msg
    with pytest.raises(DatasetError, match="unknown dataset"):
        num_classes("no_such_dataset_anywhere")


# ------------------------------------------------------------------------------------ crowd, unused classes
def test_crowd_boxes_are_counted_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [12, 2, 8, 8], "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [2, 2, 8, 8], "iscrowd": 1},  # crowd only
        {"id": 4, "image_id": 3, "category_id": 2, "bbox": [2, 2, 8, 8]},
    ]
    tj, ti = make_coco(tmp_path, "crowdy", images=3, annotations=anns)
    with caplog.at_level(logging.WARNING, logger="tbd.data.validate"):
        name = register_user_coco(tj, ti, "train")
    report = dataset_report(name)
    assert report is not None and report.crowd_annotations == 2 and report.examples["crowd"] == [2, 3]
    assert report.kept_annotations == 2  # the two boxes around single objects
    # image 2 holds only a crowd region: no training signal, dropped like an empty image
    assert report.empty_images == 1 and sorted(d["image_id"] for d in DatasetCatalog.get(name)) == [1, 3]
    assert "ignored 2 crowd annotation(s) (iscrowd=1)" in caplog.text


def test_only_crowd_boxes_is_a_clear_error(tmp_path: Path) -> None:
    anns = [{"id": k, "image_id": k, "category_id": 1, "bbox": [2, 2, 8, 8], "iscrowd": 1} for k in (1, 2, 3)]
    tj, ti = make_coco(tmp_path, "crowd", images=3, annotations=anns)
    with pytest.raises(DatasetError) as info:
        resolve_datasets(train_json=tj, train_images=ti)
    msg = str(info.value)
    assert "no usable annotation is left" in msg and "crowd.json" in msg
    assert "Every box left is a crowd region (iscrowd=1, 3 of them)" in msg
    assert "set iscrowd to 0 for boxes around single objects" in msg


def test_classes_without_annotations_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "emu"}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8]},
        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [2, 2, 8, 8], "iscrowd": 1},  # crowd: not a use
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [2, 2, 8, 8]},
    ]
    tj, ti = make_coco(tmp_path, "unused", images=2, categories=cats, annotations=anns)
    with caplog.at_level(logging.WARNING, logger="tbd.data.validate"):
        name = register_user_coco(tj, ti, "train")
    report = dataset_report(name)
    assert report is not None and report.clean  # the json itself needs no cleaning
    assert report.unused_classes == ["dog", "emu"] and num_classes(name) == 3
    assert "2 of 3 classes have no usable annotation: ['dog', 'emu']" in caplog.text


# ------------------------------------------------------------------------------------ image files
def _save_16bit(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")  # what a 16-bit greyscale PNG opens as


def test_16bit_greyscale_is_scaled_to_8_bits_when_read(tmp_path: Path) -> None:
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper, detection_utils

    box = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 1]}]
    tj, ti = make_coco(tmp_path, "deep", images=1, size=(4, 2), annotations=box)
    values = np.array([[0, 257, 32896, 65535], [1000, 128, 129, 65278]])
    _save_16bit(ti / "0.png", values)
    expected = np.array([[0, 1, 128, 255], [4, 0, 1, 254]], dtype=np.uint8)  # round(v / 257)
    bgr = detection_utils.read_image(str(ti / "0.png"), format="BGR")
    assert bgr.dtype == np.uint8 and bgr.shape == (2, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(bgr[..., channel], expected)
    # the way Detectron2's data loaders read it (a DatasetMapper on the registered dataset)
    name = register_user_coco(tj, ti, "val")
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 0, 0  # no resize
    image = DatasetMapper(cfg, is_train=False)(DatasetCatalog.get(name)[0])["image"]
    np.testing.assert_array_equal(image[0].numpy(), expected)


def test_16bit_greyscale_is_reported_by_validation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tj, ti = make_coco(tmp_path, "thermal", images=3)
    _save_16bit(ti / "1.png", np.full((30, 40), 3000))  # 12-bit data stored in 16 bits
    _save_16bit(ti / "2.png", np.full((30, 40), 1200))
    with caplog.at_level(logging.WARNING, logger="tbd.data.validate"):
        name = register_user_coco(tj, ti, "train")
    report = dataset_report(name)
    assert report is not None and report.high_bit_depth_images == 2
    assert report.high_bit_depth_examples == ["1.png", "2.png"] and report.high_bit_depth_max == 3000
    assert "2 of 3 checked images are 16-bit greyscale" in caplog.text
    assert "read scaled to 8 bits (value / 257)" in caplog.text
    assert "the largest value in the decoded ones is 3000 (fewer than 16 bits used" in caplog.text


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_image_read_in_a_loader_worker_names_the_file(tmp_path: Path) -> None:
    import torch.utils.data
    from detectron2.data import detection_utils

    from tbd.data.images import ImageReadError, image_read_message

    _, ti = make_coco(tmp_path, "cut", images=1, size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ti / "0.png")
    _truncate(ti / "0.png")
    file = str(ti / "0.png")
    loader = torch.utils.data.DataLoader(
        [file], batch_size=None, num_workers=1, collate_fn=lambda f: detection_utils.read_image(f, "BGR")
    )
    with pytest.raises(ImageReadError) as info:  # still this class when re-raised from the worker
        next(iter(loader))
    msg = image_read_message(info.value)
    assert msg.startswith(f"cannot read image {file} (OSError: ") and "Traceback" not in msg
    assert "re-export it, or remove it from the dataset's json" in msg
