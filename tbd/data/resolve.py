"""From what the user asked for (nothing, a registered name, or json + images) to registered names."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

from tbd.data.shapes import TRAIN_NAME, VAL_NAME, register_shapes, shapes_root
from tbd.data.validate import DatasetError, DatasetReport, load_user_coco

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "tbd_shapes"
_REPORTS: dict[str, DatasetReport] = {}


def dataset_report(name: str) -> DatasetReport | None:
    """The validation report of a dataset registered from a user's json (``None`` for others)."""
    return _REPORTS.get(name)


def _catalogs() -> tuple[Any, Any]:
    # Importing detectron2.data registers Detectron2's builtin datasets (coco_2017_train, ...).
    from detectron2.data import DatasetCatalog, MetadataCatalog

    return DatasetCatalog, MetadataCatalog


def _builtin_hint() -> str:
    value = os.environ.get("DETECTRON2_DATASETS")
    now = (
        f"DETECTRON2_DATASETS={value!r}"
        if value
        else f"DETECTRON2_DATASETS is unset, so ./datasets under {os.getcwd()}"
    )
    return (
        f"Detectron2 finds its builtin datasets under $DETECTRON2_DATASETS ({now}). Put the data there "
        "(COCO: coco/annotations/instances_train2017.json, instances_val2017.json, coco/train2017/, "
        "coco/val2017/) or export DETECTRON2_DATASETS=/path/to/datasets before starting (it is read when "
        "detectron2.data is first imported); or pass your own json and image directory instead"
    )


def check_registered_files(name: str) -> None:
    """Fail early, with the place looked at, when a registered dataset's files are absent."""
    if name in (TRAIN_NAME, VAL_NAME):  # generated on first use
        return
    _, meta_catalog = _catalogs()
    meta = meta_catalog.get(name)
    for key, kind in (("json_file", "annotations"), ("image_root", "images"), ("dirname", "data directory")):
        value = getattr(meta, key, None)
        if isinstance(value, str) and value and not os.path.exists(value):
            where = value if os.path.isabs(value) else f"{value} (= {os.path.abspath(value)})"
            raise DatasetError(
                f"dataset {name!r} expects its {kind} at {where}, which does not exist. " + _builtin_hint()
            )


def _unknown_name(dataset: str, registered: list[str]) -> DatasetError:
    stems = {re.sub(r"_(train|val|test|minival|valminusminival)$", "", n) for n in registered}
    pool = sorted(set(registered) | stems | {EMBEDDED_NAME})
    close = difflib.get_close_matches(dataset, pool, n=6, cutoff=0.5)
    lines = [f"unknown dataset {dataset!r}."]
    lines.append(
        f"Close matches: {', '.join(close)}." if close else "No registered dataset has a similar name."
    )
    lines.append(
        f"Use '{EMBEDDED_NAME}' (or no name) for the embedded dataset, a registered name or a prefix with "
        "'<prefix>_train' and '<prefix>_val' registered (e.g. 'coco_2017'), or your own COCO data with "
        "train_json/train_images (and val_json/val_images): --train-json, --train-images, --val-json, "
        "--val-images on the command line."
    )
    return DatasetError(" ".join(lines))


def _user_name(json_file: Path, split: str) -> str:
    stem = re.sub(r"[^0-9A-Za-z]+", "_", json_file.stem).strip("_").lower() or "data"
    return f"user_{stem}_{split}"


def _cache_cleaned(name: str, source: Path, cleaned: Mapping[str, Any]) -> Path:
    """Write the cleaned json (what evaluation must compare against) into the cache; atomic."""
    st = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = shapes_root() / "user" / f"{name}-{key}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cleaned))
    os.replace(tmp, target)
    return target


def register_user_coco(
    json_file: str | os.PathLike, image_root: str | os.PathLike, split: str, name: str | None = None
) -> str:
    """Validate, clean and register a user's COCO json as ``user_<stem>_<split>`` (or ``name``).

    Images without usable annotations are dropped from ``train`` and kept (as negatives) in
    ``val``. Re-registering the same name replaces the old registration. Returns the name.
    """
    dataset_catalog, meta_catalog = _catalogs()
    path = Path(json_file).expanduser()
    name = name or _user_name(path, split)
    role = f"{split}_json"
    dicts, cleaned, report = load_user_coco(
        path, Path(image_root).expanduser(), name, drop_empty=split == "train", role=role
    )
    eval_json = path if report.clean else _cache_cleaned(name, path, cleaned)
    if name in dataset_catalog.list():
        dataset_catalog.remove(name)
        meta_catalog.pop(name, None)
    ids = sorted(c["id"] for c in cleaned["categories"])
    dataset_catalog.register(name, lambda: list(dicts))
    meta_catalog.get(name).set(
        thing_classes=list(report.classes),
        thing_dataset_id_to_contiguous_id={cid: k for k, cid in enumerate(ids)},
        evaluator_type="coco",
        json_file=str(eval_json),
        original_json_file=str(path),
        image_root=str(Path(image_root).expanduser()),
    )
    _REPORTS[name] = report
    return name


