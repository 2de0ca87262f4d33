"""The README recipe is ``examples/train_net.py``, run as a user runs it; its export loads without tbd."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tbd  # noqa: F401
from tbd.config import CONFIG_DIR, PROJECT_ROOT, load_config

EXAMPLE = PROJECT_ROOT / "examples" / "train_net.py"


def _readme_block(marker: str) -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = readme.split(f"<!-- {marker}:start -->", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]
    code = re.findall(r"```python\n(.*?)```", block, flags=re.S)
    assert code, f"no python snippet between the {marker} markers"
    return code[0]


def test_readme_recipe_is_the_example_program() -> None:
    assert _readme_block("recipe") == EXAMPLE.read_text()


def _env() -> dict[str, str]:
    path = [str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python train_net.py --num-gpus 2`` from a temporary directory, on tiny COCO data, 2 iterations."""
    from conftest import write_tiny_coco
    from detectron2.modeling import build_model

    work = tmp_path_factory.mktemp("user")
    json_path, images = write_tiny_coco(work / "data", num_images=8, size=64)
    # the example's default --teacher-config: fcos_R50_FPN, the embedded r50 teacher of tbd distill
    teacher = load_config("fcos_R50_FPN", ["MODEL.FCOS.NUM_CLASSES", "2"])
    torch.manual_seed(0)
    torch.save({"model": build_model(teacher).state_dict()}, work / "teacher.pth")  # untrained R-50
    argv = [
        sys.executable, str(EXAMPLE), "--num-gpus", "2", "--dist-url", "auto",
        "--teacher-weights", "teacher.pth",
        "--config-file", str(CONFIG_DIR / "retinanet_R18_FPN.yaml"),
        "--train-json", "data/instances.json", "--train-images", "data/images",
        "--val-json", "data/instances.json", "--val-images", "data/images",
        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "()", "DATALOADER.NUM_WORKERS", "0",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        # keep every candidate: 2 iterations score nothing above 0.05, and the export must be
        # compared on boxes, not on two empty lists
        "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0",
        "OUTPUT_DIR", "output",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work


def test_example_distils_in_two_processes_and_exports_the_student(two_process_run: Path) -> None:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    out = two_process_run / "output"
    assert (out / "log.txt").is_file() and (out / "log.txt.rank1").is_file()  # default_setup, 2 ranks
    log = (out / "log.txt").read_text()
    assert "Rank of current process: 0. World size: 2" in log
    metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert any("loss_hd" in m and "loss_tfd" in m for m in metrics)

    final = torch.load(out / "model_final.pth", weights_only=False)["model"]
    assert any(k.startswith("adapters.") for k in final) and any(k.startswith("twg.") for k in final)
    exported = torch.load(out / "model_student.pth", weights_only=False)["model"]
    assert set(exported) == {k[len("student.") :] for k in final if k.startswith("student.")}
    assert all(torch.equal(v, final[f"student.{k}"]) for k, v in exported.items())

    cfg = get_cfg()  # Detectron2's own, no tbd keys
    cfg.merge_from_file(str(out / "model_student.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet" and cfg.MODEL.RETINANET.NUM_CLASSES == 2
    assert cfg.MODEL.RETINANET.SCORE_THRESH_TEST == 0.0 and cfg.INPUT.MIN_SIZE_TEST == 64  # the student's
    build_model(cfg).load_state_dict(exported, strict=True)


_PLAIN_CHECK = """
import torch

image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
with torch.no_grad():
    inst = model([{"image": image}])[0]["instances"]
assert "tbd" not in sys.modules, "tbd was imported"
torch.save({"boxes": inst.pred_boxes.tensor, "scores": inst.scores}, "plain_out.pth")
"""


def test_exported_student_loads_in_plain_detectron2_as_the_readme_says(two_process_run: Path) -> None:
    script = _readme_block("plain-load") + _PLAIN_CHECK
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=two_process_run,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # tbd is not on the path
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    plain = torch.load(two_process_run / "plain_out.pth")

    # the same student inside tbd: the distiller's checkpoint, evaluated through TBDistiller
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from tbd.distill import TBDistiller

    run_cfg = load_config(two_process_run / "output" / "config.yaml")
    run_cfg.DISTILL.TEACHER_WEIGHTS = str(two_process_run / "teacher.pth")  # relative to the run's cwd
    # built as the recipe builds it: the config's META_ARCHITECTURE is the student's (RetinaNet), so
    # build_model alone would give a bare RetinaNet that none of the checkpoint's student.* keys fill
    distiller = TBDistiller.from_student(run_cfg, build_model(run_cfg)).eval()
    checkpointer = DetectionCheckpointer(distiller)
    loaded = checkpointer._load_model(
        checkpointer._load_file(str(two_process_run / "output" / "model_final.pth"))
    )
    assert not loaded.missing_keys and not loaded.unexpected_keys, loaded
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the plain process (OMP_NUM_THREADS=1): the same float sums, so
    try:  # the near-equal scores of an untrained model keep their order
        with torch.no_grad():
            inst = distiller([{"image": image}])[0]["instances"]
    finally:
        torch.set_num_threads(threads)
    assert len(inst) > 0, "the student predicted nothing: the comparison would be empty"
    # other processes, other thread counts: the same boxes up to float summation order
    torch.testing.assert_close(plain["boxes"], inst.pred_boxes.tensor, rtol=0, atol=1e-4)
    torch.testing.assert_close(plain["scores"], inst.scores, rtol=0, atol=1e-6)


def test_export_student_unwraps_distributed_data_parallel(tmp_path: Path) -> None:
    import torch.distributed as dist
    from detectron2.modeling import build_model
    from torch.nn.parallel import DistributedDataParallel

    from tbd.distill import TBDistiller, export_student

    cfg = load_config(
        "retinanet_R18_FPN",
        ["MODEL.RETINANET.NUM_CLASSES", "2", "DISTILL.TEACHER_CONFIG", "retinanet_R18_FPN"]
        + ["DISTILL.TEACHER_OPTS", "['MODEL.RETINANET.NUM_CLASSES', '2']"],
    )
    distiller = TBDistiller.from_student(cfg, build_model(cfg))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(distiller)
        with pytest.raises(AttributeError):
            wrapped.export_student  # noqa: B018  (what the old recipe called)
        assert export_student(wrapped, tmp_path / "student.pth", cfg)
    finally:
        dist.destroy_process_group()
    saved = torch.load(tmp_path / "student.pth", weights_only=False)["model"]
    student = distiller.student.state_dict()
    assert saved.keys() == student.keys() and all(torch.equal(saved[k], student[k]) for k in saved)
    assert "DISTILL" not in (tmp_path / "student.yaml").read_text()
