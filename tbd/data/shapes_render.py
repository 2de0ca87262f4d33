"""Procedural rendering of one ``tbd_shapes`` image (pure NumPy + Pillow, no file I/O).

An image is a cluttered background with a stack of layers on top: the annotated objects (one of
:data:`SHAPE_CLASSES`) and unannotated distractor shapes, in a random z-order. Objects that end up
more than ``max_occlusion`` hidden (by later layers or by the image border) are removed *before*
painting, so no unlabelled fragment of a class object is ever left in the image. The box of an
object is its full (amodal) extent, clipped to the image; the visible share is recorded beside it.

Coordinates are continuous pixels: pixel ``(i, j)`` covers ``[j, j+1] x [i, i+1]``, the convention of
COCO/Detectron2 ``XYWH_ABS`` boxes. Every random draw comes from the ``numpy.random.Generator``
passed in, so an image depends only on that generator's seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: The 8 annotated classes; the category id of ``SHAPE_CLASSES[k]`` is ``k + 1``.
SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "rectangle",
    "triangle",
    "star",
    "ring",
    "cross",
    "hexagon",
    "arrow",
)

#: Unannotated shapes that share colours, textures and sizes with the objects.
DISTRACTOR_KINDS: tuple[str, ...] = ("blob", "crescent", "lshape", "semicircle", "bar")

#: Per class: range of the width/height aspect of the unrotated shape (sampled log-uniformly).
_ASPECT = {
    "circle": (0.8, 1.25),
    "rectangle": (0.45, 2.2),
    "triangle": (0.7, 1.4),
    "star": (0.85, 1.18),
    "ring": (0.8, 1.25),
    "cross": (0.75, 1.33),
    "hexagon": (0.8, 1.25),
    "arrow": (1.8, 3.2),
    "blob": (0.6, 1.6),
    "crescent": (0.8, 1.25),
    "lshape": (0.7, 1.4),
    "semicircle": (0.8, 1.25),
    "bar": (4.0, 8.0),
}

#: Object size (square root of the box area, px): a mixture of (weight, low, high), log-uniform.
_SIZE_MIXTURE = ((0.25, 12.0, 26.0), (0.5, 26.0, 56.0), (0.25, 56.0, 110.0))
_TEXTURES = ("solid", "stripes", "checker", "noise", "gradient")
_TEXTURE_P = (0.4, 0.15, 0.1, 0.15, 0.2)
#: Number of objects per image (1..8): weights favour 2-5.
_COUNT_P = np.array([8, 12, 13, 12, 10, 7, 5, 3], dtype=np.float64)


@dataclass(frozen=True)
class RenderParams:
    """Everything that shapes the distribution (part of the cache stamp)."""

    image_size: int = 128
    max_occlusion: float = 0.5  # objects hidden beyond this share are removed
    max_distractors: int = 2
    supersample: int = 4  # anti-aliasing factor of the masks
    min_contrast: float = 80.0  # RGB distance between an object and what lies beneath it


@dataclass
class _Layer:
    outers: list[np.ndarray]  # polygons [K, 2] in image coordinates, filled
    holes: list[np.ndarray]  # polygons cut out of the outers
    category: int  # 1..8 for objects, 0 for distractors
    box: np.ndarray  # full extent (x1, y1, x2, y2), unclipped
    x0: int = 0
    y0: int = 0
    alpha: np.ndarray | None = None  # [h, w] coverage of the unclipped integer box
    visible: float = 1.0


# --------------------------------------------------------------------------------------- geometry
def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + 2.0 * np.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_shape(kind: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outer polygons and holes of a shape, roughly inside ``[-1, 1]^2``."""
    if kind == "circle":
        return [_regular(40)], []
    if kind == "rectangle":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)], []
    if kind == "triangle":
        apex = rng.uniform(-0.6, 0.6)
        return [np.array([[apex, -1], [1, 1], [-1, 1]], dtype=np.float64)], []
    if kind == "star":
        inner = rng.uniform(0.38, 0.55)
        pts = _regular(10, -np.pi / 2)
        pts[1::2] *= inner
        return [pts], []
    if kind == "ring":
        return [_regular(40)], [_regular(40) * rng.uniform(0.45, 0.68)]
    if kind == "cross":
        t = rng.uniform(0.28, 0.45)
        pts = [[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t], [-1, t]]
        return [np.array([*pts, [-1, -t], [-t, -t]], dtype=np.float64)], []
    if kind == "hexagon":
        return [_regular(6, rng.uniform(0, np.pi / 3))], []
    if kind == "arrow":
        t, h = rng.uniform(0.22, 0.42), rng.uniform(0.0, 0.4)
        pts = [[-1, -t], [h, -t], [h, -1], [1, 0], [h, 1], [h, t], [-1, t]]
        return [np.array(pts, dtype=np.float64)], []
    if kind == "blob":
        theta = 2.0 * np.pi * np.arange(36) / 36
        radius = np.ones_like(theta)
        for k in (2, 3, 4):
            radius += rng.uniform(0.08, 0.3) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        radius = np.clip(radius, 0.35, None)
        return [np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)], []
    if kind == "crescent":
        shift = rng.uniform(0.35, 0.7)
        return [_regular(40)], [_regular(40) * rng.uniform(0.8, 1.0) + np.array([shift, 0.0])]
    if kind == "lshape":
        t = rng.uniform(0.3, 0.5)
        pts = [[-1, -1], [-1 + 2 * t, -1], [-1 + 2 * t, 1 - 2 * t], [1, 1 - 2 * t], [1, 1], [-1, 1]]
        return [np.array(pts, dtype=np.float64)], []
    if kind == "semicircle":
        t = np.linspace(0.0, np.pi, 21)
        return [np.stack([np.cos(t), 1.0 - 2.0 * np.sin(t)], axis=1)], []
    if kind == "bar":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)], []
    raise ValueError(f"unknown shape kind {kind!r}")


