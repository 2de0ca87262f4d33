"""Files written atomically: a temporary sibling, fsync, then a rename over the target.

Below :mod:`tbd.engine.checkpoint` and :mod:`tbd.export` (both write this way), and importing
neither of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from tbd.engine.run_folder import remove_owned

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary sibling, fsync, then rename over ``path``.

    A process killed half-way leaves at most a stray ``.tmp`` file; the previous ``path`` stays.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            remove_owned([tmp], path.parent)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries that :func:`atomic_torch_save` / :func:`atomic_write_text` left behind.

    A process killed (``kill -9``, out of memory) while writing leaves ``.<name>.<pid>.tmp``; the
    file it was replacing is intact. Files of a process that is still running are kept.
    """
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        pid = tmp.name[: -len(".tmp")].rsplit(".", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _process_alive(int(pid))):
            continue
        removed.extend(remove_owned([tmp], directory))
    if removed:
        logger.info("removed %d stale temporary file(s) of an interrupted save: %s", len(removed), removed)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
