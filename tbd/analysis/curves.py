"""Training curves of tbd runs, read from their ``metrics.json`` and ``summary.json``.

A run folder (``tbd train`` / ``tbd distill`` output) holds Detectron2's ``metrics.json``: one JSON
object per line, written every ``PERIODIC_WRITER`` period during training (the losses, median over
the last 20 steps, and the distiller's ``tbd/*`` scalars) and after every evaluation (``bbox/AP``
... and ``harmony/harmonious_share`` ...). ``tbd distill`` adds ``summary.json`` (teacher and
student AP and their IoU histograms of confident predictions). :func:`load_run` reads both;
:func:`training_figure`, :func:`evaluation_figure` and :func:`harmony_figures` draw them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tbd.distill.keys import DISTILL_LOSSES

METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"
#: prefix of the scalars of a baseline trained beside a distillation run (``tbd distill --with-baseline``)
BASELINE_PREFIX = "baseline/"
#: the distiller's TWG classification weight of one FPN level: ``tbd/twg_w_cls_s<stride>``
TWG_PREFIX = "tbd/twg_w_cls_s"
AP_KEY = "bbox/AP"
HARMONY_KEY = "harmony/harmonious_share"

Series = tuple[np.ndarray, np.ndarray]  # (iterations, values), sorted by iteration, finite values only


class RunDataError(ValueError):
    """A run folder that cannot be plotted; the message says what is missing and what to pass."""


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class RunCurves:
    """The scalars of one run, by key: ``{key: {iteration: value}}`` (a resumed run's repeated
    iterations keep the value written last), plus its ``summary.json`` if there is one."""

    name: str
    folder: Path
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    summary: dict[str, Any] | None = None

    def series(self, key: str) -> Series:
        points = self.scalars.get(key, {})
        its = np.asarray(sorted(points), dtype=np.int64)
        return its, np.asarray([points[i] for i in its], dtype=np.float64)

    def keys(self) -> list[str]:
        return sorted(self.scalars)

    def detection_loss(self, prefix: str = "") -> Series:
        """Sum of the detector's own losses (``loss_*`` except HD, TFD and the peers' mimic loss) per
        logged iteration: the loss a run without a teacher would also have. ``prefix`` reads a
        baseline's (``baseline/``)."""
        keys = [
            k
            for k in self.scalars
            if k.startswith(f"{prefix}loss_") and k[len(prefix) :] not in DISTILL_LOSSES
        ]
        if not keys:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        common_its = sorted(set.intersection(*(set(self.scalars[k]) for k in keys)))
        its = np.asarray(common_its, dtype=np.int64)
        return its, np.asarray([sum(self.scalars[k][i] for k in keys) for i in common_its], dtype=np.float64)

    def twg_levels(self) -> dict[int, Series]:
        """TWG's classification weight ω_c per FPN stride (ω_r = 1 − ω_c)."""
        out = {}
        for key in self.scalars:
            if key.startswith(TWG_PREFIX) and key[len(TWG_PREFIX) :].isdigit():
                out[int(key[len(TWG_PREFIX) :])] = self.series(key)
        return dict(sorted(out.items()))

    def evaluations(self, prefix: str = "") -> Series:
        """AP per evaluation (the periodic ones and the final one), NaN evaluations left out."""
        return self.series(f"{prefix}{AP_KEY}")

    def last_iteration(self) -> int | None:
        its = [i for points in self.scalars.values() for i in points]
        return max(its) if its else None

    def summary_harmony(self, role: str) -> dict[str, Any] | None:
        """The harmony measurement of ``summary.json``'s ``role`` ("student" or "teacher")."""
        block = (self.summary or {}).get(role) or {}
        harmony = block.get("harmony")
        return harmony if isinstance(harmony, dict) and "easy_iou_shares" in harmony else None


