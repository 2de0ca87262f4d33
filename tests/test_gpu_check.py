"""scripts/gpu_check.py: its --smoke path (the same code as on a GPU, on CPU at tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
assert _spec and _spec.loader
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_smoke_runs_every_case_and_writes_one_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "check.json"
    result = gpu_check.run(gpu_check.parse_args(["--smoke", "--batches", "2", "--out", str(out)]))
    saved = json.loads(out.read_text())
    assert saved["meta"]["mode"].startswith("smoke") and saved["meta"]["device"] == "cpu"
    rows = saved["rows"]
    assert [r["case"] for r in rows] == [
        "student step",
        "teacher fwd fp32",
        "teacher fwd fp16",
        "teacher fwd bf16",
        "distill step",
        *["p_r fwd+bwd", "TAL assign", "DW loss fwd+bwd"] * 2,
    ]
    assert [r["gts_per_image"] for r in rows[5:]] == [5, 5, 5, 20, 20, 20]
    for r in rows:
        assert "error" not in r, r
        assert r["time_s"] > 0
    assert rows[0]["images_per_s"] == pytest.approx(2 / rows[0]["time_s"])
    assert result["rows"] == rows
    printed = capsys.readouterr().out
    assert "distill step" in printed and "tbd GPU check" in printed


def test_a_failing_case_is_recorded_not_raised() -> None:
    import torch

    def boom() -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    row = gpu_check.measure("x", boom, torch.device("cpu"), 2, 0, 1)
    assert row["error"].startswith("RuntimeError: CUDA out of memory") and "time_s" not in row


def test_without_a_gpu_the_full_check_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--smoke"):
        gpu_check.run(gpu_check.parse_args([]))
