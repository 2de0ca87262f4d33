"""Run one benchmark case in a fresh Python process and return its json result.

Peak-memory benchmarks read ``ru_maxrss``, a high-water mark of the whole process, so every case
must run in its own process. ``run_case("bench_x", "_case", *args)`` imports ``scripts/bench_x.py``
there, calls ``_case(*args)`` (arguments must round-trip through ``repr``), and parses the json it
prints. A failing case raises ``RuntimeError`` with the end of its stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Start a peak-memory measurement; returns this process's resident memory now, in MiB.

    On Linux the kernel's high-water mark (``VmHWM``) is reset to the current RSS (writing 5 to
    ``/proc/self/clear_refs``), so :func:`peak_rss_mib` minus this value is the peak growth of
    what follows, even if building the inputs went higher. Elsewhere: ``ru_maxrss`` (growth
    above the earlier high-water mark, which can read 0 when the inputs' temporaries were larger).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") / 1024
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    """The process's peak resident memory since :func:`reset_peak_rss` (or since start), in MiB."""
    try:
        return _status_kib("VmHWM") / 1024
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(module: str, func: str, *args: Any) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import {module} as b; "
        f"print(json.dumps(b.{func}(*{args!r})))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{module}.{func}{args} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
