"""Dual Weighting (DW, METHODS.md): ``DWDetector``, its head, weights, loss and probe adapter."""
