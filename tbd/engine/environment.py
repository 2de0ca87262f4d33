"""Where a run ran: the processor, the accelerator and the versions that decide its numerics.

The same command, seed and data train another model on another kind of processor: its math kernels
round in another order and a detector's training amplifies the difference (docs/BENCHMARKS.md §1o:
13.6 against 14.7 AP after 400 iterations on two CPUs). ``tbd_run.json`` keeps this description, so a
resumed run can say when it continues on another kind of machine and two runs can be told apart
before their APs are subtracted.
"""

from __future__ import annotations

import importlib
import platform
from pathlib import Path
from typing import Any

#: the entries that change a run's numbers (the Python version and the host name do not)
NUMERIC_KEYS = ("cpu", "cpu_kernels", "gpu", "threads", "torch", "torchvision", "detectron2")


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name with its family / model / stepping where Linux gives them (one
    vendor name, e.g. "AMD EPYC", covers several generations), else what ``platform`` knows."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            key = key.strip()
            if not sep:
                if fields:  # the first processor is enough
                    break
                continue
            fields.setdefault(key, value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    parts = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if fields.get(k)]
    return f"{name} ({', '.join(parts)})" if parts else name


def _version(module: str) -> str | None:
    """The imported module's ``__version__`` (Detectron2's distribution name varies with its build)."""
    try:
        version = getattr(importlib.import_module(module), "__version__", None)
    except ImportError:
        return None
    return str(version) if version else None


def describe_environment(device: str = "cpu") -> dict[str, Any]:
    """Processor, accelerator (unless ``device`` is "cpu"), thread count and library versions."""
    import torch

    gpu = None
    if str(device) != "cpu" and torch.cuda.is_available():  # "cuda", "cuda:N" or "auto"
        gpu = torch.cuda.get_device_name(torch.device(device) if device.startswith("cuda") else None)
    return {
        "cpu": cpu_name(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "gpu": gpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "detectron2": _version("detectron2"),
        "python": platform.python_version(),
    }


def numeric_differences(stored: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(entry, stored, now)`` for every entry of :data:`NUMERIC_KEYS` the two descriptions disagree on."""
    return [(k, stored.get(k), now.get(k)) for k in NUMERIC_KEYS if stored.get(k) != now.get(k)]


def describe_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k}: {a} then, {b} now" for k, a, b in diffs)