def _sample_size(rng: np.random.Generator) -> float:
    weights = np.array([w for w, _, _ in _SIZE_MIXTURE])
    _, lo, hi = _SIZE_MIXTURE[int(rng.choice(len(weights), p=weights / weights.sum()))]
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _place_shape(
    kind: str, size: float, rng: np.random.Generator, image_size: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A shape with random aspect and rotation whose box has ``sqrt(area) == size`` (centred at 0)."""
    outers, holes = _unit_shape(kind, rng)
    lo, hi = _ASPECT[kind]
    aspect = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    scale = np.array([np.sqrt(aspect), 1.0 / np.sqrt(aspect)])
    axis_aligned = kind in ("rectangle", "cross", "arrow", "bar") and rng.random() < 0.4
    angle = rng.integers(0, 4) * np.pi / 2 if axis_aligned else rng.uniform(0.0, 2.0 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    outers = [(p * scale) @ rot.T for p in outers]
    holes = [(p * scale) @ rot.T for p in holes]
    allpts = np.concatenate(outers)
    w, h = allpts.max(0) - allpts.min(0)
    factor = size / np.sqrt(w * h)
    factor = min(factor, 0.92 * image_size / max(w, h))  # never wider than the image
    centre = (allpts.max(0) + allpts.min(0)) / 2
    return [(p - centre) * factor for p in outers], [(p - centre) * factor for p in holes]


def _extent(outers: list[np.ndarray]) -> np.ndarray:
    pts = np.concatenate(outers)
    return np.concatenate([pts.min(0), pts.max(0)])


def _intersection_share(box: np.ndarray, others: list[np.ndarray]) -> float:
    """Largest share of ``box``'s area covered by one of ``others``."""
    if not others:
        return 0.0
    o = np.stack(others)
    wh = np.clip(np.minimum(box[2:], o[:, 2:]) - np.maximum(box[:2], o[:, :2]), 0.0, None)
    area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-6)
    return float((wh[:, 0] * wh[:, 1]).max() / area)


