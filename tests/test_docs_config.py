"""Every config key tbd adds is documented in docs/*.md, and every tbd key the docs name exists.

A key counts as documented when a doc names it whole (`` `MODEL.TAL.TOPK` ``), or names its
section and the rest of it in the key column of a table (`` `ATSS.TOPK` `` in a doc about
``MODEL.AUX_HEADS``; `` `ATSS.CLS_LOSS_WEIGHT` / `GIOU_LOSS_WEIGHT` `` for several keys of a row).
"""

from __future__ import annotations

import re

from detectron2.config import get_cfg as detectron2_cfg

from tbd.config import PROJECT_ROOT, get_cfg

#: sections whose every key must be documented (MODEL.CODETR keeps its reasons beside each key in
#: tbd/modeling/codetr/config.py, which docs/CODETR.md points to)
SECTIONS = (
    "TBD",
    "DISTILL",
    "MODEL.FCOS",
    "MODEL.TAL",
    "MODEL.TOOD",
    "MODEL.ETHEAD",
    "MODEL.DW",
    "MODEL.MOBILENET",
    "MODEL.AUX_HEADS",
)


def _flat(node: object, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():  # type: ignore[attr-defined]
        if hasattr(value, "items"):
            keys += _flat(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _docs() -> dict[str, str]:
    return {
        p.name: p.read_text() for p in [PROJECT_ROOT / "README.md", *(PROJECT_ROOT / "docs").glob("*.md")]
    }


def _documented(key: str, docs: dict[str, str]) -> bool:
    for text in docs.values():
        if re.search(rf"`{re.escape(key)}`", text):
            return True
        for section in SECTIONS:
            if not (key.startswith(section + ".") and section in text):
                continue
            rest = key[len(section) + 1 :]
            parent, _, leaf = rest.rpartition(".")
            for row in re.findall(r"^\|([^|\n]*)\|", text, flags=re.M):  # the key column of a table
                if f"`{rest}`" in row or (parent and f"`{parent}." in row and f"`{leaf}`" in row):
                    return True  # `ATSS.TOPK`, or `ATSS.CLS_LOSS_WEIGHT` / `GIOU_LOSS_WEIGHT`
    return False


def test_every_key_tbd_adds_is_documented() -> None:
    docs = _docs()
    tbd_keys = set(_flat(get_cfg())) - set(_flat(detectron2_cfg()))
    checked = [k for k in sorted(tbd_keys) if k.startswith(tuple(s + "." for s in SECTIONS))]
    assert len(checked) > 100
    missing = [k for k in checked if not _documented(k, docs)]
    assert not missing, f"config keys documented nowhere in README.md or docs/*.md: {missing}"
    assert _documented("SOLVER.OPTIMIZER", docs)


def test_every_tbd_key_the_docs_name_exists() -> None:
    keys = set(_flat(get_cfg()))
    sections = {k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1)}
    pattern = re.compile(
        r"`((?:TBD|DISTILL|MODEL\.(?:FCOS|TAL|TOOD|ETHEAD|DW|MOBILENET|AUX_HEADS))\.[A-Z0-9_.]*[A-Z0-9_])"
    )
    named = {(name, m) for name, text in _docs().items() for m in pattern.findall(text)}
    unknown = sorted((name, key) for name, key in named if key not in keys and key not in sections)
    assert not unknown, f"the docs name config keys that do not exist: {unknown}"


def test_an_undocumented_key_is_caught() -> None:
    docs = _docs()
    assert _documented("MODEL.TAL.TOPK", docs) and _documented("MODEL.AUX_HEADS.ATSS.TOPK", docs)
    assert not _documented("MODEL.TAL.NOT_A_KEY", docs)
    assert not _documented("TBD.NOT_A_KEY", {"x.md": "| `TBD.DATA_DIR` | |\n| `NOT_A_KEY_ELSEWHERE` | |"})


def test_every_test_the_docs_cite_exists() -> None:
    """docs/ERRORS.md and others name the test of each behaviour (`test_file::test_name`)."""
    cited = {(f, t) for text in _docs().values() for f, t in re.findall(r"(test_\w+)::(test_\w+)", text)}
    assert len(cited) > 30
    missing = []
    for file, test in sorted(cited):
        path = PROJECT_ROOT / "tests" / f"{file}.py"
        if not path.is_file() or not re.search(rf"^def {test}\(", path.read_text(), flags=re.M):
            missing.append(f"{file}::{test}")
    assert not missing, f"the docs cite tests that do not exist: {missing}"
