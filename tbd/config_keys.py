"""Every config key of tbd on Detectron2's defaults, and a YAML read with them.

The lower half of :mod:`tbd.config`: it imports the modules that define the keys (``add_*_config``;
importing :mod:`tbd.modeling` registers the heads) but not :mod:`tbd.distill`'s distiller, so the
distiller can read its teacher's config here without an import cycle. :mod:`tbd.config` adds
``TBDistiller``'s registration on top (``get_cfg``, ``load_config``: what user code calls).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as d2_get_cfg

import tbd  # noqa: F401  (applies the compatibility shims first)

#: repository root (configs/ and teachers/ live beside the package)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"


def add_project_config(cfg: CN) -> None:
    """``TBD.*``: the embedded dataset's cache and size, and training-engine guards."""
    cfg.TBD = CN()
    cfg.TBD.DATA_DIR = ""  # empty: $TBD_DATA_DIR or ~/.cache/tbd
    cfg.TBD.NUM_TRAIN_IMAGES = 2000
    cfg.TBD.NUM_VAL_IMAGES = 200
    cfg.TBD.IMAGE_SIZE = 128
    # consecutive steps with a non-finite loss/gradient that are skipped before training stops
    cfg.TBD.MAX_NONFINITE_STEPS = 5
    # iterations between two progress lines (or live-bar refreshes)
    cfg.TBD.PROGRESS_PERIOD = 20
    # a partial fill of the backbone by MODEL.WEIGHTS (tbd.engine.weights) is an error unless True
    cfg.TBD.ALLOW_PARTIAL_WEIGHTS = False
    # distil even when the teacher would see inputs far from its training size (tbd.distill.input_check)
    cfg.TBD.ALLOW_TEACHER_INPUT_MISMATCH = False
    # the student profile the config was made with (tbd.profiles: embedded, coco, custom; "" = none)
    cfg.TBD.PROFILE = ""
    # how the input size was chosen (e.g. "median shorter side of the training images 400 px")
    cfg.TBD.INPUT_SIZE_RULE = ""
    # Detectron2 0.6 has no optimizer key: "SGD" (its only optimizer) or "ADAMW" (tbd.engine.optim)
    cfg.SOLVER.OPTIMIZER = "SGD"


def _extensions() -> list[Callable[[CN], None]]:
    """Every ``add_*_config`` of the project, in a fixed order: tbd's own keys (``TBD.*``), its
    models' (:data:`tbd.modeling.MODEL_CONFIGS`), then distillation's (``DISTILL.*``)."""
    from tbd.distill.config import add_tbd_config
    from tbd.modeling import MODEL_CONFIGS

    return [add_project_config, *MODEL_CONFIGS, add_tbd_config]


def add_all_config(cfg: CN) -> CN:
    for add in _extensions():
        add(cfg)
    return cfg


def register_models() -> None:
    """Register tbd's heads and backbones (``tbd.modeling``) in Detectron2's registries."""
    import tbd.modeling  # noqa: F401


def model_cfg() -> CN:
    """Detectron2's defaults with every tbd key, tbd's models registered (not ``TBDistiller``)."""
    register_models()
    return add_all_config(d2_get_cfg())


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or relative to the project's ``configs/`` directory."""
    p = Path(path)
    if p.is_file():
        return p
    candidate = CONFIG_DIR / p
    if candidate.is_file():
        return candidate
    if not p.suffix and (CONFIG_DIR / f"{p}.yaml").is_file():
        return CONFIG_DIR / f"{p}.yaml"
    raise FileNotFoundError(
        f"config file {str(path)!r} not found (looked at it as given and under {CONFIG_DIR}); "
        "pass a path to a Detectron2 YAML config"
    )


def load_model_config(path: str | Path, opts: list[str] | None = None) -> CN:
    """A YAML (a path, or a name under ``configs/``) on :func:`model_cfg`, then ``opts``."""
    cfg = model_cfg()
    cfg.merge_from_file(str(resolve_config_path(path)))
    if opts:
        cfg.merge_from_list(opts)
    return cfg


def teacher_config(cfg: CN) -> CN:
    """The teacher's config: ``DISTILL.TEACHER_CONFIG`` + ``DISTILL.TEACHER_OPTS``, on the student's device."""
    if not cfg.DISTILL.TEACHER_CONFIG:
        raise ValueError("DISTILL.TEACHER_CONFIG is empty: name the teacher's YAML config")
    t_cfg = load_model_config(cfg.DISTILL.TEACHER_CONFIG, list(cfg.DISTILL.TEACHER_OPTS))
    t_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    return t_cfg