def load_run(folder: str | Path, name: str | None = None) -> RunCurves:
    """Read ``folder/metrics.json`` (required) and ``folder/summary.json`` (optional)."""
    path = Path(folder)
    if not path.is_dir():
        raise RunDataError(
            f"run folder {path} does not exist; pass a folder written by tbd train or tbd distill (--output)"
        )
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise RunDataError(
            f"{path} has no {METRICS_FILE}: it is not a tbd train / tbd distill output folder, or its "
            "training has not logged yet (Detectron2 writes it every 20 iterations)"
        )
    run = RunCurves(name=name or path.resolve().name, folder=path)
    lines = metrics.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # the last line of a run that is still writing
            raise RunDataError(f"{metrics}: line {number} is not JSON ({err})") from err
        iteration = row.get("iteration") if isinstance(row, dict) else None
        if not isinstance(iteration, int):
            continue
        for key, value in row.items():
            v = _finite(value)
            if key != "iteration" and v is not None:
                run.scalars.setdefault(key, {})[iteration] = v
    summary = path / SUMMARY_FILE
    if summary.is_file():
        try:
            run.summary = json.loads(summary.read_text())
        except json.JSONDecodeError as err:
            raise RunDataError(f"{summary} is not valid JSON ({err})") from err
    return run


# --------------------------------------------------------------------------- figures
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colour(k: int) -> Any:
    return _pyplot().get_cmap("tab10").colors[k % 10]


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8, wrap=True)