def _position(
    outers: list[np.ndarray],
    holes: list[np.ndarray],
    rng: np.random.Generator,
    image_size: int,
    placed: list[np.ndarray],
    tries: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Translate a centred shape: fully inside the image (85 %) or cut by the border (15 %)."""
    ext = _extent(outers)
    half = (ext[2:] - ext[:2]) / 2
    margin = -0.3 * 2 * half if rng.random() < 0.15 else np.zeros(2)
    lo = half + margin
    hi = np.maximum(image_size - half - margin, lo)
    best, best_share = None, np.inf
    for _ in range(tries):
        c = rng.uniform(lo, hi)
        share = _intersection_share(np.concatenate([c - half, c + half]), placed)
        if share < best_share:
            best, best_share = c, share
        if share < 0.45:
            break
    assert best is not None
    return [p + best for p in outers], [p + best for p in holes]


def _rasterise(layer: _Layer, k: int) -> None:
    """Anti-aliased coverage of the layer on its (unclipped) integer box."""
    x0, y0 = int(np.floor(layer.box[0])), int(np.floor(layer.box[1]))
    x1, y1 = int(np.ceil(layer.box[2])), int(np.ceil(layer.box[3]))
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    canvas = Image.new("L", (w * k, h * k), 0)
    draw = ImageDraw.Draw(canvas)
    offset = np.array([x0, y0], dtype=np.float64)
    for poly, fill in [(p, 255) for p in layer.outers] + [(p, 0) for p in layer.holes]:
        pts = (poly - offset) * k - 0.5  # continuous -> Pillow's pixel-centre coordinates
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=fill)
    alpha = np.asarray(canvas.resize((w, h), Image.BOX), dtype=np.float32) / 255.0  # box average
    layer.x0, layer.y0, layer.alpha = x0, y0, alpha


def _clip_window(layer: _Layer, size: int) -> tuple[slice, slice, slice, slice] | None:
    """(image rows, image cols, alpha rows, alpha cols) of the part of the layer inside the image."""
    assert layer.alpha is not None
    h, w = layer.alpha.shape
    ix0, iy0 = max(layer.x0, 0), max(layer.y0, 0)
    ix1, iy1 = min(layer.x0 + w, size), min(layer.y0 + h, size)
    if ix1 <= ix0 or iy1 <= iy0:
        return None
    return (
        slice(iy0, iy1),
        slice(ix0, ix1),
        slice(iy0 - layer.y0, iy1 - layer.y0),
        slice(ix0 - layer.x0, ix1 - layer.x0),
    )


def _visibility(layers: list[_Layer], size: int) -> np.ndarray:
    """Visible share of each layer (bottom to top order), counting the border as hiding."""
    transmit = np.ones((size, size), dtype=np.float32)
    out = np.zeros(len(layers))
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        assert layer.alpha is not None
        total = float(layer.alpha.sum())
        win = _clip_window(layer, size)
        if win is None or total <= 0:
            continue
        ry, rx, ay, ax = win
        a = layer.alpha[ay, ax]
        out[i] = float((a * transmit[ry, rx]).sum()) / total
        transmit[ry, rx] *= 1.0 - a
    return out


# --------------------------------------------------------------------------------------- colour
def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, 3).astype(np.float32)


def _texture(
    kind: str, c1: np.ndarray, c2: np.ndarray, ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``[h, w, 3]`` texture on the pixel grid ``ys x xs`` (pixel centres)."""
    yy, xx = ys[:, None], xs[None, :]
    if kind == "solid":
        g = rng.uniform(-1, 1, 2) * 0.015
        shade = 1.0 + g[0] * (xx - xx.mean()) + g[1] * (yy - yy.mean())
        return c1[None, None, :] * shade[..., None]
    if kind == "noise":
        sigma = rng.uniform(20.0, 45.0)
        return c1[None, None, :] + rng.normal(0.0, sigma, (len(ys), len(xs), 1)).astype(np.float32)
    angle = rng.uniform(0.0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == "gradient":
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    elif kind == "stripes":
        period = rng.uniform(3.0, 8.0)
        t = np.clip(2.5 * np.sin(2 * np.pi * u / period), -1, 1) * 0.5 + 0.5
    elif kind == "checker":
        period = rng.uniform(4.0, 9.0)
        v = -xx * np.sin(angle) + yy * np.cos(angle)
        s = np.sin(np.pi * u / period) * np.sin(np.pi * v / period)
        t = np.clip(3.0 * s, -1, 1) * 0.5 + 0.5
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return c1[None, None, :] * (1.0 - t[..., None]) + c2[None, None, :] * t[..., None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + low-frequency colour noise + lines, blobs and sometimes a textured patch."""
    c1, c2 = _colour(rng), _colour(rng)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle) + 0.5, 0, 1)[..., None]
    img = c1 * (1 - t) + c2 * t
    cells = int(rng.integers(3, 8))
    low = rng.normal(0.0, rng.uniform(6.0, 20.0), (cells, cells, 3)).astype(np.float32)
    for ch in range(3):
        lf = Image.fromarray(low[..., ch], mode="F").resize((size, size), Image.BICUBIC)
        img[..., ch] += np.asarray(lf)
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")
    if rng.random() < 0.2:  # a large low-contrast textured patch
        x0, y0 = rng.uniform(-0.3, 0.6, 2) * size
        w, h = rng.uniform(0.4, 0.9, 2) * size
        ys = np.arange(size) + 0.5
        tex = _texture(
            str(rng.choice(["stripes", "checker", "noise"])), _colour(rng), _colour(rng), ys, ys, rng
        )
        region = np.zeros((size, size), dtype=bool)
        region[int(max(y0, 0)) : int(max(y0 + h, 0)), int(max(x0, 0)) : int(max(x0 + w, 0))] = True
        base = np.asarray(canvas, dtype=np.float32)
        mix = rng.uniform(0.2, 0.35)
        base[region] = base[region] * (1 - mix) + tex[region] * mix
        canvas = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="RGB")
    overlay = canvas.copy()
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(6, 30, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(v) for v in _colour(rng)))
    canvas = Image.blend(canvas, overlay, float(rng.uniform(0.2, 0.45)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 6))):
        p = rng.uniform(-0.1 * size, 1.1 * size, 4)
        draw.line(
            [float(p[0]), float(p[1]), float(p[2]), float(p[3])],
            fill=tuple(int(v) for v in _colour(rng)),
            width=int(rng.integers(1, 3)),
        )
    return np.asarray(canvas, dtype=np.float32).copy()


def _paint(img: np.ndarray, layer: _Layer, rng: np.random.Generator, params: RenderParams) -> None:
    """Composite one textured layer onto ``img`` in place."""
    win = _clip_window(layer, params.image_size)
    assert layer.alpha is not None
    if win is None:
        return
    ry, rx, ay, ax = win
    a = layer.alpha[ay, ax][..., None]
    beneath = (img[ry, rx] * a).sum((0, 1)) / max(float(a.sum()), 1e-6)
    kind = _TEXTURES[int(rng.choice(len(_TEXTURES), p=np.array(_TEXTURE_P)))]
    c1, c2 = _colour(rng), _colour(rng)
    for _ in range(8):  # keep the shape distinguishable from what lies beneath it
        mean = c1 if kind in ("solid", "noise") else (c1 + c2) / 2
        if np.linalg.norm(mean - beneath) >= params.min_contrast:
            break
        c1, c2 = _colour(rng), _colour(rng)
    ys = np.arange(ry.start, ry.stop) + 0.5
    xs = np.arange(rx.start, rx.stop) + 0.5
    tex = _texture(kind, c1, c2, ys, xs, rng)
    img[ry, rx] = img[ry, rx] * (1.0 - a) + tex * a


# --------------------------------------------------------------------------------------- image
def render_image(
    rng: np.random.Generator, params: RenderParams = RenderParams()
) -> tuple[np.ndarray, list[dict]]:
    """One image ``[S, S, 3] uint8`` and its objects.

    Each object is a dict: ``category_id`` (1..8), ``bbox`` (COCO ``[x, y, w, h]``, the full extent
    clipped to the image, rounded to 1/100 px) and ``visible`` (share not hidden, in (0, 1]).
    """
    size = params.image_size
    img = _background(rng, size)
    layers: list[_Layer] = []
    placed: list[np.ndarray] = []
    n_obj = int(rng.choice(len(_COUNT_P), p=_COUNT_P / _COUNT_P.sum())) + 1
    sizes = sorted((_sample_size(rng) * size / 128.0 for _ in range(n_obj)), reverse=True)
    for s in sizes:  # big ones first, so small ones find free room
        cat = int(rng.integers(0, len(SHAPE_CLASSES)))
        outers, holes = _place_shape(SHAPE_CLASSES[cat], s, rng, size)
        outers, holes = _position(outers, holes, rng, size, placed, tries=8)
        box = _extent(outers)
        placed.append(box)
        layers.append(_Layer(outers, holes, cat + 1, box))
    for _ in range(int(rng.integers(0, params.max_distractors + 1))):
        kind = DISTRACTOR_KINDS[int(rng.integers(0, len(DISTRACTOR_KINDS)))]
        s = float(np.exp(rng.uniform(np.log(10.0), np.log(60.0)))) * size / 128.0
        outers, holes = _place_shape(kind, s, rng, size)
        outers, holes = _position(outers, holes, rng, size, [], tries=1)
        layers.append(_Layer(outers, holes, 0, _extent(outers)))
    for layer in layers:
        _rasterise(layer, params.supersample)
    layers = [layers[i] for i in rng.permutation(len(layers))]

    # Remove the most hidden object until every object is at least (1 - max_occlusion) visible.
    while True:
        vis = _visibility(layers, size)
        hidden = [(v, i) for i, (v, layer) in enumerate(zip(vis, layers)) if layer.category > 0]
        worst = min(hidden) if hidden else None
        if worst is None or worst[0] >= 1.0 - params.max_occlusion:
            break
        del layers[worst[1]]
    for layer, v in zip(layers, vis):
        layer.visible = float(v)

    for layer in layers:
        _paint(img, layer, rng, params)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 5.0))
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 0.9))))

    objects = []
    for layer in layers:
        if layer.category == 0:
            continue
        x1, y1 = np.clip(layer.box[:2], 0, size)
        x2, y2 = np.clip(layer.box[2:], 0, size)
        bbox = [round(float(v), 2) for v in (x1, y1, x2 - x1, y2 - y1)]
        objects.append({"category_id": layer.category, "bbox": bbox, "visible": round(layer.visible, 3)})
    return np.asarray(out), objects
