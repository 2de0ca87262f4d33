"""Backbones added by tbd (MobileNetV2-FPN)."""