def training_figure(runs: Sequence[RunCurves]) -> Any:
    """Four panels over iterations: the detection loss, HD, the feature loss (TFD, or a peer's mimic
    loss) and TWG's ω_c (mean over FPN levels, the band spans the levels). One colour per run; a
    ``baseline/`` run beside a distillation run is dashed in the same colour."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11.0, 7.5), dpi=110, sharex=True)
    det, hd, tfd, twg = axes.flat
    det.set_title("detection loss (the detector's own losses, summed)")
    hd.set_title("harmony distillation (loss_hd = α·L_HD)")
    tfd.set_title("feature distillation (loss_tfd = β·L_TFD, or loss_mimic)")
    twg.set_title("TWG classification weight ω_c (ω_r = 1 − ω_c)")
    for ax, label in ((det, "loss"), (hd, "loss"), (tfd, "loss"), (twg, "ω_c")):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in (tfd, twg):
        ax.set_xlabel("iteration")
    for k, run in enumerate(runs):
        c = _colour(k)
        its, values = run.detection_loss()
        if its.size:
            det.plot(its, values, color=c, label=run.name)
        its, values = run.detection_loss(BASELINE_PREFIX)
        if its.size:
            det.plot(its, values, color=c, linestyle="--", label=f"{run.name}: baseline")
        its, values = run.series("loss_hd")
        if its.size:
            hd.plot(its, values, color=c, label=run.name)
        for key in ("loss_tfd", "loss_mimic"):
            its, values = run.series(key)
            if its.size:
                tfd.plot(its, values, color=c, label=f"{run.name} ({key})")
        levels = run.twg_levels()
        if levels:
            common_its = sorted(set.intersection(*(set(s[0].tolist()) for s in levels.values())))
            stack = np.asarray([[run.scalars[f"{TWG_PREFIX}{s}"][i] for i in common_its] for s in levels])
            twg.plot(
                common_its, stack.mean(axis=0), color=c, label=f"{run.name} (mean of {len(levels)} levels)"
            )
            twg.fill_between(common_its, stack.min(axis=0), stack.max(axis=0), color=c, alpha=0.15)
    empty = {
        det: "no detector losses (loss_*) in metrics.json",
        hd: "no loss_hd: no harmony distillation in these runs\n(tbd train, a peer method, or DISTILL.HD_WEIGHT 0)",
        tfd: "no loss_tfd / loss_mimic: no feature distillation in these runs",
        twg: "no TWG weights: TFD without TWG (DISTILL.TFD_MODE fixed) or no TFD",
    }
    for ax, text in empty.items():
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            _note(ax, text)
    if twg.lines:
        twg.set_ylim(0.0, 1.0)
    fig.suptitle("training: " + ", ".join(r.name for r in runs), fontsize=11)
    fig.tight_layout()
    return fig


@dataclass
class EvaluationNotes:
    """What the evaluation figure could not show, per run (for the console and the tests)."""

    lines: list[str] = field(default_factory=list)


def evaluation_figure(runs: Sequence[RunCurves], notes: EvaluationNotes | None = None) -> Any:
    """AP (left axis) and harmonious share (right axis, %) per evaluation, all runs on one axes.

    Per run: AP of every evaluation in ``metrics.json`` (solid, circles), its ``baseline/`` AP if
    logged (dashed), the harmonious share of every evaluation that measured it (dotted, squares)
    or else ``summary.json``'s final one (a diamond at the last iteration), and the teacher's AP
    from ``summary.json`` as a horizontal line. ``notes`` collects what was missing.
    """
    plt = _pyplot()
    notes = notes if notes is not None else EvaluationNotes()
    fig, ax = plt.subplots(figsize=(9.0, 5.2), dpi=110)
    share_ax = ax.twinx()
    teachers: dict[tuple[str, float], int] = {}
    for k, run in enumerate(runs):
        c = _colour(k)
        its, ap = run.evaluations()
        if its.size:
            ax.plot(its, ap, color=c, marker="o", label=f"{run.name}: AP")
        if its.size == 0:
            notes.lines.append(
                f"{run.name}: no evaluation with a defined AP in metrics.json (an unfinished run, or a "
                "model that detected nothing)"
            )
        elif its.size == 1:
            notes.lines.append(
                f"{run.name}: evaluated once (at iteration {int(its[0]) + 1}): no curve; pass "
                "--eval-period N to tbd train / tbd distill to evaluate every N iterations"
            )
        b_its, b_ap = run.evaluations(BASELINE_PREFIX)
        if b_its.size:
            ax.plot(b_its, b_ap, color=c, marker="o", linestyle="--", label=f"{run.name}: baseline AP")
        h_its, share = run.series(HARMONY_KEY)
        final = run.summary_harmony("student")
        if h_its.size:
            share_ax.plot(
                h_its,
                100.0 * share,
                color=c,
                marker="s",
                linestyle=":",
                markerfacecolor="none",
                label=f"{run.name}: harmonious %",
            )
        elif (
            final is not None
            and final.get("harmonious_share") is not None
            and run.last_iteration() is not None
        ):
            share_ax.plot(
                [run.last_iteration()],
                [100.0 * final["harmonious_share"]],
                color=c,
                marker="D",
                markersize=8,
                markerfacecolor="none",
                linestyle="none",
                label=f"{run.name}: harmonious % (final)",
            )
        else:
            notes.lines.append(f"{run.name}: no harmonious share (metrics.json nor summary.json)")
        bh_its, b_share = run.series(BASELINE_PREFIX + HARMONY_KEY)
        if bh_its.size:
            share_ax.plot(
                bh_its,
                100.0 * b_share,
                color=c,
                marker="s",
                linestyle="-.",
                alpha=0.7,
                label=f"{run.name}: baseline harmonious %",
            )
        teacher = (run.summary or {}).get("teacher") or {}
        t_ap = _finite((teacher.get("bbox") or {}).get("AP"))
        if t_ap is not None:
            teachers.setdefault((str(teacher.get("name", "teacher")), round(t_ap, 3)), k)
    for (name, t_ap), k in teachers.items():
        ax.axhline(
            t_ap,
            color=_colour(k),
            linestyle=(0, (1, 3)),
            linewidth=1.2,
            label=f"teacher {name}: {t_ap:.1f} AP",
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("AP (COCO, %)")
    share_ax.set_ylabel("harmonious share of easily classified predictions (%)")
    share_ax.set_ylim(0.0, 102.0)  # a 100 % point stays visible
    ax.set_ylim(bottom=0.0)
    ax.grid(alpha=0.3)
    ax.set_title("evaluation: AP (left) and harmonious share (right) per evaluation", fontsize=10)
    handles = ax.get_legend_handles_labels()
    share_handles = share_ax.get_legend_handles_labels()
    if handles[0] or share_handles[0]:
        ax.legend(
            handles[0] + share_handles[0],
            handles[1] + share_handles[1],
            fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.13),
            ncol=2,
            frameon=False,
        )
    if not ax.lines and not share_ax.lines:
        _note(ax, "no evaluation in these runs' metrics.json or summary.json")
    if notes.lines:
        fig.text(0.01, 0.005, "\n".join(notes.lines), fontsize=7, va="bottom", ha="left", color="0.3")
    fig.tight_layout(rect=(0.0, min(0.3, 0.04 * len(notes.lines)), 1.0, 1.0))
    return fig


_SHARE_PREFIX = "easy_iou_share-"


def alone_harmony(run: RunCurves) -> dict[str, Any] | None:
    """The student trained alone's IoU histogram (``summary.json``'s ``student_alone``, logged at the
    last evaluation as flat ``easy_iou_share-a-b`` scalars) in the form of a harmony summary, when
    it was measured with the same thresholds and bins as the distilled student's."""
    from tbd.analysis.harmony import THRESHOLD_KEYS

    student = run.summary_harmony("student")
    alone = ((run.summary or {}).get("student_alone") or {}).get("harmony")
    if student is None or not isinstance(alone, dict):
        return None
    bins = []
    for key, value in alone.items():
        if key.startswith(_SHARE_PREFIX):
            low, high = key[len(_SHARE_PREFIX) :].split("-")
            bins.append(((float(low), float(high)), value))
    bins.sort()
    edges = [bins[0][0][0], *(high for (_, high), _ in bins)] if bins else []
    same = edges == [float(e) for e in student["bin_edges"]] and all(
        alone.get(k) == student[k] for k in ("score_thresh", "iou_thresh", "score_floor")
    )
    if not same:
        return None
    return {
        **{k: student[k] for k in THRESHOLD_KEYS},
        "easy_iou_shares": [value for _, value in bins],
        "harmonious_share": alone.get("harmonious_share"),
        "num_easy": int(alone.get("num_easy") or 0),
        "mean_hs": alone.get("mean_hs"),
    }


