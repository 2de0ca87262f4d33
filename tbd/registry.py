"""Named models: the teacher registry (``teachers/*.yaml``, one file per teacher) and students.

A teacher file says, per dataset, which Detectron2 config it uses, where its weights come from
(a model-zoo URL, a local path, or ``train`` = train it here and cache it), for a teacher trained
here the initial weights it starts from (``init_weights``, e.g. ``torchvision://mobilenet_v2``;
default: from scratch) and its reported AP.
Students are a backbone (``r18``/``r34``/``r50``/``r101``, ``mnv2``) plus a head (``tal``, ``et``, ``dw``,
``retinanet``, ``fcos``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tbd.config import CONFIG_DIR, PROJECT_ROOT

TEACHER_DIR = PROJECT_ROOT / "teachers"
EMBEDDED_DATASET = "tbd_shapes"


class RegistryError(ValueError):
    """A name or registry file that cannot be used; the message says what to do instead."""


@dataclass(frozen=True)
class TeacherEntry:
    """One teacher on one dataset."""

    config: str
    weights: str  # URL, local path, or "train"
    reported_ap: float | None = None
    train_iters: int | None = None
    #: initial weights of a teacher trained here (``MODEL.WEIGHTS`` of its training); "" = from scratch
    init_weights: str = ""

    @property
    def trains_here(self) -> bool:
        return self.weights == "train"

    def train_opts(self) -> list[str]:
        """Config overrides of this teacher's training: its initial weights, when it has any."""
        return ["MODEL.WEIGHTS", self.init_weights] if self.trains_here and self.init_weights else []


@dataclass(frozen=True)
class Teacher:
    name: str
    description: str
    datasets: dict[str, TeacherEntry]
    source: Path

    def entry(self, dataset: str) -> TeacherEntry:
        key = dataset_key(dataset)
        if key not in self.datasets:
            known = ", ".join(sorted(self.datasets))
            raise RegistryError(
                f"teacher {self.name!r} has no entry for dataset {key!r} (it has: {known}); "
                "pass --teacher-config and --teacher-weights for your own teacher, "
                f"or add a '{key}' entry to {self.source}"
            )
        return self.datasets[key]


@dataclass(frozen=True)
class ModelSpec:
    """A buildable model: a config file plus override options."""

    name: str
    config: Path
    opts: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def init_weights(self) -> str:
        """The ``MODEL.WEIGHTS`` its ``opts`` set (a registry teacher's initial weights), else ""."""
        pairs = dict(zip(self.opts[::2], self.opts[1::2]))
        return str(pairs.get("MODEL.WEIGHTS", ""))


def dataset_key(dataset: str) -> str:
    """Registry key of a Detectron2 dataset name: ``coco_2017_train`` -> ``coco_2017``."""
    for suffix in ("_train", "_val", "_test"):
        if dataset.endswith(suffix):
            return dataset[: -len(suffix)]
    return dataset


def _parse_teacher(path: Path) -> Teacher:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RegistryError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict) or "name" not in raw or not isinstance(raw.get("datasets"), dict):
        raise RegistryError(f"{path}: a teacher file needs 'name' and a 'datasets' mapping")
    entries: dict[str, TeacherEntry] = {}
    for key, item in raw["datasets"].items():
        if not isinstance(item, dict) or "config" not in item or "weights" not in item:
            raise RegistryError(f"{path}: dataset {key!r} needs 'config' and 'weights'")
        init = item.get("init_weights") or ""
        if init and str(item["weights"]) != "train":
            raise RegistryError(
                f"{path}: dataset {key!r} has init_weights but its weights are not 'train'; initial "
                "weights apply only to a teacher trained here (remove init_weights, or set weights: train)"
            )
        entries[str(key)] = TeacherEntry(
            config=str(item["config"]),
            weights=str(item["weights"]),
            reported_ap=item.get("reported_ap"),
            train_iters=item.get("train_iters"),
            init_weights=str(init),
        )
    return Teacher(
        name=str(raw["name"]),
        description=str(raw.get("description", "")),
        datasets=entries,
        source=path,
    )


def load_teachers(directory: Path | None = None) -> dict[str, Teacher]:
    """Every teacher file of ``directory`` (default: :data:`TEACHER_DIR`, read at call time)."""
    directory = TEACHER_DIR if directory is None else directory
    teachers: dict[str, Teacher] = {}
    for path in sorted(directory.glob("*.yaml")):
        teacher = _parse_teacher(path)
        if teacher.name in teachers:
            raise RegistryError(f"teacher name {teacher.name!r} is defined twice ({path})")
        teachers[teacher.name] = teacher
    return teachers


