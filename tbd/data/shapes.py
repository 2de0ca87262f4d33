"""The embedded ``tbd_shapes`` dataset: generated once into a cache directory, then reused.

Layout under :func:`shapes_root` (``root=`` argument, else ``$TBD_DATA_DIR``, else ``~/.cache/tbd``)::

    tbd_shapes/v<VERSION>-<size>px-seed<seed>/<split>-<count>/
        images/000000.png ...
        annotations.json      (COCO instances, boxes only)
        stamp.json            (written last: version + every parameter of the distribution)

A split directory is only ever published complete: it is generated in a temporary sibling and
renamed into place (atomic on one filesystem); a file lock keeps concurrent processes (e.g. DDP
ranks) from doing the work twice, and a lost race is detected and resolved by keeping the winner.
A directory whose stamp does not match the expected parameters is regenerated, never reused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import tempfile
import uuid
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from tbd.data.shapes_render import SHAPE_CLASSES, RenderParams, render_image
from tbd.engine.run_folder import remove_owned

logger = logging.getLogger(__name__)

#: Bump whenever the rendered distribution changes: caches of another version are not reused.
GENERATOR_VERSION = 2
TRAIN_NAME = "tbd_shapes_train"
VAL_NAME = "tbd_shapes_val"
SPLITS = ("train", "val")
_SPLIT_CODES = {"train": 1, "val": 2}  # part of every image's seed: (seed, split code, index)
_ENV_VAR = "TBD_DATA_DIR"


def shapes_root(root: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``root`` if given, else ``$TBD_DATA_DIR``, else ``~/.cache/tbd``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(_ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tbd"


def _check_args(split: str, num_images: int, image_size: int, seed: int) -> None:
    if split not in _SPLIT_CODES:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if num_images < 1:
        raise ValueError(f"the number of {split} images must be >= 1, got {num_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 px, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def dataset_dir(root: str | os.PathLike | None = None, image_size: int = 128, seed: int = 0) -> Path:
    """Directory of one version/size/seed of the dataset (it holds one sub-directory per split)."""
    return shapes_root(root) / "tbd_shapes" / f"v{GENERATOR_VERSION}-{image_size}px-seed{seed}"


def split_dir(
    split: str, num_images: int, root: str | os.PathLike | None = None, image_size: int = 128, seed: int = 0
) -> Path:
    _check_args(split, num_images, image_size, seed)
    return dataset_dir(root, image_size, seed) / f"{split}-{num_images}"


def split_files(directory: Path) -> tuple[Path, Path]:
    """``(annotations.json, images/)`` of a split directory."""
    return directory / "annotations.json", directory / "images"


def _stamp(split: str, num_images: int, image_size: int, seed: int) -> dict[str, Any]:
    return {
        "dataset": "tbd_shapes",
        "version": GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
        "render_params": asdict(RenderParams(image_size=image_size)),
        "classes": list(SHAPE_CLASSES),
    }


def _is_complete(directory: Path, stamp: dict[str, Any]) -> bool:
    """True when ``directory`` holds a finished split generated with exactly ``stamp``."""
    try:
        found = json.loads((directory / "stamp.json").read_text())
    except (OSError, ValueError):
        return False
    json_file, images = split_files(directory)
    if found != stamp or not json_file.is_file() or not images.is_dir():
        return False
    return sum(1 for _ in os.scandir(images)) == stamp["num_images"]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX ``flock``); a no-op where locks are unavailable."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as err:  # e.g. a filesystem without lock support
            logger.warning("could not lock %s (%s); generating without a lock", path, err)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _render_chunk(
    images_dir: str, split: str, indices: list[int], seed: int, image_size: int
) -> list[tuple[int, list[dict]]]:
    """Render and write images ``indices``; returns their objects."""
    params = RenderParams(image_size=image_size)
    out = []
    for i in indices:
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
        pixels, objects = render_image(rng, params)
        Image.fromarray(pixels).save(os.path.join(images_dir, f"{i:06d}.png"), compress_level=4)
        out.append((i, objects))
    return out


def _default_workers(num_images: int) -> int:
    if num_images < 64 or mp.current_process().daemon:  # daemons (loader workers) cannot fork
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def _render_all(
    images_dir: Path, split: str, num_images: int, seed: int, image_size: int, workers: int
) -> list:
    chunks = [list(range(s, min(s + 50, num_images))) for s in range(0, num_images, 50)]
    work = partial(_render_chunk, str(images_dir), split, seed=seed, image_size=image_size)
    if workers <= 1:
        results = [work(c) for c in chunks]
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            results = pool.map(work, chunks, chunksize=1)
    return sorted((r for chunk in results for r in chunk), key=lambda r: r[0])


def _coco_json(split: str, records: list, image_size: int, seed: int) -> dict[str, Any]:
    images, annotations = [], []
    for index, objects in records:
        images.append(
            {"id": index + 1, "file_name": f"{index:06d}.png", "width": image_size, "height": image_size}
        )
        for obj in objects:
            w, h = obj["bbox"][2], obj["bbox"][3]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": obj["category_id"],
                    "bbox": obj["bbox"],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                    "visible": obj["visible"],
                }
            )
    return {
        "info": {
            "description": f"tbd_shapes {split} split (procedural, seed {seed})",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(SHAPE_CLASSES)
        ],
    }


def ensure_split(
    split: str,
    num_images: int,
    root: str | os.PathLike | None = None,
    image_size: int = 128,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Generate one split unless a complete, matching copy is cached; returns its directory."""
    target = split_dir(split, num_images, root, image_size, seed)
    stamp = _stamp(split, num_images, image_size, seed)
    if _is_complete(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target, stamp):  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            n_workers = _default_workers(num_images) if workers is None else workers
            logger.info(
                "generating %s: %d %s images of %d px into %s",
                VAL_NAME if split == "val" else TRAIN_NAME,
                num_images,
                split,
                image_size,
                target,
            )
            (tmp / "images").mkdir()
            records = _render_all(tmp / "images", split, num_images, seed, image_size, n_workers)
            (tmp / "annotations.json").write_text(json.dumps(_coco_json(split, records, image_size, seed)))
            (tmp / "stamp.json").write_text(json.dumps(stamp, indent=1))  # last: marks completion
            _publish(tmp, target, stamp)
        finally:
            with contextlib.suppress(OSError):
                remove_owned([tmp], target.parent, recursive=True)
    return target


