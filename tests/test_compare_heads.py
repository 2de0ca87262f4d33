"""scripts/compare_heads.py: per-run override parsing and the shared schedule."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "compare_heads.py"
_spec = importlib.util.spec_from_file_location("compare_heads", _PATH)
assert _spec and _spec.loader
compare_heads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_heads)


def test_split_spec_keeps_commas_inside_brackets() -> None:
    name, opts = compare_heads.split_spec("dw_R18_FPN:MODEL.DW.BOX_REFINEMENT=False,SOLVER.STEPS=(10, 20)")
    assert name == "dw_R18_FPN"
    assert opts == ["MODEL.DW.BOX_REFINEMENT", "False", "SOLVER.STEPS", "(10, 20)"]
    assert compare_heads.split_spec("tood_R18_FPN") == ("tood_R18_FPN", [])


def test_split_spec_rejects_an_override_without_value() -> None:
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        compare_heads.split_spec("fcos_R18_FPN:MODEL.FCOS.NORM")


def test_one_schedule_for_every_run() -> None:
    opts = compare_heads.schedule_opts(600, 8)
    pairs = dict(zip(opts[::2], opts[1::2]))
    assert pairs["SOLVER.MAX_ITER"] == "600"
    assert pairs["SOLVER.STEPS"] == "(438, 540)"  # 73 % and 90 %
    assert pairs["SOLVER.WARMUP_ITERS"] == "40"
    assert pairs["SOLVER.IMS_PER_BATCH"] == "8"
    assert pairs["TEST.EVAL_PERIOD"] == "0"
