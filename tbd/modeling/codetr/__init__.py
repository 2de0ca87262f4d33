"""Co-DETR (DETRs with collaborative hybrid assignments training) on Deformable-DETR++.

Importing registers the ``CoDETR`` meta-architecture. See docs/CODETR.md.
"""

from tbd.modeling.codetr.config import add_codetr_config
from tbd.modeling.codetr.detector import CoDETR

__all__ = ["CoDETR", "add_codetr_config"]
