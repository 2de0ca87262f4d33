"""One markdown table from the runs of several ``bench_accuracy.py`` studies.

Each row is ``LABEL=ACCURACY_JSON:VARIANT``: the runs of that variant (every seed) in that
``accuracy.json`` (written by ``scripts/bench_accuracy.py``). Prints, per row, the seed count, mean ±
sample std of AP / AP50 / AP75 and of the harmonious share at score >= 0.3, the median step time and
the AP of every seed, e.g. for the auxiliary-head study (docs/BENCHMARKS.md):

    python scripts/accuracy_table.py "student=docs/results/accuracy_600it.json:baseline" \
        "+ atss=runs/acc600_aux_atss/accuracy.json:baseline"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("AP", "AP50", "AP75")


def parse_row(text: str) -> tuple[str, Path, str]:
    label, sep, rest = text.partition("=")
    path, sep2, variant = rest.rpartition(":")
    if not (sep and sep2 and label and path and variant):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=ACCURACY_JSON:VARIANT")
    return label, Path(path), variant


def runs_of(path: Path, variant: str) -> list[dict[str, Any]]:
    runs = json.loads(path.read_text())["runs"]
    keys = sorted(k for k in runs if k.rsplit("/", 1)[0] == variant)
    return [runs[k] for k in keys]


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def row(label: str, runs: list[dict[str, Any]]) -> str:
    cells = [label, str(len(runs))]
    for col in COLUMNS:
        cells.append(mean_std([r["student"][col] for r in runs]))
    shares = [r["student"].get("harmonious_share@0.3") for r in runs]
    cells.append(mean_std([100 * s for s in shares if s is not None]))
    steps = [r["training"]["step_s"] for r in runs if r.get("training", {}).get("step_s")]
    cells.append(f"{statistics.median(steps):.2f}" if steps else "-")
    cells.append(" / ".join(f"{r['student']['AP']:.1f}" for r in runs))
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rows", nargs="+", type=parse_row, help="LABEL=ACCURACY_JSON:VARIANT")
    args = parser.parse_args(argv)
    header = ["student", "seeds", *COLUMNS, "harm. % @0.3", "step (s, median)", "AP per seed"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, path, variant in args.rows:
        runs = runs_of(path, variant)
        if not runs:
            print(f"no runs of {variant!r} in {path}", file=sys.stderr)
            return 2
        print(row(label, runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