def get_teacher(name: str, directory: Path | None = None) -> Teacher:
    directory = TEACHER_DIR if directory is None else directory
    teachers = load_teachers(directory)
    if name not in teachers:
        raise RegistryError(
            f"unknown teacher {name!r}; known: {', '.join(sorted(teachers))} "
            f"(see `tbd teachers`, or add a file to {directory})"
        )
    return teachers[name]


#: ResNet student name -> depth
STUDENT_DEPTHS = {"r18": 18, "r34": 34, "r50": 50, "r101": 101}
#: other student backbones: name -> the backbone part of the config names
STUDENT_BACKBONES = {"mnv2": "MNV2"}
#: every student name
STUDENT_NAMES = (*STUDENT_DEPTHS, *STUDENT_BACKBONES)
#: head name -> config file pattern (the R18 config is the base for r18/r34)
HEAD_CONFIGS = {
    "tal": "tood_{backbone}_FPN.yaml",
    "et": "et_{backbone}_FPN.yaml",
    "dw": "dw_{backbone}_FPN.yaml",
    "retinanet": "retinanet_{backbone}_FPN.yaml",
    "fcos": "fcos_{backbone}_FPN.yaml",
    "faster_rcnn": "faster_rcnn_{backbone}_FPN.yaml",
}
DEFAULT_HEAD = "tal"


def student_spec(name: str, head: str = DEFAULT_HEAD) -> ModelSpec:
    """The config for student ``name`` (``r18``, ``r34``, ``r50``, ``r101``, ``mnv2``) with ``head``.

    The config is the embedded-data one; :func:`tbd.profiles.apply_profile` adapts it to COCO or a
    user's data."""
    if name not in STUDENT_NAMES:
        raise RegistryError(f"unknown student {name!r}; known: {', '.join(STUDENT_NAMES)}")
    if head not in HEAD_CONFIGS:
        raise RegistryError(f"unknown head {head!r}; choose one of: {', '.join(HEAD_CONFIGS)}")
    if name in STUDENT_BACKBONES:
        backbone, opts, described = STUDENT_BACKBONES[name], [], "MobileNetV2"
    else:
        depth = STUDENT_DEPTHS[name]
        base_depth = 18 if depth < 50 else depth
        backbone, described = f"R{base_depth}", f"R-{depth}"
        opts = ["MODEL.RESNETS.DEPTH", str(depth)] if depth != base_depth else []
    config = CONFIG_DIR / HEAD_CONFIGS[head].format(backbone=backbone)
    if not config.is_file():
        raise RegistryError(f"head {head!r} has no config for {backbone} ({config} is missing)")
    return ModelSpec(name=f"{name}-{head}", config=config, opts=opts, description=f"{described}-FPN {head}")


def teacher_spec(name: str, dataset: str) -> tuple[ModelSpec, TeacherEntry]:
    """The teacher's config and registry entry on ``dataset``; for a teacher trained here the spec's
    ``opts`` set its initial weights (``MODEL.WEIGHTS``), which enter its cache key like any setting."""
    teacher = get_teacher(name)
    entry = teacher.entry(dataset)
    config = CONFIG_DIR / entry.config
    if not config.is_file():
        raise RegistryError(f"teacher {name!r}: config {config} does not exist (from {teacher.source})")
    spec = ModelSpec(name=name, config=config, opts=entry.train_opts(), description=teacher.description)
    return spec, entry


def resolve_model(name: str, head: str | None = None, dataset: str = EMBEDDED_DATASET) -> ModelSpec:
    """A model named on the command line: a student, a teacher, or a config file path."""
    if name in STUDENT_NAMES:
        return student_spec(name, head or DEFAULT_HEAD)
    teachers = load_teachers()
    if name in teachers:
        return teacher_spec(name, dataset)[0]
    from tbd.config import resolve_config_path

    try:
        return ModelSpec(name=Path(name).stem, config=resolve_config_path(name))
    except FileNotFoundError:
        raise RegistryError(
            f"unknown model {name!r}: not a student ({', '.join(STUDENT_NAMES)}), not a teacher "
            f"({', '.join(sorted(teachers))}) and not a config file"
        ) from None


def describe_teachers() -> list[dict[str, Any]]:
    """Rows for ``tbd teachers``: one per (teacher, dataset)."""
    rows = []
    for teacher in load_teachers().values():
        for key, entry in teacher.datasets.items():
            rows.append(
                {
                    "name": teacher.name,
                    "description": teacher.description,
                    "dataset": key,
                    "config": entry.config,
                    "weights": _weights_text(entry),
                    "reported_ap": entry.reported_ap,
                }
            )
    return rows


def _weights_text(entry: TeacherEntry) -> str:
    if not entry.trains_here:
        return entry.weights
    return f"train here from {entry.init_weights} (cached)" if entry.init_weights else "train here (cached)"
