"""Detectron2 meta-architectures added by tbd (importing registers them)."""

from tbd.modeling import fcos  # noqa: F401
