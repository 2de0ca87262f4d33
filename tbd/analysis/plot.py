"""Side-by-side IoU distributions of the easily classified predictions of several models (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _fmt_share(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def plot_harmony(
    summaries: Mapping[str, Mapping[str, Any]], path: str | Path, title: str | None = None
) -> Path:
    """Grouped bar chart: per IoU bin, one bar per model with the share of its easy predictions.

    ``summaries`` maps a model name to :func:`tbd.analysis.harmony.summarize`'s dict; all of them
    must share one set of thresholds. The bars sit on a true IoU axis (bin edges may be uneven), a
    dashed line marks ``iou_thresh`` and the legend gives each model's harmonious share and count
    of easy predictions. Returns the written path (its suffix picks the format: .png, .svg, ...).
    """
    import matplotlib.pyplot as plt

    fig = harmony_figure(summaries, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def harmony_figure(summaries: Mapping[str, Mapping[str, Any]], title: str | None = None) -> Any:
    """The figure of :func:`plot_harmony` (a matplotlib ``Figure``, not yet saved or closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summaries:
        raise ValueError("nothing to plot: no model summaries")
    from tbd.analysis.harmony import thresholds_of

    names = list(summaries)
    thresholds = thresholds_of(summaries[names[0]])
    for name in names[1:]:
        if thresholds_of(summaries[name]) != thresholds:
            raise ValueError(f"model {name!r} was measured with other thresholds than {names[0]!r}")
    edges = np.asarray(thresholds["bin_edges"], dtype=np.float64)
    left, widths = edges[:-1], np.diff(edges)
    n = len(names)
    bar_w = widths / n * 0.9

    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(widths) + 1.2 * n), 4.8), dpi=110)
    colours = plt.get_cmap("tab10").colors
    for k, name in enumerate(names):
        s = summaries[name]
        shares = np.asarray([np.nan if v is None else v for v in s["easy_iou_shares"]], dtype=np.float64)
        x = left + widths * 0.05 + k * bar_w
        label = (
            f"{name}: harmonious {_fmt_share(s['harmonious_share'])} "
            f"({s['num_easy']} easy, mean HS {'n/a' if s['mean_hs'] is None else format(s['mean_hs'], '.3f')})"
        )
        ax.bar(
            x, np.nan_to_num(shares) * 100.0, width=bar_w, align="edge", color=colours[k % 10], label=label
        )
    iou_t = float(thresholds["iou_thresh"])
    ax.axvspan(iou_t, 1.0, color="tab:green", alpha=0.07, zorder=0)
    ax.axvline(iou_t, color="black", linestyle="--", linewidth=1.0)
    top = ax.get_ylim()[1] * 1.08
    ax.set_ylim(0.0, top)
    ax.text(iou_t, top * 0.98, f" harmonious: IoU \u2265 {iou_t:g}", va="top", ha="left", fontsize=8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xticks(edges)
    ax.set_xticklabels([f"{e:g}" for e in edges], fontsize=8)
    matching = " (any class)" if thresholds["class_agnostic"] else " (same class)"
    ax.set_xlabel("IoU with the best-matching ground-truth box" + matching)
    ax.set_ylabel("share of easily classified predictions (%)")
    ax.set_title(
        (title + "\n" if title else "") + f"easily classified: score \u2265 {thresholds['score_thresh']:g}; "
        f"harmonious: IoU \u2265 {iou_t:g}; mean HS over score \u2265 {thresholds['score_floor']:g}",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(
        fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=n if n <= 2 else 1, frameon=False
    )
    return fig
