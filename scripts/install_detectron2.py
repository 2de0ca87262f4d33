"""Install Detectron2 v0.6 (Python code only) into the running interpreter's environment.

PyPI has no ``detectron2`` package. ``pb1-detectron2==0.6`` is an sdist with the official v0.6
Python sources but without the C++ sources of ``detectron2._C``, so its build fails as shipped.
This script downloads it (or takes a local copy from ``TBD_DETECTRON2_SDIST``), empties the
extension list, drops the pin on an old ``black`` that only Detectron2's developers use, and
installs the result. ``tbd.compat`` explains at run time what is missing without the extension.

Users with a compiled Detectron2 never need this: ``make``/bootstrap skips it when
``import detectron2`` works.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "pb1-detectron2==0.6"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def _fetch_sdist(workdir: Path) -> Path:
    local = os.environ.get("TBD_DETECTRON2_SDIST")
    if local:
        path = Path(local)
        if not path.is_file():
            sys.exit(f"TBD_DETECTRON2_SDIST={local} is not a file: point it at pb1-detectron2-0.6.tar.gz")
        return path
    _pip(
        "download",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-binary",
        ":all:",
        SDIST,
        "-d",
        str(workdir),
    )
    found = sorted(workdir.glob("*.tar.gz"))
    if not found:
        sys.exit(f"pip download of {SDIST} produced no sdist; set TBD_DETECTRON2_SDIST to a local copy")
    return found[0]


def patch_setup(setup_py: Path) -> None:
    """Build without the C++ extension and without the unused ``black`` pin."""
    text = setup_py.read_text()
    patched = text.replace("ext_modules=get_extensions(),", "ext_modules=[],")
    patched = re.sub(r'^\s*"black==[^"]*",\s*$\n', "", patched, flags=re.MULTILINE)
    if "ext_modules=[]" not in patched:
        sys.exit(f"{setup_py}: unexpected layout, cannot disable the C++ extension")
    setup_py.write_text(patched)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tbd-d2-") as tmp:
        work = Path(tmp)
        sdist = _fetch_sdist(work)
        print(f"[install_detectron2] building {sdist.name} without its C++ extension")
        with tarfile.open(sdist) as tar:
            tar.extractall(work / "src", filter="data")
        (root,) = [p for p in (work / "src").iterdir() if p.is_dir()]
        patch_setup(root / "setup.py")
        _pip("install", "-q", "--no-build-isolation", str(root))
    print("[install_detectron2] done")


if __name__ == "__main__":
    main()