def harmony_summaries(runs: Sequence[RunCurves]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The IoU histograms of ``summary.json`` to draw: each distinct teacher once, then each student.

    Returns (``{label: harmony summary}``, notes about runs without one)."""
    found: dict[str, dict[str, Any]] = {}
    notes = []
    teachers_seen: set[tuple[str, str]] = set()
    for run in runs:
        teacher = (run.summary or {}).get("teacher") or {}
        t_h = run.summary_harmony("teacher")
        key = (str(teacher.get("name")), str(teacher.get("config")))
        if t_h is not None and key not in teachers_seen:
            teachers_seen.add(key)
            found[f"teacher {teacher.get('name', '?')}"] = t_h
    for run in runs:
        s_h = run.summary_harmony("student")
        if s_h is not None:
            found[run.name] = s_h
            a_h = alone_harmony(run)
            if a_h is not None:  # --with-baseline: the same student trained alone, beside it
                found[f"{run.name}: student alone"] = a_h
        elif run.summary is None:
            notes.append(
                f"{run.name}: no {SUMMARY_FILE} (tbd distill writes it; for a tbd train run use tbd harmony --run)"
            )
        else:
            notes.append(f"{run.name}: {SUMMARY_FILE} has no harmony measurement (run without --no-harmony)")
    return found, notes


def group_by_thresholds(summaries: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Mapping[str, Any]]]:
    """Split the summaries into groups measured with the same thresholds (one figure each)."""
    from tbd.analysis.harmony import thresholds_of

    groups: list[tuple[dict[str, Any], dict[str, Mapping[str, Any]]]] = []
    for name, summary in summaries.items():
        t = thresholds_of(summary)
        for thresholds, members in groups:
            if thresholds == t:
                members[name] = summary
                break
        else:
            groups.append((t, {name: summary}))
    return [members for _, members in groups]


def save_figure(fig: Any, stem: Path, formats: Sequence[str]) -> list[Path]:
    """Write ``fig`` as ``stem.<fmt>`` for each format and close it; returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    _pyplot().close(fig)
    return paths
