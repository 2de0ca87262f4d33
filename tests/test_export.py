"""`tbd export` of every student head, loaded in a fresh process by plain Detectron2.

Each case is a distillation run folder (``config.yaml`` + a ``TBDistiller`` checkpoint) whose
student has settings far from Detectron2's defaults where a lost key would show: RGB input, its own
pixel mean/std, test sizes that resize the image, the embedded anchors, and a test score threshold
of 0 so that an untrained model still answers with boxes. The exported pair is loaded in a fresh
process by README.md's own snippets (Detectron2's ``get_cfg``, ``build_model`` and
``DetectionCheckpointer``; for tbd's heads ``import tbd.modeling`` and its ``add_model_config``),
and must predict, as Detectron2's ``DefaultPredictor`` does, the boxes the run's model predicts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import yaml

import tbd  # noqa: F401
from tbd.config import PROJECT_ROOT, load_config

#: case -> (student config, its test score-threshold key, loads without tbd)
CASES: dict[str, tuple[str, str, bool]] = {
    "retinanet": ("retinanet_R18_FPN", "MODEL.RETINANET.SCORE_THRESH_TEST", True),
    "faster_rcnn": ("faster_rcnn_R18_FPN", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", True),
    "fcos": ("fcos_R18_FPN", "MODEL.FCOS.SCORE_THRESH_TEST", False),
    "tal": ("tood_R18_FPN", "MODEL.TOOD.SCORE_THRESH_TEST", False),
    "et": ("et_R18_FPN", "MODEL.ETHEAD.SCORE_THRESH_TEST", False),
    "dw": ("dw_R18_FPN", "MODEL.DW.SCORE_THRESH_TEST", False),
    "retinanet_mnv2": ("retinanet_MNV2_FPN", "MODEL.RETINANET.SCORE_THRESH_TEST", False),
}

#: student settings that differ from Detectron2's defaults, so that losing one changes the answer
NON_DEFAULT = [
    "INPUT.FORMAT", "RGB",
    "MODEL.PIXEL_MEAN", "[120.0, 110.0, 100.0]",
    "MODEL.PIXEL_STD", "[50.0, 60.0, 70.0]",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "160",
]  # fmt: skip

_IMAGE_SHAPE = (100, 150, 3)  # resized to 96 x 144 by the test sizes above


def _image() -> np.ndarray:
    """A BGR uint8 image (as cv2 reads one) with a few coloured rectangles on noise."""
    rng = np.random.default_rng(0)
    img = (rng.random(_IMAGE_SHAPE) * 80).astype(np.uint8)
    img[10:60, 20:90] = (30, 200, 40)
    img[50:95, 100:140] = (220, 30, 30)
    return img


def _run_folder(root: Path, name: str) -> Path:
    """A distillation run of the ``name`` student: config.yaml and model_final.pth (untrained)."""
    from detectron2.modeling import build_model

    config, thresh_key, _ = CASES[name]
    cfg = load_config(config, [*NON_DEFAULT, thresh_key, "0.0", "MODEL.DEVICE", "cpu"])
    cfg.DISTILL.STUDENT_META_ARCHITECTURE = cfg.MODEL.META_ARCHITECTURE
    cfg.MODEL.META_ARCHITECTURE = "TBDistiller"
    cfg.DISTILL.TEACHER_CONFIG = "retinanet_R18_FPN"  # untrained: its weights do not matter here
    cfg.DISTILL.TEACHER_OPTS = ["MODEL.DEVICE", "cpu"]
    run = root / name
    run.mkdir()
    cfg.OUTPUT_DIR = str(run)
    torch.manual_seed(0)
    distiller = build_model(cfg)
    assert any(k.startswith(("adapters.", "twg.")) for k in distiller.state_dict())  # dropped on export
    torch.save({"model": distiller.state_dict(), "iteration": 2}, run / "model_final.pth")
    (run / "config.yaml").write_text(cfg.dump())
    return run


def _predict_in_tbd(run: Path) -> dict[str, torch.Tensor]:
    """What the run's own model (the ``TBDistiller``, as tbd loads it) predicts on the image."""
    from detectron2.engine import DefaultPredictor

    cfg = load_config(run / "config.yaml")
    cfg.MODEL.WEIGHTS = str(run / "model_final.pth")
    with torch.no_grad():
        inst = DefaultPredictor(cfg)(_image())["instances"]
    return {"boxes": inst.pred_boxes.tensor, "scores": inst.scores, "classes": inst.pred_classes}


