"""The progress line's loss figures: what counts as distillation, and what the line prints."""

from __future__ import annotations

import pytest

from tbd.engine.progress import distill_share, format_losses


def _latest(**values: float) -> dict[str, tuple[float, int]]:
    return {k.replace("__", "/"): (v, 19) for k, v in values.items()}


def test_distill_share_counts_tbd_and_peer_terms_only() -> None:
    tbd_step = _latest(loss_cls=1.0, loss_box_reg=1.0, loss_hd=0.5, loss_tfd=1.5, lr=0.01)
    assert distill_share(tbd_step) == pytest.approx(0.5)  # (0.5 + 1.5) / 4
    peer_step = _latest(loss_cls=1.0, loss_box_reg=2.0, loss_mimic=1.0)
    assert distill_share(peer_step) == pytest.approx(0.25)  # a peer method's feature term counts too
    assert distill_share(_latest(loss_cls=1.0, loss_box_reg=1.0)) is None  # tbd train: nothing to show
    # the baseline's losses (--with-baseline) are neither distillation nor the student's total
    side_by_side = _latest(loss_cls=1.0, loss_tfd=1.0, baseline__loss_cls=5.0)
    assert distill_share(side_by_side) == pytest.approx(0.5)


def test_format_losses_prints_every_loss_without_its_prefix() -> None:
    latest = _latest(loss_cls=0.1234, loss_hd=0.5, lr=0.01)
    assert format_losses(latest) == "cls 0.123  hd 0.500"
    assert format_losses(latest, ["loss_hd", "loss_missing"]) == "hd 0.500"
