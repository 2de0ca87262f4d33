"""The ``tbd`` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, Sequence

import tbd
from tbd.cli import distill, evaluate, export, harmony, plot, teachers, train
from tbd.cli.common import UsageError, close_run_log, console, quiet_warnings
from tbd.cli.runrecord import given_dests


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbd",
        description="Task-Balanced Distillation for Detectron2 object detectors.",
    )
    parser.add_argument("--version", action="version", version=f"tbd {tbd.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    distill.add_parser(sub)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    export.add_parser(sub)
    teachers.add_parser(sub)
    harmony.add_parser(sub)
    plot.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_warnings()
    parser = build_parser()
    args: Any = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    words = list(sys.argv[1:] if argv is None else argv)
    args.given = given_dests(build_parser(), words)  # --resume takes the rest from the stored run
    args.command_line = " ".join(["tbd", *(shlex.quote(w) for w in words)])
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        return 2
    except Exception as err:
        from tbd.data.images import image_read_message, is_image_read_error

        if not is_image_read_error(err):
            raise
        # an image outside validation's decode sample (raised in a loader worker or launched process)
        console.print(f"[bold red]error:[/] {image_read_message(err)}", soft_wrap=True)
        return 2
    finally:
        close_run_log()


if __name__ == "__main__":
    sys.exit(main())