def _readme_block(marker: str, config: str, weights: str) -> str:
    """The README's loading snippet between ``marker`` comments, with ``{config}``/``{weights}``
    in place of its example paths."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = readme.split(f"<!-- {marker}:start -->", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]
    code = re.findall(r"```python\n(.*?)```", block, flags=re.S)[0]
    assert code.count(f'"{config}"') == 1 and code.count(f'"{weights}"') == 1, code
    return code.replace(f'"{config}"', "CONFIG").replace(f'"{weights}"', "WEIGHTS")


#: per kind of export, the README's snippet and what it must not import. Detectron2's own
#: architectures load with tbd impossible to import (the snippet carries the environment fixes
#: Detectron2 0.6 needs here); tbd's heads with tbd.modeling, never tbd.config's get_cfg.
LOADERS = {
    True: (_readme_block("plain-load", "output/model_student.yaml", "output/model_student.pth"), "tbd"),
    False: (
        _readme_block(
            "plain-load-tbd",
            "runs/distill/export/config_student.yaml",
            "runs/distill/export/model_student.pth",
        ),
        "tbd.config",
    ),
}

# Runs the README snippet for each export in one fresh interpreter, then predicts on the image as
# Detectron2's DefaultPredictor does (its __call__: input format, test-size resize, original size).
_LOAD_AND_PREDICT = """
import json, sys
if FORBIDDEN == "tbd":
    sys.modules["tbd"] = None  # any import of tbd fails
import numpy as np, torch

