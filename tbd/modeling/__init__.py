"""Detectron2 meta-architectures and backbones added by tbd (importing registers them, and the
heads' probe adapters)."""

from tbd.modeling import codetr, dw, dw_probe, et_head, fcos, mobilenet, tal_probe, tood  # noqa: F401
