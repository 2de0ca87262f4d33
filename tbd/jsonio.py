"""Strict JSON for every file tbd writes: no ``NaN``/``Infinity`` (which strict parsers reject).

An undefined number (COCO's AP of a model without predictions, a ratio of nothing) becomes ``null``;
the writer of a result puts a ``note`` beside it saying why.
"""

from __future__ import annotations

import json
import math
from typing import Any


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (mappings and sequences walked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return strict(value.item())  # numpy / torch scalars
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`strict` ``(value)``; raises if anything non-finite is left."""
    kwargs.setdefault("default", _fallback)
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def _fallback(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        return strict(value.item())
    if hasattr(value, "tolist"):
        return strict(value.tolist())
    return str(value)


def undefined_metrics_note(metrics: dict[str, Any]) -> str | None:
    """Why some COCO metrics of ``metrics`` are undefined (``None``/NaN), or ``None`` when all are set."""
    undefined = [
        k for k, v in metrics.items() if v is None or (isinstance(v, float) and not math.isfinite(v))
    ]
    if not undefined:
        return None
    if "AP" in undefined:
        return "undefined: the model made no predictions above its test score threshold on the test set"
    return (
        f"{', '.join(undefined)} undefined: the test set has no ground-truth objects of that size "
        "(COCO's small < 32², medium < 96², large ≥ 96² pixels)"
    )


def strict_results(results: dict[str, Any]) -> dict[str, Any]:
    """COCO results (``{"bbox": {"AP": ...}}``) as strict JSON values, with a ``notes`` entry per task
    whose metrics are undefined."""
    out: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for task, metrics in results.items():
        if isinstance(metrics, dict):
            note = undefined_metrics_note(metrics)
            if note:
                notes[task] = note
        out[task] = strict(metrics)
    if notes:
        out["notes"] = notes
    return out


def fmt_metric(value: Any, fmt: str = "{:.1f}") -> str:
    """A table cell: ``-`` for an undefined metric."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)