def _publish(tmp: Path, target: Path, stamp: dict[str, Any]) -> None:
    """Rename ``tmp`` to ``target``, moving a stale ``target`` aside first; a lost race is fine."""
    if target.exists() and not _is_complete(target, stamp):
        logger.warning("replacing %s: its stamp does not match this generator or it is incomplete", target)
        stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(target, stale)
        with contextlib.suppress(OSError):
            remove_owned([stale], target.parent, recursive=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target, stamp):
            raise


def ensure_shapes(
    root: str | os.PathLike | None = None,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 128,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Generate both splits now (no-op when cached); returns :func:`dataset_dir`."""
    ensure_split("train", num_train, root, image_size, seed, workers)
    ensure_split("val", num_val, root, image_size, seed, workers)
    return dataset_dir(root, image_size, seed)


def _load_split(
    name: str, split: str, num_images: int, root: str | None, image_size: int, seed: int
) -> list[dict]:
    from detectron2.data.datasets import load_coco_json

    json_file, images = split_files(ensure_split(split, num_images, root, image_size, seed))
    return load_coco_json(str(json_file), str(images), name)


def register_shapes(
    root: str | os.PathLike | None = None,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: int = 128,
    seed: int = 0,
) -> tuple[str, str]:
    """Register ``tbd_shapes_train`` / ``tbd_shapes_val`` (lazily: images are generated when the
    dataset is first loaded with ``DatasetCatalog.get``). Idempotent; registering again with other
    parameters replaces the registration. Returns the two names."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root_str = None if root is None or str(root) == "" else str(root)
    for name, split, n in ((TRAIN_NAME, "train", num_train), (VAL_NAME, "val", num_val)):
        json_file, images = split_files(split_dir(split, n, root_str, image_size, seed))
        if name in DatasetCatalog.list():
            if getattr(MetadataCatalog.get(name), "json_file", None) == str(json_file):
                continue
            logger.info("re-registering %s for %s", name, json_file.parent)
            DatasetCatalog.remove(name)
            MetadataCatalog.pop(name, None)
        DatasetCatalog.register(name, partial(_load_split, name, split, n, root_str, image_size, seed))
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPE_CLASSES),
            thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(SHAPE_CLASSES))},
            evaluator_type="coco",
            json_file=str(json_file),
            image_root=str(images),
        )
    return TRAIN_NAME, VAL_NAME


def shapes_options_from_cfg(cfg: Any) -> dict[str, Any]:
    """``register_shapes``/``resolve_datasets(shapes_options=...)`` keyword arguments from ``cfg.TBD``."""
    return {
        "root": cfg.TBD.DATA_DIR or None,
        "num_train": int(cfg.TBD.NUM_TRAIN_IMAGES),
        "num_val": int(cfg.TBD.NUM_VAL_IMAGES),
        "image_size": int(cfg.TBD.IMAGE_SIZE),
    }
