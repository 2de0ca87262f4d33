"""A run's record of its command line (``tbd_run.json``) and the checks of ``--resume`` against it.

``--resume`` is "the same run, continued": the arguments the user leaves out come from the record,
the ones given are checked against the stored ``config.yaml`` and ``data.json`` before anything is
written (``tbd.engine.resume_check``).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any, Sequence

from detectron2.config import CfgNode

import tbd
from tbd import jsonio
from tbd.cli.common import UsageError
from tbd.engine.run_folder import RUN_RECORD

#: arguments that say where and how to start, never restored from a record
_NOT_RECORDED = frozenset(
    {"func", "command", "resume", "overwrite", "output", "profile_info", "given", "command_line"}
)

#: flag destination -> the config keys it sets, for runs without a record (earlier tbd versions)
_FLAG_KEYS = {
    "iters": "SOLVER.MAX_ITER",
    "eval_period": "TEST.EVAL_PERIOD",
    "device": "MODEL.DEVICE",
}


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The argument destinations the user typed on the command line (not argparse's defaults)."""
    saved: list[tuple[Any, str, Any]] = []

    def suppress(p: argparse.ArgumentParser) -> None:
        saved.append((p, "_defaults", dict(p._defaults)))
        p._defaults.clear()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    suppress(sub)
            elif action.default is not argparse.SUPPRESS:
                saved.append((action, "default", action.default))
                action.default = argparse.SUPPRESS

    suppress(parser)
    try:
        ns = parser.parse_args(argv)
    finally:
        for obj, attr, value in reversed(saved):
            if attr == "_defaults":
                obj._defaults.update(value)
            else:
                setattr(obj, attr, value)
    return {k for k, v in vars(ns).items() if k != "command" and v != []}


def _recordable(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_recordable(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def write_run_record(out: Path, args: argparse.Namespace, command: str) -> None:
    """``out/tbd_run.json``: tbd's version, the command and its arguments (all of them, defaults too)."""
    from tbd.engine.checkpoint import atomic_write_text
    from tbd.engine.environment import describe_environment

    record = {
        "tool": "tbd",
        "version": tbd.__version__,
        "command": command,
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "environment": describe_environment(str(getattr(args, "device", "cpu"))),
        "args": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in sorted(vars(args).items())
            if k not in _NOT_RECORDED and _recordable(v)
        },
    }
    atomic_write_text(out / RUN_RECORD, jsonio.dumps(record, indent=2) + "\n")


def read_run_record(folder: Path) -> dict[str, Any] | None:
    path = folder / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(
            f"{path} is not valid JSON ({err}); it records the run's arguments: pass --overwrite to "
            "start again, or choose another --output"
        ) from err
    return record if isinstance(record, dict) else None


def restore_args(args: argparse.Namespace, folder: Path) -> bool:
    """Arguments not given on this command line take the stored run's values; ``False`` when the run
    has no record (an earlier tbd version), in which case its data arguments come from data.json."""
    record = read_run_record(folder)
    given = getattr(args, "given", None)
    if record is None:
        from tbd.cli.rundata import restore_data

        restore_data(args, [folder])
        return False
    for key, value in (record.get("args") or {}).items():
        if key in _NOT_RECORDED or not hasattr(args, key):
            continue
        if given is not None and key in given:
            if key == "opts" and value:  # KEY VALUE overrides add to the stored ones
                args.opts = [*value, *[o for o in args.opts if o != "--"]]
            continue
        setattr(args, key, value)
    warning = machine_change_warning(record, str(getattr(args, "device", "cpu")))
    if warning:
        from tbd.ui import console

        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    return True


def machine_change_warning(record: dict[str, Any], device: str) -> str | None:
    """What differs between the machine that started a run and this one, for ``--resume``; ``None``
    when nothing that changes the numbers does (or the record predates the description)."""
    from tbd.engine.environment import describe_differences, describe_environment, numeric_differences

    stored = record.get("environment")
    if not isinstance(stored, dict):
        return None
    diffs = numeric_differences(stored, describe_environment(device))
    if not diffs:
        return None
    return (
        f"--resume: this run started on another machine or software ({describe_differences(diffs)}). "
        "It continues, but not bit for bit as it would have there, so compare its AP only with runs "
        "made here (the same command and seed gave 13.6 and 14.7 AP on two CPUs: docs/BENCHMARKS.md §1o)"
    )


def resume_config(out: Path, cfg: CfgNode, args: argparse.Namespace, recorded: bool) -> CfgNode:
    """The config of the resumed run, once it is known to continue the stored one (else exit 2).

    ``recorded``: the stored run has a record, so ``cfg`` was rebuilt from the same arguments and every
    key is compared; without one only the model/data/distillation keys are, and the stored config is
    kept with the resumable keys that were given anew.
    """
    from tbd.config import load_config
    from tbd.engine.resume_check import (
        IDENTITY_PREFIXES,
        config_differences,
        describe_differences,
        resumed_config,
    )

    stored_path = out / "config.yaml"
    if not stored_path.is_file():
        raise UsageError(
            f"--resume: {out} has a checkpoint but no config.yaml; pass --overwrite to start again"
        )
    try:
        stored = load_config(stored_path)
    except Exception as err:  # a key removed since, an unreadable file
        raise UsageError(
            f"--resume: the stored {stored_path} cannot be read by this tbd version ({err}); pass "
            "--overwrite to start again, or choose another --output"
        ) from err
    diffs = config_differences(stored, cfg, None if recorded else IDENTITY_PREFIXES)
    diffs += _data_differences(out, args)
    if diffs:
        raise UsageError(describe_differences(str(out), diffs))
    if recorded:
        return cfg
    given = getattr(args, "given", None)
    keys = {key for dest, key in _FLAG_KEYS.items() if given is None or dest in given}
    keys |= {k for k in (getattr(args, "opts", None) or [])[::2] if isinstance(k, str)}
    return resumed_config(stored, cfg, keys)


def _data_differences(out: Path, args: argparse.Namespace) -> list[tuple[str, Any, Any]]:
    from tbd.cli.rundata import data_record, read_data

    stored = read_data(out)
    if stored is None:
        return []
    now = data_record(args)
    return [(f"data: {k}", stored.get(k), now.get(k)) for k in sorted(now) if stored.get(k) != now.get(k)]
