"""Every ``tbd ...`` command written in README.md, docs/*.md and the Makefile parses with tbd's parser.

A renamed or removed flag, a student, head or teacher name that no longer exists, or a config key
in trailing ``KEY VALUE`` overrides that tbd's config does not have, fails here instead of in a
user's terminal. Commands in fenced blocks must parse completely; inline mentions (`` `tbd eval
--run` ``) may leave out required arguments and the value of their last flag, nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex

import pytest

from tbd.cli.main import build_parser
from tbd.config import PROJECT_ROOT, get_cfg
from tbd.registry import HEAD_CONFIGS, STUDENT_NAMES, load_teachers

DOCS = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
_COMMAND = re.compile(r"^\s*(?:\$ )?(?:\.venv/bin/)?tbd(?:\s|$)")


def _fenced_commands(text: str) -> list[str]:
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if _COMMAND.match(line):
                found.append(line.split(" #", 1)[0].strip())
    return found


def _inline_commands(text: str) -> list[str]:
    without_blocks = re.sub(r"```.*?```", "", text, flags=re.S)
    return [" ".join(s.split()) for s in re.findall(r"`((?:\.venv/bin/)?tbd [^`]+)`", without_blocks)]


def _makefile_commands() -> list[str]:
    """The Makefile's ``tbd`` lines with its variables (``$(DEMO_ARGS)``) expanded."""
    text = re.sub(r"\\\n\s*", " ", (PROJECT_ROOT / "Makefile").read_text())
    variables = dict(re.findall(r"^(\w+)\s*\?=\s*(.*)$", text, flags=re.M))
    lines = [ln.strip() for ln in text.splitlines() if re.search(r"/bin/tbd ", ln)]

    def expand(line: str) -> str:  # as make does: a variable's value may name others
        for _ in range(10):
            expanded = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
            if expanded == line:
                break
            line = expanded
        return line

    return [expand(ln) for ln in lines]


def _cases() -> list[tuple[str, str, bool]]:
    cases = []
    for path in DOCS:
        text = path.read_text()
        cases += [(path.name, cmd, True) for cmd in _fenced_commands(text)]
        cases += [(path.name, cmd, False) for cmd in _inline_commands(text)]
    cases += [("Makefile", cmd, True) for cmd in _makefile_commands()]
    return cases


CASES = _cases()


def _parser() -> argparse.ArgumentParser:
    """tbd's parser, with abbreviations off: ``--weig`` must not stand in for ``--weights``."""
    parser = build_parser()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for p in parsers:
        p.allow_abbrev = False
    return parser


def _argv(command: str) -> list[str]:
    words = shlex.split(command.replace("...", " "))
    words = words[1:]  # the program: tbd or .venv/bin/tbd (or the Makefile's $(VENV)/bin/tbd)
    return [w for w in words if not w.startswith("$")]  # shell variables ($DATA) stand for arguments


_CONFIG_KEYS: set[str] = set()


def _config_keys() -> set[str]:
    if not _CONFIG_KEYS:

        def walk(node: object, prefix: str = "") -> None:
            for key, value in node.items():  # type: ignore[attr-defined]
                if hasattr(value, "items"):
                    walk(value, f"{prefix}{key}.")
                else:
                    _CONFIG_KEYS.add(f"{prefix}{key}")

        walk(get_cfg())
    return _CONFIG_KEYS


def check_command(command: str, complete: bool) -> None:
    """Parse ``command`` as the ``tbd`` executable would; raise AssertionError naming what is wrong."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = _parser().parse_args(_argv(command))
    except SystemExit as exit_:
        message = stderr.getvalue().strip().splitlines()[-1:] or [""]
        if exit_.code == 0:  # --help, --version
            return
        if not complete and re.search(
            r"arguments are required|expected (at least )?one argument", message[0]
        ):
            return  # an inline mention of a command or a flag (`tbd eval --run`), not a whole command
        raise AssertionError(f"`{command}` does not parse: {message[0]}") from None
    if getattr(args, "student", None) is not None:
        assert args.student in STUDENT_NAMES or args.student.endswith(".yaml"), (
            f"`{command}`: unknown student {args.student!r}"
        )
    if getattr(args, "head", None) is not None:
        assert args.head in HEAD_CONFIGS, f"`{command}`: unknown head {args.head!r}"
    if getattr(args, "teacher", None) is not None:
        assert args.teacher in load_teachers(), f"`{command}`: unknown teacher {args.teacher!r}"
    opts = [o for o in getattr(args, "opts", None) or [] if o != "--"]
    assert len(opts) % 2 == 0, f"`{command}`: overrides come in KEY VALUE pairs: {opts}"
    for key in opts[::2]:
        assert not key.startswith("-"), f"`{command}`: option {key} after the KEY VALUE overrides"
        assert key in _config_keys(), f"`{command}`: {key} is not a config key"


def test_the_docs_hold_commands_to_check() -> None:
    assert PROJECT_ROOT / "README.md" in DOCS and len(DOCS) >= 10
    sources = {source for source, _, _ in CASES}
    assert {"README.md", "COCO.md", "HARMONY.md", "Makefile"} <= sources
    assert sum(complete for _, _, complete in CASES) >= 20


@pytest.mark.parametrize(("source", "command", "complete"), CASES, ids=[f"{s}:{c[:60]}" for s, c, _ in CASES])
def test_documented_command_parses(source: str, command: str, complete: bool) -> None:
    check_command(command, complete)


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ("tbd train --student-weights w.pth", "unrecognized arguments: --student-weights"),
        ("tbd train --weig w.pth", "unrecognized arguments: --weig"),
        ("tbd distill --teacher r102", "unknown teacher"),
        ("tbd distill --student r19", "unknown student"),
        ("tbd train --head yolo", "unknown head"),
        ("tbd distill --profile tiny", "invalid choice"),
        ("tbd distill -- SOLVER.NOPE 1", "is not a config key"),
        ("tbd distill SOLVER.BASE_LR 0.1 --iters 3", "after the KEY VALUE overrides"),
        ("tbd exportt --run x", "invalid choice"),
    ],
)
def test_a_wrong_command_is_caught(command: str, problem: str) -> None:
    for complete in (True, False):
        with pytest.raises(AssertionError, match=problem):
            check_command(command, complete)


def test_an_inline_mention_may_leave_out_required_arguments_and_values_only() -> None:
    check_command("tbd export", complete=False)
    check_command("tbd eval --run", complete=False)
    with pytest.raises(AssertionError, match="required"):
        check_command("tbd export", complete=True)
    with pytest.raises(AssertionError, match="expected one argument"):
        check_command("tbd eval --run", complete=True)
