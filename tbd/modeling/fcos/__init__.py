"""Detectron2's FCOS as a YAML-configurable meta-architecture (``FCOSDetector``)."""
