"""The description of the machine a run ran on (``tbd.engine.environment``), kept in ``tbd_run.json``."""

from __future__ import annotations

from pathlib import Path

import torch

from tbd.cli.runrecord import machine_change_warning
from tbd.engine.environment import cpu_name, describe_environment, numeric_differences

_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1

processor\t: 1
cpu family\t: 23
model name\t: Another one
"""


def test_cpu_name_gives_the_first_processors_generation(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(_CPUINFO)
    assert cpu_name(info) == "AMD EPYC (cpu family 25, model 1, stepping 1)"


def test_cpu_name_without_cpuinfo_still_names_something(tmp_path: Path) -> None:
    assert cpu_name(tmp_path / "missing")


def test_description_of_this_machine() -> None:
    env = describe_environment("cpu")
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["gpu"] is None and env["detectron2"] and env["cpu_kernels"]


def test_only_what_changes_the_numbers_counts() -> None:
    here = describe_environment("cpu")
    assert numeric_differences(here, dict(here)) == []
    assert numeric_differences(here, {**here, "python": "2.7"}) == []
    diffs = numeric_differences(here, {**here, "cpu": "other", "threads": 64})
    assert diffs == [("cpu", here["cpu"], "other"), ("threads", here["threads"], 64)]


def test_resume_warning_names_what_changed() -> None:
    here = describe_environment("cpu")
    assert machine_change_warning({"environment": here}, "cpu") is None
    assert machine_change_warning({}, "cpu") is None  # a record written before the description
    warning = machine_change_warning({"environment": {**here, "torch": "1.0"}}, "cpu")
    assert warning is not None and f"torch: 1.0 then, {torch.__version__} now" in warning
