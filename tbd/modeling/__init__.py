"""Detectron2 meta-architectures and backbones added by tbd, one sub-package per method.

Importing this package registers them (and the heads' probe adapters): configs name the registry
entries (``TOOD``, ``ETHeadDetector``, ``DWDetector``, ``FCOSDetector``,
``build_mobilenet_v2_fpn_backbone``, ...), not module paths.
"""

from tbd.modeling import codetr  # noqa: F401
from tbd.modeling.backbones import mobilenet  # noqa: F401
from tbd.modeling.codetr import probe as codetr_probe  # noqa: F401
from tbd.modeling.dw import detector as dw_detector  # noqa: F401
from tbd.modeling.dw import probe as dw_probe  # noqa: F401
from tbd.modeling.fcos import detector as fcos_detector  # noqa: F401
from tbd.modeling.tal import et_head, tood  # noqa: F401
from tbd.modeling.tal import probe as tal_probe  # noqa: F401
