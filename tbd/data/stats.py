"""Summary statistics of a COCO instances json (objects per image, COCO size buckets, classes)."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

#: COCO's area thresholds (px^2): small < 32^2 <= medium < 96^2 <= large
SMALL_AREA = 32**2
LARGE_AREA = 96**2


@dataclass
class DatasetStats:
    num_images: int = 0
    num_objects: int = 0
    objects_per_image: Counter = field(default_factory=Counter)  # count -> number of images
    sizes: Counter = field(default_factory=Counter)  # "small" / "medium" / "large" -> objects
    classes: Counter = field(default_factory=Counter)  # class name -> objects
    under_12px: int = 0  # objects whose sqrt(box area) < 12 px
    occluded: int = 0  # objects with a 'visible' share < 0.95 (tbd_shapes only)
    min_side: float = 0.0
    max_side: float = 0.0

    def format(self) -> str:
        n = max(self.num_objects, 1)
        per = " ".join(f"{k}:{v}" for k, v in sorted(self.objects_per_image.items()))
        lines = [
            f"images {self.num_images}, objects {self.num_objects} "
            f"({self.num_objects / max(self.num_images, 1):.2f} per image)",
            f"objects per image (count:images): {per}",
            "COCO size buckets: "
            + ", ".join(
                f"{k} {self.sizes[k]} ({100 * self.sizes[k] / n:.1f}%)" for k in ("small", "medium", "large")
            ),
            f"sqrt(box area): {self.min_side:.1f} .. {self.max_side:.1f} px; under 12 px: {self.under_12px} "
            f"({100 * self.under_12px / n:.1f}%)",
            f"partly hidden, by other shapes or the border (visible < 95%): {self.occluded} ({100 * self.occluded / n:.1f}%)",
            "classes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.classes.items())),
        ]
        return "\n".join(lines)


def coco_stats(json_file: str | os.PathLike) -> DatasetStats:
    data = json.loads(Path(json_file).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    stats = DatasetStats(num_images=len(data["images"]), num_objects=len(data["annotations"]))
    per_image = Counter(a["image_id"] for a in data["annotations"])
    stats.objects_per_image = Counter(per_image.get(im["id"], 0) for im in data["images"])
    sides = []
    for a in data["annotations"]:
        area = a["bbox"][2] * a["bbox"][3]
        sides.append(area**0.5)
        stats.sizes["small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"] += 1
        stats.classes[names[a["category_id"]]] += 1
        stats.occluded += int(a.get("visible", 1.0) < 0.95)
    stats.under_12px = sum(s < 12 for s in sides)
    stats.min_side, stats.max_side = (min(sides), max(sides)) if sides else (0.0, 0.0)
    return stats
