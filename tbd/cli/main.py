"""The ``tbd`` command line."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Sequence

# Detectron2 0.6 on a recent torch triggers deprecation warnings that say nothing to a user.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch")

import tbd  # noqa: E402
from tbd.cli import evaluate, teachers, train  # noqa: E402
from tbd.cli.common import UsageError, console  # noqa: E402

_PENDING = {
    "distill": (
        "distil a student from a teacher (TBD)",
        "Distil a student (e.g. --student r18) from a teacher (e.g. --teacher r101) with "
        "Task-Balanced Distillation.",
    ),
    "harmony": (
        "compare harmonious-prediction ratios of models",
        "Compare the harmonious-prediction ratios of teacher, student and distilled student.",
    ),
    "export": (
        "write a student-only checkpoint for plain Detectron2",
        "Export the distilled student as a checkpoint that plain Detectron2 loads.",
    ),
}


def _not_yet(args: argparse.Namespace) -> int:
    console.print(f"[yellow]`tbd {args.command}` is not available in this version yet.[/]")
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbd",
        description="Task-Balanced Distillation for Detectron2 object detectors.",
    )
    parser.add_argument("--version", action="version", version=f"tbd {tbd.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train.add_parser(sub)
    evaluate.add_parser(sub)
    teachers.add_parser(sub)
    for name, (short, long) in _PENDING.items():
        p = sub.add_parser(name, help=short, description=long)
        p.set_defaults(func=_not_yet)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args: Any = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        console.print(f"[bold red]error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
