"""scripts/get_real_dataset.py offline: tiling, clipping, the split, the output folder, the errors.

The registry download itself is not run here (no network in tests); its failure path is, against
an index on a closed loopback port.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "get_real_dataset.py"
_spec = importlib.util.spec_from_file_location("get_real_dataset", _PATH)
assert _spec and _spec.loader
grd = importlib.util.module_from_spec(_spec)
sys.modules["get_real_dataset"] = grd  # dataclasses look their module up there
_spec.loader.exec_module(grd)


def test_tile_starts_keeps_an_edge_strip_of_at_least_half_a_tile() -> None:
    assert grd.tile_starts(600, 256) == [(0, 256), (256, 256)]  # 88 px left: dropped
    assert grd.tile_starts(400, 256) == [(0, 256), (256, 144)]  # 144 >= 128: kept
    assert grd.tile_starts(384, 256) == [(0, 256), (256, 128)]  # exactly half: kept
    assert grd.tile_starts(512, 256) == [(0, 256), (256, 256)]
    assert grd.tile_starts(200, 256) == [(0, 200)]  # smaller than a tile: one tile
    assert grd.tile_grid(400, 300, 256) == [(0, 0, 256, 256), (256, 0, 144, 256)]  # 44 px rows dropped


def test_clip_to_tile_hand_worked() -> None:
    boxes = np.array(
        [
            [110, 120, 150, 160],  # inside the tile
            [180, 100, 220, 140],  # 40 x 40, 20 x 40 inside: share 0.5, kept and clipped
            [190, 150, 230, 170],  # 40 x 20, 10 x 20 inside: share 0.25, a remnant
            [0, 0, 50, 50],  # outside
            [150, 150, 151, 190],  # inside but 1 px wide (< MIN_SIDE_PX)
        ],
        dtype=float,
    )
    local, idx, share, dropped = grd.clip_to_tile(boxes, (100, 100, 100, 100))
    assert idx.tolist() == [0, 1]
    np.testing.assert_allclose(local, [[10, 20, 50, 60], [80, 0, 100, 40]])
    np.testing.assert_allclose(share, [1.0, 0.5])
    assert dropped == 2  # the remnant and the sliver; the box outside does not count


def test_split_is_by_tile_seeded_and_per_source() -> None:
    counts = {"a": 10, "b": 4, "c": 1}
    val = grd.split_tiles(counts, 0.2, seed=0)
    assert {k: len(v) for k, v in val.items()} == {"a": 2, "b": 1, "c": 0}
    assert all(v <= set(range(counts[k])) for k, v in val.items())
    assert val == grd.split_tiles(counts, 0.2, seed=0)  # same seed, same split
    assert val["a"] != grd.split_tiles(counts, 0.2, seed=1)["a"]
    assert len(grd.split_tiles({"d": 2}, 0.2, seed=0)["d"]) == 1  # >= 2 tiles: one in val at least


def _voc(boxes: list[list[int]], width: int, height: int) -> bytes:
    objs = "".join(
        f"<object><name>Tree</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox></object>"
        for b in boxes
    )
    return f"<annotation><size><width>{width}</width><height>{height}</height></size>{objs}</annotation>".encode()


@pytest.fixture
def synthetic() -> tuple[list, dict[str, bytes], np.ndarray]:
    """A 600 x 300 image with three boxes: one inside tile (0, 0), one across the border of tiles
    (0, 0) and (256, 0), one in the 88 px strip that the 256 px grid drops."""
    pixels = np.random.default_rng(0).integers(0, 256, (300, 600, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    boxes = [[10, 10, 50, 40], [236, 100, 296, 140], [520, 10, 560, 50]]
    src = grd.Source("syn.png", "syn.xml", "-", "-")
    return [src], {"syn.png": buf.getvalue(), "syn.xml": _voc(boxes, 600, 300)}, pixels


def test_write_dataset_tiles_clips_and_splits(tmp_path: Path, synthetic) -> None:
    sources, files, pixels = synthetic
    out = tmp_path / "out"
    counts = grd.write_dataset(files, out, "test", sources, tile=256, val_fraction=0.5, seed=0)
    assert (counts["train"].images, counts["val"].images) == (1, 1)
    by_tile = {}
    for split in ("train", "val"):
        data = json.loads((out / f"{split}.json").read_text())
        assert data["categories"] == [{"id": 1, "name": "tree", "supercategory": "plant"}]
        for im in data["images"]:
            anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
            by_tile[tuple(im["tile_xywh"])] = (split, im, anns)
    assert set(by_tile) == {(0, 0, 256, 256), (256, 0, 256, 256)}
    assert by_tile[(0, 0, 256, 256)][0] != by_tile[(256, 0, 256, 256)][0]  # one tile each side
    _, im0, anns0 = by_tile[(0, 0, 256, 256)]
    assert [a["bbox"] for a in anns0] == [[10, 10, 40, 30]]  # the straddling box keeps 1/3 here: dropped
    _, im1, anns1 = by_tile[(256, 0, 256, 256)]
    assert [a["bbox"] for a in anns1] == [[0, 100, 40, 40]]  # and 2/3 here: clipped, kept
    assert anns1[0]["kept_share"] == pytest.approx(2 / 3, abs=1e-4)
    assert anns1[0]["area"] == 1600 and anns1[0]["iscrowd"] == 0
    tile1 = np.asarray(Image.open(out / "images" / im1["file_name"]))
    np.testing.assert_array_equal(tile1, pixels[0:256, 256:512])
    assert counts["train"].dropped + counts["val"].dropped == 1
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == on_disk


def test_output_folder_rules(tmp_path: Path, synthetic) -> None:
    sources, files, _ = synthetic
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(grd.DatasetBuildError, match="did not write"):
        grd.write_dataset(files, foreign, "test", sources)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["theirs"]  # no staging folder left behind

    ours = tmp_path / "ours"
    grd.write_dataset(files, ours, "test", sources, tile=256)
    grd.write_dataset(files, ours, "test", sources, tile=128)  # a rerun replaces its own files
    manifest = json.loads((ours / "manifest.json").read_text())
    assert manifest["tile_size"] == 128
    on_disk = sorted(str(p.relative_to(ours)) for p in ours.rglob("*") if p.is_file())
    assert sorted([*manifest["files"], "manifest.json"]) == on_disk  # nothing of the 256 px run left

    (ours / "images" / "added_by_user.png").write_bytes(b"x")
    with pytest.raises(grd.DatasetBuildError, match="added_by_user.png"):
        grd.write_dataset(files, ours, "test", sources)
    assert (ours / "images" / "added_by_user.png").read_bytes() == b"x"


def test_registry_unreachable_gives_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no configured index, mirror or find-links
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # a closed loopback port
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(
        grd.DatasetBuildError,
        match=r"(?s)could not download deepforest==2\.1\.0.*not be reached.*--wheel PATH",
    ):
        grd.pip_download(tmp_path, timeout_s=120)


def test_wrong_or_changed_files_are_refused(tmp_path: Path, capsys) -> None:
    bogus = tmp_path / "deepforest-2.1.0-py3-none-any.whl"
    bogus.write_bytes(b"not a zip")
    assert grd.main(["--wheel", str(bogus), "--out", str(tmp_path / "out")]) == 2
    assert "is not the deepforest 2.1.0 wheel" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    changed = tmp_path / "changed.whl"
    with zipfile.ZipFile(changed, "w") as zf:
        for s in grd.SOURCES:
            zf.writestr(f"deepforest/data/{s.image}", b"png")
            zf.writestr(f"deepforest/data/{s.xml}", b"xml")
    with pytest.raises(grd.DatasetBuildError, match="SHA-256"):
        grd.obtain_files(changed)
