"""Run folders: what tbd writes in one, and the only place where tbd deletes anything.

A run folder (``--output``) may hold the user's own files beside a run. tbd therefore knows the
names it writes (:data:`RUN_FILE_PATTERNS`, :data:`RUN_DIRS`) and removes nothing else: an
``--overwrite`` removes the previous run's files and keeps every other file, and a new run refuses
to start where a file of the user's would be overwritten. Every deletion in the package goes through
:func:`remove_owned`, which also refuses to touch ``/``, the home directory, the current directory,
their parents, or anything outside the folder it was given.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

#: written first by every run of the CLI: marks the folder as a tbd run and records its arguments
RUN_RECORD = "tbd_run.json"

#: files a run writes at the top of its folder (tbd's own, Detectron2's checkpointer and writers)
RUN_FILE_PATTERNS: tuple[str, ...] = (
    RUN_RECORD,
    "config.yaml",
    "data.json",
    "last_checkpoint",
    "model_*.pth",
    "metrics.json",
    "events.out.tfevents.*",
    "log.txt",
    "log.txt.rank*",
    "results.json",
    "summary.json",
    "eval_results.json",
    "harmony.json",
    "harmony.png",
    "harmony.svg",
    ".*.tmp",  # atomic saves killed half-way (tbd.engine.checkpoint)
    ".tbd-write-test.*",
)

#: folders a run creates inside its folder, with the kinds of file written in them (recursively)
RUN_DIRS: dict[str, tuple[str, ...]] = {
    "inference": ("*.json", "*.pth", "*.lock"),  # Detectron2's COCOEvaluator
    "teacher_eval": ("*.json", "*.pth", "*.lock"),
    "teacher_eval_own_size": ("*.json", "*.pth", "*.lock"),
    "baseline_eval": ("*.json", "*.pth", "*.lock"),
    "export": ("model_student.pth", "config_student.yaml", ".*.tmp"),
    "plots": ("*.png", "*.svg"),
}

#: what marks a run worth keeping (or resuming): a checkpoint
CHECKPOINT_PATTERNS = ("model_final.pth", "last_checkpoint", "model_*.pth")


class RunFolderError(Exception):
    """The folder cannot be used as asked; the message says why and what to do."""


class UnsafeDeletionError(RunFolderError):
    """A deletion was asked for outside tbd's files (a bug, never a user's mistake)."""


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def protected_places() -> list[Path]:
    """Folders that are never a run folder nor deleted from: ``/``, home, the current directory
    and every parent of the latter two."""
    places = {Path("/").resolve()}
    for base in (Path.home(), Path.cwd()):
        base = base.resolve()
        places.add(base)
        places.update(base.parents)
    return sorted(places)


def check_output_location(folder: str | Path) -> Path:
    """Refuse an ``--output`` that is ``/``, the home directory, the current directory or a parent of
    one of them (a run there would mix with everything else in it); return it resolved."""
    resolved = Path(folder).expanduser().resolve()
    if resolved in protected_places():
        what = (
            "the file system root"
            if resolved == Path("/").resolve()
            else "your home directory"
            if resolved == Path.home().resolve()
            else "the current directory"
            if resolved == Path.cwd().resolve()
            else "a parent of the current directory or of your home directory"
        )
        raise RunFolderError(
            f"--output {folder} is {what} ({resolved}); a run needs a folder of its own: pass e.g. "
            f"--output {Path(folder) / 'runs' / 'my_run'}"
        )
    return resolved


def _owned_in_dir(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _matches(p.name, patterns))


def run_files(folder: str | Path) -> list[Path]:
    """Every file of ``folder`` that a tbd run writes (top-level names and tbd's sub-folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_file() and _matches(p.name, RUN_FILE_PATTERNS)]
    for name, patterns in RUN_DIRS.items():
        sub = folder / name
        if sub.is_dir() and not sub.is_symlink():
            found.extend(_owned_in_dir(sub, patterns))
    return sorted(found)


def other_files(folder: str | Path) -> list[Path]:
    """What ``folder`` holds besides tbd's files: the user's, never touched (files and folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ours = set(run_files(folder))
    others: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name in RUN_DIRS and entry.is_dir() and not entry.is_symlink():
            others.extend(p for p in sorted(entry.rglob("*")) if p.is_file() and p not in ours)
        elif entry not in ours:
            others.append(entry)
    return others


def has_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any(any(folder.glob(p)) for p in CHECKPOINT_PATTERNS)


def remove_owned(paths: Iterable[Path], inside: str | Path, recursive: bool = False) -> list[Path]:
    """Delete ``paths``, each strictly inside the folder ``inside``: the one deletion of the package.

    Refuses (``UnsafeDeletionError``) a path outside ``inside``, ``inside`` itself, and any protected
    place (:func:`protected_places`), so that no caller's mistake can remove a user's folder.
    Folders are removed only with ``recursive=True`` (a folder tbd created and filled itself, e.g. a
    half-written data cache) and never through a symbolic link. Returns what was removed.
    """
    root = Path(inside).resolve()
    protected = set(protected_places())
    removed: list[Path] = []
    for path in paths:
        path = Path(path)
        # the link itself is what is removed, never where it points: resolve the parent only
        target = path.parent.resolve() / path.name
        if target == root or root not in target.parents:
            raise UnsafeDeletionError(f"refusing to delete {path}: it is not inside {root}")
        if target in protected or path.resolve() in protected:
            raise UnsafeDeletionError(f"refusing to delete {path}: a protected folder")
        if path.is_dir() and not path.is_symlink():
            if not recursive:
                raise UnsafeDeletionError(f"refusing to delete the folder {path} (not recursive)")
            shutil.rmtree(path)
        else:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
        removed.append(path)
    return removed


def _remove_empty_dirs(folder: Path) -> None:
    """tbd's sub-folders left empty once their files are gone (deepest first)."""
    for name in RUN_DIRS:
        sub = folder / name
        if not sub.is_dir() or sub.is_symlink():
            continue
        for d in sorted((p for p in sub.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            if not any(d.iterdir()):
                d.rmdir()
        if not any(sub.iterdir()):
            sub.rmdir()


def clear_run(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """Remove a previous run's files from ``folder`` (``--overwrite``); keep the folder and every other
    file. Returns (removed, kept)."""
    folder = Path(folder)
    removed = remove_owned(run_files(folder), folder)
    _remove_empty_dirs(folder)
    return removed, other_files(folder)


#: files of a run without a checkpoint that are cleared before the next attempt (appending to them
#: would mix two runs); its log.txt stays and says why it stopped
ATTEMPT_FILES = ("metrics.json", "events.out.tfevents.*")


def clear_failed_attempt(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and _matches(p.name, ATTEMPT_FILES)]
    return remove_owned(stale, folder)


@dataclass
class OutputPlan:
    """What starting a run in ``folder`` will do, decided (and checked) before anything is written."""

    folder: Path
    resume: bool
    overwrite: bool
    has_run: bool = False
    finished: bool = False


def plan_output(folder: str | Path, resume: bool, overwrite: bool) -> OutputPlan:
    """Check ``--output``/``--resume``/``--overwrite`` against the folder without touching it."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other; pass one")
    given = Path(folder)
    resolved = check_output_location(given)
    if resolved.exists() and not resolved.is_dir():
        raise RunFolderError(f"--output {given} is a file, not a folder; choose another --output")
    plan = OutputPlan(folder=given, resume=resume, overwrite=overwrite)
    plan.has_run = has_checkpoint(given)
    plan.finished = (given / "model_final.pth").is_file()
    if plan.has_run and not (resume or overwrite):
        what = "a finished run" if plan.finished else "an unfinished run"
        raise RunFolderError(
            f"{given} already holds {what}. Pass --resume to continue it, --overwrite to replace it "
            "(only tbd's files are removed), or choose another --output"
        )
    if resume and not (given / "last_checkpoint").is_file():
        raise RunFolderError(f"--resume: {given} has no checkpoint to resume from (no last_checkpoint file)")
    if not plan.has_run and not (given / RUN_RECORD).is_file() and given.is_dir():
        # not a tbd run: an entry at one of tbd's names is the user's and would be overwritten
        collisions = sorted(
            p.name
            for p in given.iterdir()
            if not p.name.startswith(".")
            and (p.name in RUN_DIRS or (p.is_file() and _matches(p.name, RUN_FILE_PATTERNS)))
        )
        if collisions:
            raise RunFolderError(
                f"{given} is not a tbd run but holds {', '.join(collisions)}, which a run would overwrite; "
                "choose another --output (an empty or new folder)"
            )
    _check_writable(given)
    return plan


def _check_writable(folder: Path) -> None:
    """The folder, or the nearest existing parent it would be created in, must be writable."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunFolderError(
            f"cannot write to the output folder {folder} ({probe} is not writable); choose a writable "
            "--output (a read-only file system, or a folder you may not write to?)"
        )


def apply_output_plan(plan: OutputPlan) -> list[str]:
    """Prepare the folder once every input check has passed; returns lines to print."""
    lines: list[str] = []
    folder = plan.folder
    if plan.has_run and plan.overwrite:
        removed, kept = clear_run(folder)
        lines.append(f"{folder}: removed {len(removed)} file(s) of the previous run")
        if kept:
            shown = ", ".join(str(p.relative_to(folder)) for p in kept[:8])
            more = f" and {len(kept) - 8} more" if len(kept) > 8 else ""
            lines.append(f"{folder}: kept {len(kept)} file(s) that tbd did not write: {shown}{more}")
    elif not plan.has_run and not plan.resume:
        stale = clear_failed_attempt(folder)
        if stale:
            lines.append(
                f"{folder}: removed {', '.join(p.name for p in stale)} of an earlier attempt that stopped "
                "before its first checkpoint"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".tbd-write-test.{os.getpid()}"
        probe.write_bytes(b"")
        remove_owned([probe], folder)
    except OSError as err:
        raise RunFolderError(
            f"cannot write to the output folder {folder} ({err.strerror or err}); choose a writable "
            "--output (a read-only file system, or a folder you may not write to?)"
        ) from err
    return lines
