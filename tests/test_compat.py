"""Each shim in tbd.compat: the breakage it answers exists here, and with the shim it works."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import tbd
from tbd import compat


def test_apply_is_idempotent() -> None:
    assert compat.apply() == compat.apply()
    assert len(set(compat.APPLIED)) == len(compat.APPLIED)


@pytest.mark.skipif(compat.has_compiled_ops(), reason="a compiled detectron2._C is installed")
def test_missing_extension_is_needed_and_fails_clearly() -> None:
    assert "missing_extension" in compat.APPLIED
    # the extension really is absent: no compiled _C file ships beside the package
    import detectron2

    package_dir = os.path.dirname(detectron2.__file__)
    assert not [f for f in os.listdir(package_dir) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated  # imports detectron2._C

    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
    with pytest.raises(RuntimeError, match=r"detectron2\._C\.box_iou_rotated is not available.*Build"):
        pairwise_iou_rotated(boxes, boxes)


def test_pillow_linear() -> None:
    from detectron2.data.transforms import ExtentTransform
    from PIL import Image

    if "pillow_linear" in compat.APPLIED:
        assert Image.LINEAR == Image.BILINEAR
    img = (np.random.default_rng(0).random((10, 12, 3)) * 255).astype(np.uint8)
    out = ExtentTransform(src_rect=(0, 0, 12, 10), output_size=(5, 6)).apply_image(img)
    assert out.shape == (5, 6, 3)


def test_numpy_aliases_make_class_histogram_work() -> None:
    major = int(np.__version__.split(".")[0])
    if major >= 2:
        assert "numpy_aliases" in compat.APPLIED
    from detectron2.data.build import print_instances_class_histogram

    dicts = [{"annotations": [{"category_id": 0}, {"category_id": 1}]}]
    print_instances_class_histogram(dicts, ["a", "b"])  # used np.int before the shim


def test_coco_evaluator_falls_back_to_pycocotools(tmp_path) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator

    name = "tbd_compat_coco_probe"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(json_file=str(tmp_path / "x.json"), thing_classes=["a"])
    (tmp_path / "x.json").write_text(
        '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}'
    )
    ev = COCOEvaluator(name, output_dir=str(tmp_path))
    assert ev._use_fast_impl is compat.has_compiled_ops()


def test_checkpoint_with_optimizer_roundtrips(tmp_path) -> None:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.solver import LRMultiplier
    from fvcore.common.param_scheduler import CosineParamScheduler

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LRMultiplier(opt, CosineParamScheduler(1, 0), max_iter=10)
    ck = DetectionCheckpointer(model, str(tmp_path), optimizer=opt, scheduler=sched)
    ck.save("m", iteration=3)
    # no shim: torch's weights-only loading accepts Detectron2's training checkpoints as they are
    assert torch.load(tmp_path / "m.pth")["iteration"] == 3
    extra = DetectionCheckpointer(model, str(tmp_path), optimizer=opt, scheduler=sched).resume_or_load(
        str(tmp_path / "m.pth")
    )
    assert extra["iteration"] == 3


def test_groupnorm_head_builds() -> None:
    if "gn_head_norm_probe" in compat.APPLIED:
        with pytest.raises(ValueError):
            torch.nn.GroupNorm(32, 1)
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.fcos import FCOSHead

    head = FCOSHead(input_shape=[ShapeSpec(channels=32)], conv_dims=[32], num_classes=3, norm="GN")
    logits, reg, ctr = head([torch.zeros(1, 32, 4, 4)])
    assert logits[0].shape == (1, 3, 4, 4)


def _all_reduce_worker(path: str) -> None:
    import torch.distributed as dist
    from detectron2.utils import comm

    t = torch.tensor([float(comm.get_rank() + 1)])
    dist.all_reduce(t)
    with open(os.path.join(path, f"rank{comm.get_rank()}.txt"), "w") as f:
        f.write(f"{comm.get_world_size()} {t.item()}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim only applies without CUDA")
def test_launch_runs_two_cpu_processes_with_gloo(tmp_path) -> None:
    from detectron2.engine import launch

    assert "cpu_launch_gloo" in compat.APPLIED
    launch(_all_reduce_worker, 2, dist_url="auto", args=(str(tmp_path),))
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "2 3.0"


def test_version() -> None:
    assert tbd.__version__


def _ddp_worker(path: str) -> None:
    from detectron2.engine import defaults
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    model = torch.nn.Linear(2, 2)
    try:  # what Detectron2 0.6 does on its own: device_ids=[local_rank] for a CPU model
        DistributedDataParallel(model, device_ids=[comm.get_local_rank()])
        needed = False
    except ValueError:
        needed = True
    ddp = defaults.create_ddp_model(model, broadcast_buffers=False)
    ddp(torch.ones(1, 2)).sum().backward()
    with open(os.path.join(path, f"ddp{comm.get_rank()}.txt"), "w") as f:
        f.write(f"{needed} {type(ddp).__name__}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim only applies without CUDA")
def test_create_ddp_model_works_on_cpu(tmp_path) -> None:
    from detectron2.engine import launch

    assert "cpu_ddp_device_ids" in compat.APPLIED
    launch(_ddp_worker, 2, dist_url="auto", args=(str(tmp_path),))
    for rank in (0, 1):
        assert (tmp_path / f"ddp{rank}.txt").read_text() == "True DistributedDataParallel"


@pytest.mark.skipif(compat.has_compiled_ops(), reason="a compiled detectron2._C is installed")
def test_collect_env_info_reports_the_missing_extension() -> None:
    # default_setup() of every train_net.py logs collect_env_info(), which queries the extension
    import detectron2._C as ext
    from detectron2.utils.collect_env import collect_env_info

    assert ext.has_cuda() is False
    info = collect_env_info()
    assert "not built (detectron2._C is absent" in info
    assert "PyTorch" in info
