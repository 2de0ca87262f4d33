"""``log.txt`` in a run directory: Detectron2's and tbd's log lines, written while the run goes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tbd.cli.common import setup_logging
from tbd.cli.main import main
from tbd.engine.trainer import GuardedTrainer

ROOT = Path(__file__).resolve().parent.parent


def _train_argv(out: Path, data_dir: Path, iters: int) -> list[str]:
    return [
        "train", "--model", "r18", "--head", "retinanet", "--output", str(out),
        "--data-dir", str(data_dir), "--num-train-images", "8", "--num-val-images", "2",
        "--batch-size", "2", "--iters", str(iters), "--device", "cpu",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip


def test_training_run_writes_log_txt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TBD_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "run"
    assert main(_train_argv(out, tmp_path / "data", iters=2)) == 0
    text = (out / "log.txt").read_text()
    assert "detectron2.engine.train_loop INFO: Starting training from iteration 0" in text
    assert "Saving checkpoint to" in text and "model_final.pth" in text
    assert "Evaluation results for" in text  # the final COCO evaluation


def test_second_run_in_one_process_logs_into_its_own_directory(tmp_path: Path) -> None:
    first, second = tmp_path / "teacher", tmp_path / "student"
    log = logging.getLogger("tbd.test_run_log")
    setup_logging(first)
    log.info("line of the first run")
    setup_logging(second)
    log.info("line of the second run")
    assert "line of the first run" in (first / "log.txt").read_text()
    assert "second run" not in (first / "log.txt").read_text()
    assert "line of the second run" in (second / "log.txt").read_text()


def test_log_holds_the_error_after_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TBD_DATA_DIR", str(tmp_path / "data"))
    real_step = GuardedTrainer.run_step

    def failing_step(self: GuardedTrainer) -> None:
        if self.iter == 1:
            raise RuntimeError("injected failure in step 1")
        real_step(self)

    monkeypatch.setattr(GuardedTrainer, "run_step", failing_step)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        main(_train_argv(out, tmp_path / "data", iters=3))
    text = (out / "log.txt").read_text()
    assert "Starting training from iteration 0" in text
    assert "RuntimeError: injected failure in step 1" in text


def test_log_is_flushed_while_running_and_kept_after_kill_9(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TBD_DATA_DIR": str(tmp_path / "data"),
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "tbd.cli.main", *_train_argv(out, tmp_path / "data", iters=500)]
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        log = out / "log.txt"
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and "Starting training from iteration 0" in log.read_text():
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before the check"
        assert "Starting training from iteration 0" in log.read_text()  # written while it runs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert "Starting training from iteration 0" in (out / "log.txt").read_text()
