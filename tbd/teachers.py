"""Teachers: a registry name or a config + weights pair resolved, trained here once and cached.

``tbd distill`` and a Detectron2 script (``examples/train_net.py``) resolve their teacher here:

- :func:`resolve_teacher`: ``(config, weights)`` from a config + checkpoint pair, or from the
  registry (``teachers/*.yaml``, ``tbd teachers``): its weights (model zoo on COCO), or on the
  embedded dataset a teacher trained here by :func:`train_teacher_here` and kept in the cache;
- :func:`teacher_key`: the cache key, a hash of every setting that shapes the teacher;
  :func:`equivalent_cached_teacher` finds one cached by an earlier tbd version.

The options are an ``argparse.Namespace`` named like ``tbd distill``'s flags.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from detectron2.config import CfgNode

from tbd.run_config import apply_common, check_batch_per_process, flat_items, set_num_classes
from tbd.ui import UsageError, console

#: ``fit(cfg, args)``: train ``cfg`` into ``cfg.OUTPUT_DIR`` (resuming when ``args.resume``)
Fit = Callable[[CfgNode, argparse.Namespace], Any]


SHAPES_NUM_TRAIN = 2000


def cache_root(args: argparse.Namespace) -> Path:
    if getattr(args, "teacher_cache", None):
        return Path(args.teacher_cache)
    return Path(os.environ.get("TBD_CACHE", Path.home() / ".cache" / "tbd")) / "teachers"


def resolve_teacher(
    args: argparse.Namespace, train: str, test: str, fit: Fit | None = None
) -> tuple[Path, str]:
    """(teacher config, teacher weights): from flags, the registry, or by training it here.

    ``args``: ``teacher`` (a registry name), or ``teacher_config`` with ``teacher_weights``
    (``teacher_weights`` alone overrides the registry's); optional ``teacher_iters``,
    ``teacher_cache``, ``num_train_images`` and what :func:`train_teacher_here` reads. ``fit``
    trains a teacher the registry does not ship weights for (default :func:`fit_in_process`).
    """
    from tbd.config import resolve_config_path
    from tbd.registry import RegistryError, dataset_key, teacher_spec

    if getattr(args, "teacher_config", None):
        if not args.teacher_weights:
            raise UsageError("--teacher-config needs --teacher-weights (the checkpoint of that teacher)")
        try:
            config = resolve_config_path(args.teacher_config)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from err
        return config, _local_weights(args.teacher_weights)
    try:
        spec, entry = teacher_spec(args.teacher, dataset_key(train))
    except RegistryError as err:
        hint = ""
        if dataset_key(train).startswith("user_"):
            hint = (
                ". For your own data, train a teacher on it first, e.g. `tbd train --model r101 --head "
                "retinanet --train-json ... --output runs/teacher`, then pass --teacher-config "
                "runs/teacher/config.yaml --teacher-weights runs/teacher/model_final.pth"
            )
        raise UsageError(f"{err}{hint}") from err
    if getattr(args, "teacher_weights", None):
        return spec.config, _local_weights(args.teacher_weights)
    if not entry.trains_here:
        return spec.config, entry.weights
    iters = getattr(args, "teacher_iters", None) or entry.train_iters or 3000
    return spec.config, train_teacher_here(args, spec, iters, train, test, fit or fit_in_process)


def _local_weights(path: str) -> str:
    if "://" not in path and not Path(path).is_file():
        raise UsageError(f"--teacher-weights {path} does not exist")
    return path


def train_teacher_here(
    args: argparse.Namespace, spec: Any, iters: int, train: str, test: str, fit: Fit
) -> str:
    """Train (or finish training, or reuse) the cached teacher for this dataset and schedule.

    ``args``: the run's options (:func:`tbd.run_config.apply_common`; the teacher gets their
    device and data, its own schedule, seed 0 and no overrides), ``num_gpus`` and
    ``num_machines``. ``fit(cfg, args)`` trains ``cfg`` into ``cfg.OUTPUT_DIR``.
    """
    from tbd.config import load_config
    from tbd.data import TRAIN_NAME

    cfg = load_config(spec.config, spec.opts)
    targs = argparse.Namespace(**vars(args))
    targs.iters, targs.opts, targs.resume, targs.lr, targs.eval_period = iters, [], False, None, 0
    targs.seed = 0  # one teacher for every student seed (the benchmarks compare seeds against it)
    apply_common(cfg, targs, train, test)
    num_train = getattr(args, "num_train_images", SHAPES_NUM_TRAIN)
    data_tag = f"{train}{num_train}" if train == TRAIN_NAME else train
    # the key holds everything that shapes the teacher (data version, schedule, solver, seed)
    out = cache_root(args) / f"{spec.name}_{data_tag}_{iters}it_{teacher_key(cfg)}"
    final = out / "model_final.pth"
    if final.is_file():
        console.print(f"teacher [bold]{spec.name}[/]: using the cached checkpoint {final}")
        prune_periodic_checkpoints(out)  # a cache from a tbd version that kept them
        return str(final)
    earlier = equivalent_cached_teacher(out, cfg)
    if earlier is not None:
        console.print(
            f"teacher [bold]{spec.name}[/]: using the cached checkpoint {earlier} (trained with the "
            "same settings by an earlier tbd version, whose config lacked keys added since)"
        )
        return str(earlier)
    resume = (out / "last_checkpoint").is_file()
    console.print(
        f"teacher [bold]{spec.name}[/] has no checkpoint for {train}: "
        f"{'resuming' if resume else 'training'} it here ({iters} iterations) -> {out}"
    )
    from tbd.data import GENERATOR_VERSION
    from tbd.engine.checkpoint import atomic_write_text

    targs.resume = resume
    check_batch_per_process(cfg, getattr(args, "num_gpus", 1) * getattr(args, "num_machines", 1))
    cfg.OUTPUT_DIR = str(out)
    if resume:
        _check_cached_teacher_resume(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / GENERATOR_MARKER, f"{GENERATOR_VERSION}\n")
    atomic_write_text(out / "config.yaml", cfg.dump())
    fit(cfg, targs)
    if not final.is_file():
        raise UsageError(f"training the teacher did not produce {final}; see {out / 'log.txt'}")
    prune_periodic_checkpoints(out)
    return str(final)


def prune_periodic_checkpoints(out: Path) -> list[Path]:
    """Deletes a finished cached teacher's periodic checkpoints (``model_<7 digits>.pth``), which
    only served its resume: the cache then holds one checkpoint per teacher, not one per
    ``SOLVER.CHECKPOINT_PERIOD``. Only in tbd's own cache folder, only once ``model_final.pth`` is
    there and ``last_checkpoint`` names it. Returns what it deleted."""
    pointer = out / "last_checkpoint"
    if pointer.is_file() and pointer.read_text().strip() != "model_final.pth":
        return []
    if not (out / "model_final.pth").is_file():
        return []
    gone = sorted(p for p in out.glob("model_*.pth") if re.fullmatch(r"model_\d{7}\.pth", p.name))
    for path in gone:
        path.unlink(missing_ok=True)  # another process of the same launch may have been first
    return gone


def _check_cached_teacher_resume(out: Path, cfg: CfgNode) -> None:
    """A half-trained cached teacher is continued only if its stored config is this one."""
    from tbd.config import load_config
    from tbd.engine.resume_check import config_differences

    stored = out / "config.yaml"
    try:
        diffs = config_differences(load_config(stored), cfg) if stored.is_file() else []
    except Exception:  # unreadable by this version: not provably the same teacher
        diffs = [("config.yaml", "unreadable", "")]
    if diffs:
        listed = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, a, b in diffs)
        raise UsageError(
            f"the half-trained teacher in {out} was started with other settings ({listed}); remove that "
            "cache folder (or pass --teacher-cache elsewhere) to train it anew"
        )


_NOT_TEACHER_KEYS = ("OUTPUT_DIR", "MODEL.DEVICE")  # where and on what it trains


def teacher_settings(cfg: CfgNode) -> dict[str, Any]:
    """Every config value that shapes a teacher's training, by dotted key.

    The distillation keys (and their defaults) do not train a teacher, nor do the output folder and
    the device (a teacher trained on the GPU serves a CPU run too).
    """
    from tbd.engine.resume_check import flat

    return {
        key: value
        for key, value in flat(cfg).items()
        if key not in _NOT_TEACHER_KEYS and not key.startswith("DISTILL.")
    }


def teacher_key(cfg: CfgNode) -> str:
    """Short hash of a teacher's training settings and of the embedded dataset's generator version.

    Hashed from sorted (key, value) pairs, not from ``cfg.dump()``: a dump's text depends on which
    lists happen to be shared objects (YAML anchors), which says nothing about the teacher.
    """
    from tbd.data import GENERATOR_VERSION

    text = json.dumps(teacher_settings(cfg), sort_keys=True, default=str)
    return hashlib.sha1(f"{text}\nshapes v{GENERATOR_VERSION}".encode()).hexdigest()[:8]


def equivalent_cached_teacher(out: Path, cfg: CfgNode) -> Path | None:
    """A finished teacher of the same name, data and schedule trained with the same settings.

    The cache key changes whenever a tbd release adds config keys, so without this an upgrade would
    retrain every cached teacher. A sibling folder qualifies when every key its stored config.yaml
    sets has today's value (keys added since are not in that file and are ignored; a default that
    changed since is in it and still tells the two apart).
    """
    import yaml

    from tbd.config import load_config
    from tbd.data import GENERATOR_VERSION

    want = teacher_settings(cfg)
    stem = out.name.rsplit("_", 1)[0]
    for candidate in sorted(out.parent.glob(f"{stem}_*")):
        final, stored = candidate / "model_final.pth", candidate / "config.yaml"
        if candidate == out or not (final.is_file() and stored.is_file()):
            continue
        if _stored_generator_version(candidate) != GENERATOR_VERSION:
            continue  # unknown or another embedded dataset: not provably the same teacher
        try:
            written = yaml.safe_load(stored.read_text())
            earlier = teacher_settings(load_config(stored))
        except Exception:  # a key removed since, or an unreadable file: not this teacher
            continue
        keys = [k for k in _yaml_keys(written) if k in earlier]
        if keys and all(k in want and want[k] == earlier[k] for k in keys):
            return final
    return None


def _yaml_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix[:-1]] if prefix else []
    return [k for key, value in node.items() for k in _yaml_keys(value, f"{prefix}{key}.")]


GENERATOR_MARKER = "generator_version.txt"


def _stored_generator_version(folder: Path) -> int | None:
    """The embedded dataset's generator version a cached teacher was trained with, if known.

    Teachers trained since this marker exists record it; older ones named the dataset's folder
    (``tbd_shapes/v<version>-...``) in their log.
    """
    import re

    try:
        return int((folder / GENERATOR_MARKER).read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        found = re.search(r"tbd_shapes/v(\d+)-", (folder / "log.txt").read_text(errors="replace"))
    except OSError:
        return None
    return int(found.group(1)) if found else None


def fit_in_process(cfg: CfgNode, args: argparse.Namespace) -> None:
    """Train ``cfg`` in this process with tbd's trainer, seeded as ``tbd train`` seeds it (the datasets
    it names must be registered). ``tbd distill`` passes its own (logging, several processes)."""
    from detectron2.utils.env import seed_all_rng

    from tbd.engine.trainer import Trainer

    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()


def distill_config(
    student: CfgNode,
    teacher_config: Path | str,
    teacher_weights: str,
    test: str,
    teacher_amp: str | None = None,
    with_baseline: bool = False,
    output: Path | str | None = None,
    opts: list[str] | None = None,
) -> CfgNode:
    """The distillation config: ``student`` (changed in place) with its teacher attached.

    The teacher's config is adapted to the data the same way (class count of ``test``, the
    student's device): the differences go to ``DISTILL.TEACHER_OPTS``. ``with_baseline`` sets
    ``DISTILL.WITH_BASELINE`` (the student trained alone beside it). ``opts`` (KEY VALUE, the
    user's overrides) come last, so they can set ``DISTILL.*``; a ``DISTILL.TEACHER_OPTS`` among
    them is appended to the data's.
    """
    from tbd.config import load_config
    from tbd.data import num_classes
    from tbd.distill.config import student_defaults

    cfg = student
    student_arch = cfg.MODEL.META_ARCHITECTURE
    t_cfg = load_config(teacher_config)
    before = dict(flat_items(t_cfg))
    set_num_classes(t_cfg, num_classes(test))
    t_cfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    teacher_opts = [x for k, v in flat_items(t_cfg) if before.get(k) != v for x in (k, str(v))]

    cfg.MODEL.META_ARCHITECTURE = "TBDistiller"
    cfg.DISTILL.STUDENT_META_ARCHITECTURE = student_arch
    cfg.DISTILL.TEACHER_CONFIG = str(teacher_config)
    cfg.DISTILL.TEACHER_WEIGHTS = teacher_weights
    cfg.DISTILL.TEACHER_OPTS = teacher_opts
    if teacher_amp is not None:
        cfg.DISTILL.TEACHER_AMP = teacher_amp
    if with_baseline:
        cfg.DISTILL.WITH_BASELINE = True
    student_defaults(
        cfg
    )  # beta and gate measured for the student's init and profile; the user's opts still win
    if output is not None:
        cfg.OUTPUT_DIR = str(output)
    if opts:
        cfg.merge_from_list(opts)
        if "DISTILL.TEACHER_OPTS" in opts[::2]:  # the user's teacher overrides come after the data's
            cfg.DISTILL.TEACHER_OPTS = teacher_opts + list(cfg.DISTILL.TEACHER_OPTS)
    return cfg
