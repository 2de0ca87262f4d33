"""Detectron2 meta-architectures and backbones added by tbd, one sub-package per method.

Importing this package registers them (and the heads' probe adapters): configs name the registry
entries (``TOOD``, ``ETHeadDetector``, ``DWDetector``, ``FCOSDetector``,
``build_mobilenet_v2_fpn_backbone``, ...), not module paths. :func:`add_model_config` adds their
config keys to a Detectron2 config, the way Detectron2's own projects do (``add_pointrend_config``):

    import tbd.modeling
    cfg = detectron2.config.get_cfg()
    tbd.modeling.add_model_config(cfg)
    cfg.merge_from_file("export/config_student.yaml")
"""

from __future__ import annotations

from detectron2.config import CfgNode

from tbd.modeling import codetr  # noqa: F401
from tbd.modeling.aux_heads.config import add_aux_heads_config
from tbd.modeling.backbones import mobilenet  # noqa: F401
from tbd.modeling.backbones.mobilenet import add_mobilenet_config
from tbd.modeling.codetr import probe as codetr_probe  # noqa: F401
from tbd.modeling.codetr.config import add_codetr_config
from tbd.modeling.dw import detector as dw_detector  # noqa: F401
from tbd.modeling.dw import probe as dw_probe  # noqa: F401
from tbd.modeling.dw.detector import add_dw_config
from tbd.modeling.fcos import detector as fcos_detector  # noqa: F401
from tbd.modeling.fcos.detector import add_fcos_config
from tbd.modeling.tal import et_head, tood  # noqa: F401
from tbd.modeling.tal import probe as tal_probe  # noqa: F401
from tbd.modeling.tal.assigner import add_tal_config

#: the ``add_*_config`` of every model tbd registers, in the order tbd's own config applies them
MODEL_CONFIGS = (
    add_fcos_config,
    add_tal_config,
    add_dw_config,
    add_mobilenet_config,
    add_aux_heads_config,
    add_codetr_config,
)


def add_model_config(cfg: CfgNode) -> CfgNode:
    """Add the config keys of tbd's models (``MODEL.FCOS``, ``MODEL.TAL``, ``MODEL.TOOD``,
    ``MODEL.ETHEAD``, ``MODEL.DW``, ``MODEL.MOBILENET``, ``MODEL.AUX_HEADS``, ``MODEL.CODETR``) to
    ``cfg``: what a config exported by ``tbd export`` needs beside Detectron2's own keys."""
    for add in MODEL_CONFIGS:
        add(cfg)
    return cfg
