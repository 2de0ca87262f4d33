"""A run remembers its data: the dataset arguments it was started with, in ``<run>/data.json``.

``tbd eval --run`` and ``tbd harmony --run`` re-register that data in a new process (a user json is
validated again), so a run trained on ``--train-json/--val-json`` or on a reduced embedded dataset
is evaluated on what it was trained for, not on whatever the config's dataset name means here.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from tbd.cli.common import UsageError

DATA_FILE = "data.json"
#: the dataset arguments of ``tbd.cli.common.add_dataset_args``
DATA_KEYS = (
    "dataset",
    "train_json",
    "train_images",
    "val_json",
    "val_images",
    "data_dir",
    "num_train_images",
    "num_val_images",
)
_PATH_KEYS = ("train_json", "train_images", "val_json", "val_images", "data_dir")
_NAMING_KEYS = ("dataset", "train_json", "val_json")


def data_given(args: argparse.Namespace) -> bool:
    """Did the user name a dataset on this command line?"""
    return any(getattr(args, k, None) for k in _NAMING_KEYS)


def data_record(args: argparse.Namespace) -> dict[str, Any]:
    """The run's dataset arguments, paths made absolute (what ``data.json`` holds)."""
    record: dict[str, Any] = {}
    for key in DATA_KEYS:
        value = getattr(args, key, None)
        if key == "data_dir" and not value:
            value = os.environ.get("TBD_DATA_DIR") or None
        if value is not None and key in _PATH_KEYS:
            value = str(Path(value).expanduser().resolve())
        record[key] = value
    return record


def record_data(out: Path, args: argparse.Namespace) -> None:
    """Write the run's dataset arguments (paths made absolute) to ``out/data.json``."""
    from tbd.engine.checkpoint import atomic_write_text

    atomic_write_text(out / DATA_FILE, json.dumps(data_record(args), indent=2) + "\n")


def read_data(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / DATA_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err}); delete it and pass the dataset flags") from err
    return {k: record.get(k) for k in DATA_KEYS}


def restore_data(args: argparse.Namespace, run_dirs: list[Path]) -> None:
    """Unless the user named a dataset, take the recorded data of ``run_dirs`` (which must agree)."""
    if data_given(args):
        return
    records = {d: r for d in run_dirs if (r := read_data(d)) is not None}
    distinct = {json.dumps(r, sort_keys=True) for r in records.values()}
    if len(distinct) > 1:
        raise UsageError(
            f"the runs {', '.join(str(d) for d in records)} were trained on different data (see their "
            f"{DATA_FILE}): name the data to measure on with --dataset or --val-json/--val-images"
        )
    if not records:
        return
    for key, value in next(iter(records.values())).items():
        if value is not None:
            setattr(args, key, value)
