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


def run_case(module: str, func: str, *args: Any) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import {module} as b; "
        f"print(json.dumps(b.{func}(*{args!r})))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{module}.{func}{args} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
