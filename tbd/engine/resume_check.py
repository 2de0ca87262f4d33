"""``--resume`` continues the stored run: which config keys may change, and the check of the rest.

A resumed run loads the stored checkpoints, so a config that describes another model, other data or
another distillation would make the folder lie about its checkpoints (and usually crash on loading
them). The keys below may change between the first start and a resume; every other key of the new
config must equal the stored ``config.yaml`` (keys the stored file lacks, added by a later tbd
version, are not compared).
"""

from __future__ import annotations

from typing import Any

from detectron2.config import CfgNode

#: may differ on resume: where and on what it runs, how often it evaluates, loader workers
RESUMABLE_KEYS: frozenset[str] = frozenset(
    {
        "OUTPUT_DIR",
        "MODEL.DEVICE",
        "TEST.EVAL_PERIOD",
        "DATALOADER.NUM_WORKERS",
        "SOLVER.MAX_ITER",
    }
)

#: follow ``SOLVER.MAX_ITER`` when ``--iters`` extends the schedule (tbd.run_config.set_iterations)
SCHEDULE_KEYS: frozenset[str] = frozenset(
    {"SOLVER.STEPS", "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD", "MODEL.TAL.WARMUP_ITERS"}
)

#: what a run is: with no record of the run's arguments (an earlier tbd version), only these are
#: compared, and everything else comes from the stored config
IDENTITY_PREFIXES: tuple[str, ...] = ("MODEL.", "DATASETS.", "DISTILL.", "INPUT.")


def flat(node: CfgNode, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a config by dotted key, sequences as lists (a YAML list equals a tuple)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def allowed_changes(stored: CfgNode, new: CfgNode) -> frozenset[str]:
    """Keys that may differ: :data:`RESUMABLE_KEYS`, plus the schedule's when MAX_ITER changed."""
    if stored.SOLVER.MAX_ITER != new.SOLVER.MAX_ITER:
        return RESUMABLE_KEYS | SCHEDULE_KEYS
    return RESUMABLE_KEYS


def config_differences(
    stored: CfgNode, new: CfgNode, only_prefixes: tuple[str, ...] | None = None
) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, new value)`` for every key that a resume may not change."""
    old_flat, new_flat = flat(stored), flat(new)
    allowed = allowed_changes(stored, new)
    diffs = []
    for key in sorted(old_flat.keys() & new_flat.keys()):
        if key in allowed or old_flat[key] == new_flat[key]:
            continue
        if key == "MODEL.WEIGHTS":  # the initial weights: a resume loads the checkpoint instead
            continue
        if only_prefixes is not None and not key.startswith(only_prefixes):
            continue
        diffs.append((key, old_flat[key], new_flat[key]))
    return diffs


def describe_differences(folder: str, diffs: list[tuple[str, Any, Any]]) -> str:
    lines = [f"--resume: the command describes another run than the one stored in {folder}/config.yaml:"]
    for key, old, new in diffs:
        lines.append(f"  {key}: stored {old!r}, now {new!r}")
    lines.append(
        "A resume continues the stored run: give the same settings (or leave them out: settings not "
        "given come from the stored run). To start this new run, pass --overwrite (only tbd's files are "
        "removed) or choose another --output. Keys that may change on resume: "
        + ", ".join(sorted(RESUMABLE_KEYS - {"OUTPUT_DIR"}))
        + " (docs/CONFIG.md)."
    )
    return "\n".join(lines)


def resumed_config(stored: CfgNode, new: CfgNode, given_keys: set[str]) -> CfgNode:
    """The stored config with the allowed keys that the user set anew (a run of an earlier tbd
    version, whose arguments were not recorded)."""
    cfg = stored.clone()
    new_flat = flat(new)
    keys = set(given_keys) & RESUMABLE_KEYS
    if "SOLVER.MAX_ITER" in keys and new.SOLVER.MAX_ITER != stored.SOLVER.MAX_ITER:
        keys |= SCHEDULE_KEYS
    cfg.defrost()
    for key in sorted(keys):
        if key not in new_flat:
            continue
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf in node:
            value = new_flat[key]
            node[leaf] = tuple(value) if isinstance(node[leaf], tuple) else value
    return cfg
