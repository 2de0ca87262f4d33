"""Shared test options and fixtures."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

import tbd  # noqa: F401  (applies the compatibility shims before any detectron2 import)

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


_MODULE_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    report = yield
    module = item.getparent(pytest.Module)
    if report.failed and module is not None:
        module.stash[_MODULE_FAILED] = True
    return report


@pytest.fixture(scope="module", autouse=True)
def _clear_module_folders(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Deletes the folders a module's fixtures made with ``tmp_path_factory`` once the module is done.

    Function-level ``tmp_path`` folders go by ``tmp_path_retention_policy``; module fixtures' folders
    (trained runs, caches) would otherwise stay until the next session and fill a small CI disk.
    A module with a failed test keeps its folders for inspection.
    """
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.node.stash.get(_MODULE_FAILED, False):
        return
    for path in set(base.iterdir()) - before:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def write_tiny_coco(root: Path, num_images: int = 8, size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """A small COCO dataset of coloured rectangles on noise: (json path, image dir)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            w, h = (int(v) for v in rng.integers(10, size // 2, size=2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            cat = int(rng.integers(1, 3))
            img[y : y + h, x : x + w] = (200, 40, 40) if cat == 1 else (40, 200, 40)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cat,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        name = f"{i:04d}.png"
        Image.fromarray(img).save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}],
    }
    json_path = root / "instances.json"
    json_path.write_text(json.dumps(data))
    return json_path, images_dir


def save_random_teacher(root: Path, num_classes: int = 2) -> Path:
    """A RetinaNet R-18 checkpoint of ``num_classes`` classes, random weights (seed 0: scores near its
    0.01 prior), saved as ``root/teacher.pth``: a teacher for CLI tests on :func:`write_tiny_coco` data."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from tbd.config import load_config

    torch.manual_seed(0)
    cfg = load_config(
        "retinanet_R18_FPN", ["MODEL.RETINANET.NUM_CLASSES", str(num_classes), "MODEL.DEVICE", "cpu"]
    )
    DetectionCheckpointer(build_model(cfg), save_dir=str(root)).save("teacher")
    return root / "teacher.pth"


def student_distill_cfg(test: str, weights: str, opts: list[str] | None = None, profile: str = ""):
    """The config ``tbd distill`` builds for the MNV2 student with ``weights`` (empty: from scratch) on
    ``profile`` and the user's ``opts``: where the settings measured per student (β, gate, the
    teacher-lead rule) are applied."""
    from tbd.config import load_config
    from tbd.teachers import distill_config

    student = load_config("tood_MNV2_FPN")
    student.MODEL.WEIGHTS = weights
    student.TBD.PROFILE = profile
    return distill_config(student, "tood_MNV2_FPN_teacher", "", test, opts=opts)


def tiny_distill_run(root: Path) -> Path:
    """A one-iteration ``tbd distill`` run on tiny user data (6 train / 2 val images of 64 px), random
    R-18 RetinaNet teacher, R-18 student from scratch; returns its output folder ``root/run``."""
    from tbd.cli.main import main

    train_json, train_images = write_tiny_coco(root / "train", num_images=6, seed=1)
    val_json, val_images = write_tiny_coco(root / "val", num_images=2, seed=2)
    teacher = save_random_teacher(root)
    out = root / "run"
    argv = [
        "distill", "--teacher-config", "retinanet_R18_FPN", "--teacher-weights", str(teacher),
        "--student", "r18", "--head", "retinanet", "--iters", "1", "--no-harmony", "--eval-period", "0",
        "--train-json", str(train_json), "--train-images", str(train_images),
        "--val-json", str(val_json), "--val-images", str(val_images),
        "--batch-size", "2", "--device", "cpu", "--profile", "embedded", "--output", str(out),
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TBD_DATA_DIR", str(root / "cache"))
        assert main(argv) == 0
    return out


@pytest.fixture
def tiny_coco(tmp_path: Path) -> str:
    """A registered tiny COCO dataset; returns its Detectron2 name."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    json_path, images = write_tiny_coco(tmp_path / "tiny")
    name = f"tiny_coco_{abs(hash(str(tmp_path))) % 10**8}"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    register_coco_instances(name, {}, str(json_path), str(images))
    return name


@pytest.fixture(scope="module")
def imagenet_torch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME holding torchvision's MobileNetV2 ImageNet file (from the offline package),
    set for the module's tests; skipped where the package is not installed."""
    from weights_util import INSTALL_HINT, MOBILENET_V2_FILE, offline_weights_file, plant_torch_home

    source = offline_weights_file(MOBILENET_V2_FILE)
    if source is None:
        pytest.skip(INSTALL_HINT)
    home = tmp_path_factory.mktemp("torch_home")
    plant_torch_home(home, source)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module (two on 2 shared cores thrash: 10-30x slower steps measured).

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def forget_datasets(before: set[str]) -> None:
    """Remove every dataset registered since ``before`` (Detectron2's catalogs are process-global)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.pop(name, None)


@pytest.fixture
def isolated_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A CLI test's own data cache under tmp, a wide console, and every dataset it registers removed
    after it."""
    from detectron2.data import DatasetCatalog

    monkeypatch.setenv("TBD_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "1000")
    before = set(DatasetCatalog.list())
    yield
    forget_datasets(before)
