"""tbd: Task-Balanced Distillation for Detectron2 object detectors."""

from __future__ import annotations

from typing import Any

from tbd import compat

__version__ = "0.1.0"

compat.apply()


def _register_weight_names() -> None:
    # MODEL.WEIGHTS: torchvision://resnet50 in any Detectron2 checkpointer (tbd.engine.weights)
    try:
        from tbd.engine.weights import register_torchvision_scheme
    except ImportError:  # no Detectron2 in this environment: nothing to register with
        return
    register_torchvision_scheme()


_register_weight_names()

from tbd.data.images import install_reader  # noqa: E402  (after the shims: it imports detectron2)

install_reader()  # 16-bit greyscale images scaled to 8 bits; unreadable image files named

_LAZY = {
    "add_tbd_config": ("tbd.distill.config", "add_tbd_config"),
    "get_cfg": ("tbd.config", "get_cfg"),
    "TBDistiller": ("tbd.distill.distiller", "TBDistiller"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'tbd' has no attribute {name!r}")


__all__ = ["__version__", "compat", *_LAZY]
