"""``tbd teachers``: the teacher registry as a table."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tbd.cli.common import UsageError, console


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "teachers",
        help="list the registered teachers",
        description=(
            "List the teachers in teachers/ (one YAML file each): per dataset, the Detectron2 config, "
            "where the weights come from (model-zoo URL, local file, or trained here on first use) "
            "and the reported AP. Students: r18, r34, r50, r101, mnv2 with --head tal|et|dw|retinanet|fcos."
        ),
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from tbd import registry

    try:
        rows = registry.describe_teachers()
    except registry.RegistryError as err:
        raise UsageError(str(err)) from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"Teachers ({registry.TEACHER_DIR})")
    for col in ("name", "model", "dataset", "config", "weights", "reported AP"):
        table.add_column(col, overflow="fold")
    for r in rows:
        weights = r["weights"]
        if weights.startswith("detectron2://"):
            weights = "model zoo: " + weights.removeprefix("detectron2://").rsplit("/", 2)[0]
        ap = "" if r["reported_ap"] is None else f"{r['reported_ap']:.1f}"
        table.add_row(r["name"], r["description"], r["dataset"], r["config"], weights, ap)
    console.print(table)
    return 0
