"""Detectron2 meta-architectures added by tbd (importing registers them and their probe adapters)."""

from tbd.modeling import dw, dw_probe, et_head, fcos, tal_probe, tood  # noqa: F401