torch.set_num_threads(1)
image = np.load(sys.argv[1])
for export in sys.argv[2:]:
    CONFIG, WEIGHTS = export + "/config_student.yaml", export + "/model_student.pth"
    namespace = {"CONFIG": CONFIG, "WEIGHTS": WEIGHTS}
    exec(SNIPPET, namespace)
    cfg, model = namespace["cfg"], namespace["model"]
    from detectron2.checkpoint import DetectionCheckpointer
    import detectron2.data.transforms as T
    ck = DetectionCheckpointer(model)
    bad = ck._load_model(ck._load_file(WEIGHTS))
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    img = image[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else image
    height, width = img.shape[:2]
    img = aug.get_transform(img).apply_image(img)
    x = torch.as_tensor(img.astype("float32").transpose(2, 0, 1))
    model.eval()
    with torch.no_grad():
        inst = model([{"image": x, "height": height, "width": width}])[0]["instances"]
    torch.save({
        "boxes": inst.pred_boxes.tensor, "scores": inst.scores, "classes": inst.pred_classes,
        "model": type(model).__name__,
        "missing": list(bad.missing_keys), "unexpected": list(bad.unexpected_keys),
        "shapes": [k for k, *_ in bad.incorrect_shapes],
        "cfg": cfg.dump(),
    }, export + "/plain.pth")
assert FORBIDDEN not in sys.modules or sys.modules[FORBIDDEN] is None, FORBIDDEN + " was imported"
print("LOADED", len(sys.argv) - 2)
"""


def _load_in_fresh_process(native: bool, image: Path, exports: list[Path]) -> None:
    snippet, forbidden = LOADERS[native]
    script = f"SNIPPET = {snippet!r}\nFORBIDDEN = {forbidden!r}\n" + textwrap.dedent(_LOAD_AND_PREDICT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if native:  # tbd is not on the path either
        env["PYTHONPATH"] = ""
    done = subprocess.run(
        [sys.executable, "-c", script, str(image), *map(str, exports)],
        capture_output=True,
        text=True,
        timeout=600,  # seconds on an idle machine; minutes on a loaded 2-core one
        env=env,
        cwd=image.parent,
    )
    assert done.returncode == 0 and f"LOADED {len(exports)}" in done.stdout, done.stderr[-3000:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """Per case: the run's predictions in tbd, the exported YAML, and what plain Detectron2 made of it."""
    from tbd.cli.main import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the fresh processes: the same kernels, the same float sums
    try:
        root = tmp_path_factory.mktemp("export")
        image = root / "image.npy"
        np.save(image, _image())
        results: dict[str, dict[str, Any]] = {}
        for name in CASES:
            run = _run_folder(root, name)
            assert main(["export", "--run", str(run)]) == 0
            results[name] = {"run": run, "export": run / "export", "tbd": _predict_in_tbd(run)}
        for native in (True, False):
            names = [n for n, (_, _, nat) in CASES.items() if nat == native]
            _load_in_fresh_process(native, image, [results[n]["export"] for n in names])
        for result in results.values():
            result["plain"] = torch.load(result["export"] / "plain.pth", weights_only=False)
    finally:
        torch.set_num_threads(threads)
    yield results


def _flat(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_exported_student_predicts_the_runs_boxes_in_plain_detectron2(
    exported: dict[str, dict[str, Any]], name: str
) -> None:
    before, after = exported[name]["tbd"], exported[name]["plain"]
    student_arch = load_config(exported[name]["run"] / "config.yaml").DISTILL.STUDENT_META_ARCHITECTURE
    assert after["model"] == student_arch  # the student alone, not the distiller
    assert not after["missing"] and not after["unexpected"] and not after["shapes"], after
    assert len(before["boxes"]) > 0, "the run's model predicted nothing: the comparison would be empty"
    assert after["boxes"].shape == before["boxes"].shape
    torch.testing.assert_close(after["boxes"], before["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(after["scores"], before["scores"], rtol=0, atol=1e-6)
    assert torch.equal(after["classes"], before["classes"])


@pytest.mark.parametrize("name", list(CASES))
def test_exported_config_keeps_every_student_setting_its_loader_has(
    exported: dict[str, dict[str, Any]], name: str
) -> None:
    from tbd.export import student_cfg

    run_cfg = load_config(exported[name]["run"] / "config.yaml")
    student = _flat(yaml.safe_load(student_cfg(run_cfg).dump()))
    loaded = _flat(yaml.safe_load(exported[name]["plain"]["cfg"]))
    exported_yaml = _flat(yaml.safe_load((exported[name]["export"] / "config_student.yaml").read_text()))
    assert not [k for k in exported_yaml if k.startswith(("DISTILL.", "TBD."))]
    assert "SOLVER.OPTIMIZER" not in exported_yaml  # tbd's key, unknown to Detectron2
    differing = {
        k: (v, student.get(k, "<not in the run>"))
        for k, v in loaded.items()
        if k != "MODEL.WEIGHTS" and student.get(k) != v
    }
    assert not differing, f"loaded value != the run's student value: {differing}"
    # the settings this file makes non-default are among them, by name
    for key, value in zip(NON_DEFAULT[::2], NON_DEFAULT[1::2]):
        assert str(loaded[key]).replace(" ", "") == value.replace(" ", ""), key
    assert loaded["MODEL.ANCHOR_GENERATOR.SIZES"] == student["MODEL.ANCHOR_GENERATOR.SIZES"]
    assert loaded[CASES[name][1]] == 0.0


def test_the_run_config_itself_is_refused_by_plain_detectron2(exported: dict[str, dict[str, Any]]) -> None:
    """Why the export exists: Detectron2's get_cfg() cannot read a distillation run's config.yaml."""
    from detectron2.config import get_cfg

    with pytest.raises(KeyError, match="Non-existent config key"):
        get_cfg().merge_from_file(str(exported["retinanet"]["run"] / "config.yaml"))
