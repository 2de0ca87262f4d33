"""Task-aligned learning (TOOD §2 of METHODS.md): the TAL assigner and ATSS warm-up, the shared
meta-architecture, the T-Head (``TOOD``), the ET-head (``ETHeadDetector``) and their probe adapter."""
