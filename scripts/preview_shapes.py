#!/usr/bin/env python
"""Draw a grid of ``tbd_shapes`` images with their boxes and labels, and print the dataset's stats.

.venv/bin/python scripts/preview_shapes.py --num 32 --out /tmp/shapes_preview.png
.venv/bin/python scripts/preview_shapes.py --split val --num-val 200 --stats-only
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from PIL import Image, ImageDraw

from tbd.data import SHAPE_CLASSES, coco_stats, ensure_split, split_files

# one distinct colour per class, for the boxes
_PALETTE = [
    (255, 64, 64),
    (255, 255, 0),
    (0, 255, 255),
    (255, 128, 0),
    (255, 0, 255),
    (0, 255, 64),
    (255, 255, 255),
    (40, 40, 255),
]


def draw_grid(json_file: Path, images: Path, num: int, columns: int, scale: int) -> Image.Image:
    data = json.loads(json_file.read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    entries = data["images"][:num]
    size = entries[0]["width"] * scale
    rows = math.ceil(len(entries) / columns)
    grid = Image.new("RGB", (columns * (size + 4), rows * (size + 4)), (0, 0, 0))
    for k, entry in enumerate(entries):
        tile = Image.open(images / entry["file_name"]).convert("RGB").resize((size, size), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        for ann in by_image.get(entry["id"], []):
            x, y, w, h = (v * scale for v in ann["bbox"])
            colour = _PALETTE[(ann["category_id"] - 1) % len(_PALETTE)]
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=2)
            label = SHAPE_CLASSES[ann["category_id"] - 1]
            if ann.get("visible", 1.0) < 0.95:
                label += f" {ann['visible']:.0%}"
            draw.rectangle([x, y, x + 6 * len(label) + 3, y + 11], fill=(0, 0, 0))
            draw.text((x + 2, y), label, fill=colour)
        grid.paste(tile, ((k % columns) * (size + 4), (k // columns) * (size + 4)))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", default=None, help="cache directory (default: $TBD_DATA_DIR or ~/.cache/tbd)"
    )
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument(
        "--num-images", type=int, default=None, help="split size (default 2000 train / 200 val)"
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=32, help="images in the grid")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--scale", type=int, default=2, help="upscaling of each tile")
    parser.add_argument("--out", default="shapes_preview.png")
    parser.add_argument("--stats-only", action="store_true")
    args = parser.parse_args()

    n = args.num_images or (2000 if args.split == "train" else 200)
    start = time.perf_counter()
    directory = ensure_split(args.split, n, args.root, args.image_size, args.seed)
    print(f"{directory} ready in {time.perf_counter() - start:.1f} s")
    json_file, images = split_files(directory)
    print(coco_stats(json_file).format())
    if not args.stats_only:
        draw_grid(json_file, images, args.num, args.columns, args.scale).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
