"""scripts/grad_share.py on a real (tiny) `tbd distill` run: each term's gradient, per parameter group,
relative to the detection loss's, with the run's weights applied as in training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_distill_run

pytestmark = pytest.mark.usefixtures("isolated_cli", "one_torch_thread")

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "grad_share.py"
_spec = importlib.util.spec_from_file_location("grad_share", _PATH)
assert _spec and _spec.loader
grad_share = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(grad_share)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-iteration distillation run on tiny user data: random R-18 RetinaNet teacher, R-18 student."""
    return tiny_distill_run(tmp_path_factory.mktemp("grad_share"))


def _measure(run: Path, tmp_path: Path, name: str, *override: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    grad_share.main(["--run", str(run), "--batches", "1", "--json", str(out), *override])
    return json.loads(out.read_text())


def test_each_term_scales_with_its_own_weight_only(run: Path, tmp_path: Path) -> None:
    stored = (run / "config.yaml").read_text()
    assert "TFD_WEIGHT: 0.4" in stored and "HD_WEIGHT: 1.0" in stored  # R-18 from scratch: β 0.4
    base = _measure(run, tmp_path, "base")
    doubled = _measure(run, tmp_path, "tfd_x2", "DISTILL.TFD_WEIGHT", "0.8")
    student = sum(base["param_counts"].values())
    assert min(base["param_counts"].values()) > 0 and student > 10_000_000  # R-18-FPN + head, all groups
    for group in grad_share.GROUPS:
        b, d = base["rows"][0][group], doubled["rows"][0][group]
        assert b["detection_norm"] > 0
        assert d["detection_norm"] == pytest.approx(b["detection_norm"], rel=1e-6)  # same batch, same weights
        assert d["loss_hd"]["norm_ratio"] == pytest.approx(b["loss_hd"]["norm_ratio"], rel=1e-5)
        assert d["loss_tfd"]["norm_ratio"] == pytest.approx(2 * b["loss_tfd"]["norm_ratio"], rel=1e-5)
        assert d["loss_tfd"]["cos"] == pytest.approx(b["loss_tfd"]["cos"], abs=1e-5)
    assert base["rows"][0]["loss"]["loss_tfd"] > 0 and base["rows"][0]["loss"]["loss_hd"] > 0


def test_feature_distillation_reaches_the_features_not_the_head(run: Path, tmp_path: Path) -> None:
    rows = _measure(run, tmp_path, "base")["rows"][0]
    # L_TFD compares FPN features: it moves the backbone and the FPN, never the student's head
    assert rows["head"]["loss_tfd"]["norm_ratio"] == 0.0
    assert rows["neck"]["loss_tfd"]["norm_ratio"] > 0 and rows["backbone"]["loss_tfd"]["norm_ratio"] > 0
    # L_HD compares head outputs: it moves the head, and through it the features
    assert rows["head"]["loss_hd"]["norm_ratio"] > 0 and rows["neck"]["loss_hd"]["norm_ratio"] > 0


def test_a_term_switched_off_is_not_reported(run: Path, tmp_path: Path) -> None:
    result = _measure(run, tmp_path, "no_hd", "DISTILL.HD_WEIGHT", "0.0")
    assert "loss_hd" not in result["rows"][0]["head"] and "loss_tfd" in result["rows"][0]["head"]
