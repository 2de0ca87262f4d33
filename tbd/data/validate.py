"""Validation and cleaning of a user's COCO instances json before anything trains on it.

Problems that make the data unusable raise :class:`DatasetError` with the file and the fix.
Problems that concern single annotations (degenerate or out-of-image boxes), crowd regions
(``iscrowd: 1``, which Detectron2 does not train on), images without annotations, classes without
annotations and 16-bit greyscale images are skipped or noted, counted in a :class:`DatasetReport`
and logged: never silent, never a crash deep inside a training run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

COCO_FORMAT_HINT = (
    "a COCO instances json is an object with the lists 'images' (id, file_name, width, height), "
    "'annotations' (id, image_id, category_id, bbox=[x, y, w, h]) and 'categories' (id, name); "
    "see https://cocodataset.org/#format-data"
)

# Reasons an annotation is skipped (keys of DatasetReport.skipped).
SKIP_NONFINITE = "non-finite bbox values"
SKIP_NEGATIVE = "negative bbox width/height"
SKIP_ZERO = "zero-area bbox (width or height 0)"
SKIP_OUTSIDE = "bbox entirely outside its image"

#: every image's header (size) is read when the dataset has at most this many images, else a sample
HEADER_CHECK_LIMIT = 2000
#: how many images are fully decoded (evenly spaced over the dataset)
DECODE_CHECK_LIMIT = 16
_SHOW = 5  # how many offending entries an error or a report names
#: PIL modes of single-channel images with more than 8 bits per value (read as 16-bit data, scaled
#: to 8 bits by tbd.data.images.read_image)
HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class DatasetError(ValueError):
    """A dataset cannot be used as given; the message names the file and the fix."""


@dataclass
class DatasetReport:
    """What loading one json kept, fixed and skipped (see :func:`tbd.data.dataset_report`)."""

    name: str
    json_file: str
    image_root: str
    num_images: int = 0
    num_annotations: int = 0
    kept_images: int = 0
    kept_annotations: int = 0
    clipped_annotations: int = 0
    skipped_annotations: dict[str, int] = field(default_factory=dict)
    #: annotation ids (per skip reason, and "clipped") of the first few offenders
    examples: dict[str, list[int]] = field(default_factory=dict)
    #: crowd regions (iscrowd=1) among the kept boxes: not trained on, ignore regions in evaluation
    crowd_annotations: int = 0
    empty_images: int = 0  # images with no usable (non-crowd) annotation
    empty_images_dropped: bool = True
    images_size_checked: int = 0
    images_decoded: int = 0
    classes: list[str] = field(default_factory=list)
    #: classes of 'categories' without any usable (non-crowd) annotation
    unused_classes: list[str] = field(default_factory=list)
    #: checked images that are 16-bit greyscale (read scaled to 8 bits), the first few names, and the
    #: largest value found in the decoded ones (None when none of them was decoded)
    high_bit_depth_images: int = 0
    high_bit_depth_examples: list[str] = field(default_factory=list)
    high_bit_depth_max: int | None = None

    @property
    def num_skipped_annotations(self) -> int:
        return sum(self.skipped_annotations.values())

    @property
    def clean(self) -> bool:
        """True when the json needs no cleaning (evaluation can use the user's file as it is)."""
        return not (self.num_skipped_annotations or self.clipped_annotations or self.empty_images)

    @property
    def needs_attention(self) -> bool:
        """Something was skipped, fixed or looks unintended: the summary is logged as a warning."""
        return not self.clean or bool(
            self.crowd_annotations or self.unused_classes or self.high_bit_depth_images
        )

    def summary(self) -> str:
        lines = [
            f"{self.name}: {self.json_file} -> kept {self.kept_images}/{self.num_images} images, "
            f"{self.kept_annotations}/{self.num_annotations} annotations, {len(self.classes)} classes"
        ]
        for reason, count in sorted(self.skipped_annotations.items()):
            ids = self.examples.get(reason, [])
            lines.append(f"  skipped {count} annotation(s): {reason} (first ids: {ids})")
        if self.clipped_annotations:
            lines.append(
                f"  clipped {self.clipped_annotations} annotation(s) partly outside their image to the image "
                f"(first ids: {self.examples.get('clipped', [])})"
            )
        if self.crowd_annotations:
            lines.append(
                f"  ignored {self.crowd_annotations} crowd annotation(s) (iscrowd=1): Detectron2 does not "
                "train on crowd regions and COCO evaluation treats them as areas to ignore; set iscrowd "
                f"to 0 for boxes around single objects (first ids: {self.examples.get('crowd', [])})"
            )
        if self.empty_images:
            what = "skipped (no training signal)" if self.empty_images_dropped else "kept for evaluation"
            lines.append(f"  {self.empty_images} image(s) without usable annotations: {what}")
        if self.unused_classes:
            lines.append(
                f"  {len(self.unused_classes)} of {len(self.classes)} classes have no usable annotation: "
                f"{self.unused_classes[:20]}; the model still gets an output for each of them (never "
                "trained as positives, AP undefined): add annotations or remove them from 'categories'"
            )
        if self.high_bit_depth_images:
            peak = (
                f"; the largest value in the decoded ones is {self.high_bit_depth_max}"
                + (
                    " (fewer than 16 bits used: those images will look dark; rescale them to 8 bits "
                    "yourself if that is not intended)"
                    if self.high_bit_depth_max < 4096
                    else ""
                )
                if self.high_bit_depth_max is not None
                else ""
            )
            lines.append(
                f"  {self.high_bit_depth_images} of {self.images_size_checked} checked images are 16-bit "
                f"greyscale (first: {self.high_bit_depth_examples}): read scaled to 8 bits (value / 257) "
                f"and copied to the three colour channels{peak}"
            )
        lines.append(
            f"  image files: all {self.num_images} exist; size checked on {self.images_size_checked}, "
            f"fully decoded {self.images_decoded}"
        )
        return "\n".join(lines)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_errors(entries: list, what: str, checks: dict[str, tuple[Any, str]], path: str) -> None:
    """Raise on the first few entries of a list that lack a key or have a wrongly typed value."""
    bad: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            bad.append(f"{what}[{i}] is a {type(entry).__name__}, not an object")
        else:
            for key, (test, expected) in checks.items():
                if key not in entry:
                    bad.append(f"{what}[{i}] has no '{key}'")
                elif not test(entry[key]):
                    bad.append(f"{what}[{i}]['{key}'] = {entry[key]!r} is not {expected}")
        if len(bad) >= _SHOW:
            break
    if bad:
        raise DatasetError(
            f"{path}: malformed '{what}' entries: " + "; ".join(bad) + f". ({COCO_FORMAT_HINT})"
        )


def _duplicates(ids: list[int], what: str, path: str) -> None:
    seen, dup = set(), []
    for i in ids:
        if i in seen:
            dup.append(i)
        seen.add(i)
    if dup:
        raise DatasetError(f"{path}: duplicate {what} ids {sorted(set(dup))[:_SHOW]}; ids must be unique")


def read_coco_json(json_file: str | os.PathLike, image_root: str | os.PathLike, role: str = "json") -> dict:
    """Parse and structurally validate a COCO instances json (no image access)."""
    path = Path(json_file)
    if not path.is_file():
        hint = "it is a directory; pass the json file inside it" if path.is_dir() else "check the path"
        raise DatasetError(f"{role}: annotation file {path} does not exist ({hint})")
    root = Path(image_root)
    if not root.is_dir():
        raise DatasetError(
            f"{role.replace('_json', '_images')}: image directory {root} does not exist or is not a directory (it must hold the files "
            f"named by 'file_name' in {path})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not a text json file ({err}); pass a COCO instances json") from err
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path} holds a JSON {type(data).__name__}, not an object: {COCO_FORMAT_HINT}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DatasetError(
            f"{path} is not a COCO instances file: missing key(s) {missing}; {COCO_FORMAT_HINT}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, found {type(data[key]).__name__}")
    if not data["categories"]:
        raise DatasetError(f"{path}: 'categories' is empty; list every class as {{'id': int, 'name': str}}")
    if not data["images"]:
        raise DatasetError(f"{path}: 'images' is empty; there is nothing to train or evaluate on")
    sp = str(path)
    _type_errors(
        data["categories"],
        "categories",
        {"id": (_is_int, "an integer"), "name": (lambda v: isinstance(v, str), "a string")},
        sp,
    )
    _type_errors(
        data["images"],
        "images",
        {
            "id": (_is_int, "an integer"),
            "file_name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
            "width": (lambda v: _is_int(v) and v > 0, "a positive integer"),
            "height": (lambda v: _is_int(v) and v > 0, "a positive integer"),
        },
        sp,
    )
    _type_errors(
        data["annotations"],
        "annotations",
        {
            "image_id": (_is_int, "an integer"),
            "category_id": (_is_int, "an integer"),
            "bbox": (
                lambda v: isinstance(v, (list, tuple)) and len(v) == 4 and all(_is_number(x) for x in v),
                "a list of 4 numbers [x, y, w, h]",
            ),
        },
        sp,
    )
    _duplicates([c["id"] for c in data["categories"]], "category", sp)
    _duplicates([im["id"] for im in data["images"]], "image", sp)
    cat_ids = {c["id"] for c in data["categories"]}
    unknown = [a for a in data["annotations"] if a["category_id"] not in cat_ids]
    if unknown:
        ids = sorted({a["category_id"] for a in unknown})
        raise DatasetError(
            f"{path}: {len(unknown)} annotation(s) use category ids {ids[:10]} that are not in 'categories' "
            f"(known ids: {sorted(cat_ids)[:20]}); add those categories or fix the annotations' category_id"
        )
    img_ids = {im["id"] for im in data["images"]}
    orphans = [a for a in data["annotations"] if a["image_id"] not in img_ids]
    if orphans:
        ids = sorted({a["image_id"] for a in orphans})
        raise DatasetError(
            f"{path}: {len(orphans)} annotation(s) refer to image ids {ids[:_SHOW]} that are not in 'images'; "
            "the json is inconsistent (was it merged or filtered by hand?)"
        )
    return data