def resolve_datasets(
    dataset: str | None = None,
    *,
    train_json: str | os.PathLike | None = None,
    train_images: str | os.PathLike | None = None,
    val_json: str | os.PathLike | None = None,
    val_images: str | os.PathLike | None = None,
    shapes_options: Mapping[str, Any] | None = None,
    need_train: bool = True,
) -> tuple[str, str]:
    """``(train_name, test_name)`` for what the user asked for, registered and checked.

    * nothing (or ``"tbd_shapes"``): the embedded dataset, ``register_shapes(**shapes_options)``;
    * a registered name: used for both; a prefix whose ``_train``/``_val`` are registered: those;
    * ``train_json`` + ``train_images`` (+ ``val_json`` + ``val_images``): validated and registered
      as ``user_<stem>_train`` / ``user_<stem>_val``; without a val json the train set is also the
      test set (a warning says so);
    * ``val_json`` + ``val_images`` alone, when ``need_train`` is false (evaluation, analysis):
      ``(test, test)``.
    """
    user = {
        "train_json": train_json,
        "train_images": train_images,
        "val_json": val_json,
        "val_images": val_images,
    }
    given = [k for k, v in user.items() if v is not None and str(v) != ""]
    if given:
        if dataset and dataset != EMBEDDED_NAME:
            raise DatasetError(
                f"give either a dataset name ({dataset!r}) or json/image paths ({given}), not both"
            )
        for js, ims in (("train_json", "train_images"), ("val_json", "val_images")):
            if (js in given) != (ims in given):
                missing = ims if js in given else js
                raise DatasetError(
                    f"{missing} is missing: {js} and {ims} go together (the json and its image directory)"
                )
        if "train_json" not in given:
            if need_train:
                raise DatasetError(
                    "val_json/val_images were given without train_json/train_images; training needs "
                    "both (evaluation and analysis take val_json/val_images alone)"
                )
            test = register_user_coco(val_json, val_images, "val")  # type: ignore[arg-type]
            return test, test
        train = register_user_coco(train_json, train_images, "train")  # type: ignore[arg-type]
        if "val_json" not in given:
            logger.warning("no val_json given: evaluating on the training set %s", train)
            return train, train
        test = register_user_coco(val_json, val_images, "val")  # type: ignore[arg-type]
        _same_classes(train, test)
        return train, test

    if not dataset or dataset == EMBEDDED_NAME:
        return register_shapes(**dict(shapes_options or {}))
    dataset_catalog, _ = _catalogs()
    registered = dataset_catalog.list()
    if dataset in registered:
        check_registered_files(dataset)
        return dataset, dataset
    pair = (f"{dataset}_train", f"{dataset}_val")
    if all(n in registered for n in pair):
        for n in pair:
            check_registered_files(n)
        return pair
    raise _unknown_name(dataset, registered)


def _same_classes(train: str, test: str) -> None:
    _, meta_catalog = _catalogs()
    a, b = meta_catalog.get(train), meta_catalog.get(test)
    if (a.thing_classes, a.thing_dataset_id_to_contiguous_id) != (
        b.thing_classes,
        b.thing_dataset_id_to_contiguous_id,
    ):
        raise DatasetError(
            f"the train json ({a.original_json_file}) and val json ({b.original_json_file}) define different "
            f"categories ({a.thing_classes} vs {b.thing_classes}); both must list the same ids and names"
        )


def num_classes(dataset_name: str) -> int:
    """Number of classes of a registered dataset (from its metadata's ``thing_classes``)."""
    dataset_catalog, meta_catalog = _catalogs()
    if dataset_name not in dataset_catalog.list():
        raise _unknown_name(dataset_name, dataset_catalog.list())
    classes = getattr(meta_catalog.get(dataset_name), "thing_classes", None)
    if classes is None:  # a loader may set it only when it runs (e.g. load_coco_json)
        dataset_catalog.get(dataset_name)
        classes = getattr(meta_catalog.get(dataset_name), "thing_classes", None)
    if not classes:
        raise DatasetError(
            f"dataset {dataset_name!r} has no 'thing_classes' in its metadata; set it when registering"
        )
    return len(classes)
