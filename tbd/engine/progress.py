"""Rich terminal progress for Detectron2 training: iteration, ETA, every loss."""

from __future__ import annotations

import time
from typing import Any

from detectron2.engine import HookBase
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tbd.distill.keys import DISTILL_LOSSES


def format_losses(latest: dict[str, tuple[float, int]], keys: list[str] | None = None) -> str:
    """``loss_a 0.123  loss_b 0.456`` from an ``EventStorage.latest()`` dict."""
    names = keys if keys is not None else sorted(k for k in latest if k.startswith("loss"))
    return "  ".join(f"{k.removeprefix('loss_')} {latest[k][0]:.3f}" for k in names if k in latest)


def distill_share(latest: dict[str, tuple[float, int]]) -> float | None:
    """Fraction of the total loss that comes from the distillation terms (TBD's or a peer's), if any."""
    losses = {k: v[0] for k, v in latest.items() if k.startswith("loss")}
    distill = sum(v for k, v in losses.items() if k in DISTILL_LOSSES)
    total = sum(losses.values())
    if not distill or total <= 0:
        return None
    return distill / total


class RichProgressHook(HookBase):
    """Shows a live progress bar on a terminal, or prints a line every ``period`` iterations.

    It reads what the model and Detectron2's trainer put into the ``EventStorage``.
    """

    def __init__(self, max_iter: int, period: int = 20, console: Console | None = None) -> None:
        self._max_iter = max_iter
        self._period = max(1, period)
        self._console = console or Console()
        self._live = self._console.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None
        self._t0 = 0.0
        self._start_iter = 0

    def before_train(self) -> None:
        self._start_iter = self.trainer.start_iter
        self._t0 = time.perf_counter()
        if self._live:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self._console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self._max_iter, completed=self._start_iter, info=""
            )

    def _line(self, it: int) -> str:
        latest = self.trainer.storage.latest()
        done = it + 1 - self._start_iter
        elapsed = time.perf_counter() - self._t0
        per_it = elapsed / max(done, 1)
        eta = per_it * (self._max_iter - it - 1)
        parts = [format_losses(latest)]
        share = distill_share(latest)
        if share is not None:
            parts.append(f"distill {100 * share:.0f}%")
        if "lr" in latest:
            parts.append(f"lr {latest['lr'][0]:.2e}")
        parts.append(f"{per_it:.2f} s/it")
        if not self._live:
            parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        return "  ".join(p for p in parts if p)

    def after_step(self) -> None:
        it = self.trainer.iter
        last = it + 1 >= self._max_iter
        if self._progress is not None:
            info = self._line(it) if (it % self._period == 0 or last) else None
            if info is not None:
                self._progress.update(self._task, completed=it + 1, info=info)
            else:
                self._progress.update(self._task, completed=it + 1)
        elif (it + 1) % self._period == 0 or last:
            self._console.print(f"iter {it + 1}/{self._max_iter}  {self._line(it)}", highlight=False)

    def after_train(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