def _spread(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices into ``range(n)`` (all when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def check_image_files(
    images: list[dict], image_root: Path, json_file: str, report: DatasetReport | None = None
) -> tuple[int, int]:
    """Every listed file exists; sizes match the json on a sample; a few decode. Returns the counts.

    16-bit greyscale images among the checked ones are counted in ``report`` (when given).
    """
    missing = [im["file_name"] for im in images if not (image_root / im["file_name"]).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(images)} images listed in {json_file} are missing under {image_root} "
            f"(first: {missing[:_SHOW]}); 'file_name' is read relative to the image directory: check that "
            "directory (e.g. --train-images/--val-images) or remove those images from the json"
        )
    unreadable: list[str] = []
    mismatched: list[str] = []
    sized = _spread(len(images), HEADER_CHECK_LIMIT)
    decoded = set(_spread(len(images), DECODE_CHECK_LIMIT))
    for i in sized:
        im = images[i]
        file = image_root / im["file_name"]
        try:
            with Image.open(file) as pil:
                if i in decoded:
                    pil.load()
                if pil.mode in HIGH_BIT_DEPTH_MODES and report is not None:
                    _note_high_bit_depth(report, pil, im["file_name"], i in decoded)
                width, height = pil.size
                if pil.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # Detectron2 applies EXIF rotation
                    width, height = height, width
        except Exception as err:  # any decoder error means the file is unusable
            unreadable.append(f"{im['file_name']} ({type(err).__name__}: {err})")
            continue
        if (width, height) != (im["width"], im["height"]):
            mismatched.append(f"{im['file_name']}: file {width}x{height}, json {im['width']}x{im['height']}")
    if unreadable:
        raise DatasetError(
            f"{len(unreadable)} of {len(sized)} checked image files under {image_root} cannot be read "
            f"(first: {unreadable[:_SHOW]}); re-export or remove them from {json_file}"
        )
    if mismatched:
        raise DatasetError(
            f"{len(mismatched)} of {len(sized)} checked images differ in size from their 'width'/'height' in "
            f"{json_file} (first: {mismatched[:_SHOW]}); fix those fields (boxes are in the file's pixels)"
        )
    return len(sized), len(decoded)


def _note_high_bit_depth(report: DatasetReport, pil: Image.Image, name: str, decoded: bool) -> None:
    report.high_bit_depth_images += 1
    if len(report.high_bit_depth_examples) < _SHOW:
        report.high_bit_depth_examples.append(name)
    if decoded:
        peak = int(np.asarray(pil).max())
        report.high_bit_depth_max = max(peak, report.high_bit_depth_max or 0)


def clean_annotations(
    annotations: list[dict], sizes: dict[int, tuple[int, int]], report: DatasetReport
) -> list[tuple[dict, list[float]]]:
    """Kept annotations with their boxes as clipped ``[x1, y1, x2, y2]``; skips counted in ``report``."""
    if not annotations:
        return []
    box = np.asarray([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    wh_img = np.asarray([sizes[a["image_id"]] for a in annotations], dtype=np.float64)
    finite = np.isfinite(box).all(axis=1)
    box = np.where(finite[:, None], box, 0.0)
    negative = finite & ((box[:, 2] < 0) | (box[:, 3] < 0))
    zero = finite & ~negative & ((box[:, 2] == 0) | (box[:, 3] == 0))
    xyxy = np.concatenate([box[:, :2], box[:, :2] + box[:, 2:]], axis=1)
    clipped = np.concatenate([np.clip(xyxy[:, :2], 0, wh_img), np.clip(xyxy[:, 2:], 0, wh_img)], axis=1)
    ok_so_far = finite & ~negative & ~zero
    outside = ok_so_far & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    keep = ok_so_far & ~outside
    was_clipped = keep & (np.abs(clipped - xyxy) > 1e-6).any(axis=1)
    for reason, mask in (
        (SKIP_NONFINITE, ~finite),
        (SKIP_NEGATIVE, negative),
        (SKIP_ZERO, zero),
        (SKIP_OUTSIDE, outside),
        ("clipped", was_clipped),
    ):
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            continue
        if reason == "clipped":
            report.clipped_annotations = len(idx)
        else:
            report.skipped_annotations[reason] = len(idx)
        report.examples[reason] = [annotations[i].get("id", -1) for i in idx[:_SHOW]]
    return [(annotations[i], clipped[i].tolist()) for i in np.flatnonzero(keep)]


def load_user_coco(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    name: str,
    *,
    drop_empty: bool,
    role: str = "json",
) -> tuple[list[dict], dict, DatasetReport]:
    """Validate and clean a COCO json. Returns ``(Detectron2 dicts, cleaned COCO json, report)``.

    Category ids may be any distinct integers: they map to contiguous ids in ascending order
    (``report.classes`` and the metadata's ``thing_dataset_id_to_contiguous_id``).
    """
    from detectron2.structures import BoxMode

    data = read_coco_json(json_file, image_root, role)
    root = Path(image_root)
    report = DatasetReport(name=name, json_file=str(json_file), image_root=str(root))
    report.num_images, report.num_annotations = len(data["images"]), len(data["annotations"])
    report.images_size_checked, report.images_decoded = check_image_files(
        data["images"], root, str(json_file), report
    )
    categories = sorted(data["categories"], key=lambda c: c["id"])
    id_map = {c["id"]: k for k, c in enumerate(categories)}
    report.classes = [c["name"] for c in categories]

    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    kept = clean_annotations(data["annotations"], sizes, report)
    per_image: dict[int, list[dict]] = defaultdict(list)
    cleaned_json_anns = []
    crowd_ids: list[int] = []
    for ann, (x1, y1, x2, y2) in kept:
        crowd = int(ann.get("iscrowd", 0) or 0)
        if crowd:
            crowd_ids.append(ann.get("id", -1))
        per_image[ann["image_id"]].append(
            {
                "bbox": [x1, y1, x2, y2],
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": id_map[ann["category_id"]],
                "iscrowd": crowd,
            }
        )
        fixed = dict(ann, bbox=[x1, y1, x2 - x1, y2 - y1])
        if not _is_number(fixed.get("area")) or not math.isfinite(fixed["area"]) or fixed["area"] <= 0:
            fixed["area"] = (x2 - x1) * (y2 - y1)
        cleaned_json_anns.append(fixed)

    report.crowd_annotations = len(crowd_ids)
    if crowd_ids:
        report.examples["crowd"] = crowd_ids[:_SHOW]

    dicts = []
    for im in data["images"]:
        anns = per_image.get(im["id"], [])
        if not any(a["iscrowd"] == 0 for a in anns):  # crowd regions alone give no training signal
            report.empty_images += 1
            if drop_empty:
                continue
        dicts.append(
            {
                "file_name": str(root / im["file_name"]),
                "height": im["height"],
                "width": im["width"],
                "image_id": im["id"],
                "annotations": anns,
            }
        )
    report.empty_images_dropped = drop_empty
    report.kept_images = len(dicts)
    report.kept_annotations = sum(a["iscrowd"] == 0 for d in dicts for a in d["annotations"])
    used = {a["category_id"] for d in dicts for a in d["annotations"] if a["iscrowd"] == 0}
    report.unused_classes = [name for k, name in enumerate(report.classes) if k not in used]
    if not report.kept_annotations:
        crowd_only = (
            f" Every box left is a crowd region (iscrowd=1, {report.crowd_annotations} of them), which "
            "Detectron2 does not train on: set iscrowd to 0 for boxes around single objects."
            if report.crowd_annotations
            else ""
        )
        raise DatasetError(
            f"{json_file}: no usable annotation is left after validation ({report.num_annotations} listed)."
            f"{crowd_only}\n{report.summary()}"
        )
    cleaned = {k: v for k, v in data.items() if k != "annotations"}
    cleaned["annotations"] = cleaned_json_anns
    log = logger.warning if report.needs_attention else logger.info
    log("dataset %s", report.summary())
    return dicts, cleaned, report
