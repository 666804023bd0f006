"""The shapes world: random scene graphs of coloured shapes, rendered with exact segmentation ground truth.

Nothing can be downloaded here, so the project needs a world where graph, picture and per-pixel
truth are all known: it trains the demo diffusion model and the segmenter, and makes recall
scores mean something. Relations are derived from the layout with sg2im's rule
(:func:`sgmodel.data.geometry.relation_from_boxes`), so they are true of the picture.

Everything here is plain numpy + PIL and deterministic for a given seed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sgmodel.data.geometry import relation_from_boxes
from sgmodel.graph import Box, SceneGraph, SGObject, SGRelation

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SIZES: tuple[str, ...] = ("small", "large")
PREDICATES: tuple[str, ...] = ("left of", "right of", "above", "below")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 165, 45),
    "blue": (35, 70, 225),
    "yellow": (240, 205, 20),
    "purple": (150, 45, 190),
}
"""Saturated, well-separated in hue and brightness, all far from the light backgrounds."""

CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
"""Segmentation classes: 0 is background, then one class per (colour, shape) pair."""

_CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}

SIZE_RANGES: dict[str | None, tuple[float, float]] = {
    "small": (0.25, 0.31),
    "large": (0.39, 0.45),
    None: (0.25, 0.45),
}
"""Object side as a fraction of the image side. Unsized objects span both ranges (a size is optional)."""

SIZE_ATTRIBUTE_PROB = 0.3
EDGE_MARGIN = 0.03
"""Gap kept between a box and the image border (normalised)."""
GAP = 0.06
"""Gap kept between boxes (normalised, ~2 px at 32x32): render jitter can never make shapes touch."""


def class_id(colour: str, shape: str) -> int:
    """Class index of a (colour, shape) pair in :data:`CLASS_NAMES`."""
    try:
        return _CLASS_INDEX[f"{colour} {shape}"]
    except KeyError:
        raise ValueError(f"unknown shapes class: colour={colour!r}, shape={shape!r}") from None


def _colour_of(obj: SGObject) -> str:
    colours = [a for a in obj.attributes if a in COLOUR_RGB]
    if len(colours) != 1:
        raise ValueError(f"shapes object needs exactly one colour attribute, got {obj.attributes!r}")
    return colours[0]


def object_class(obj: SGObject) -> int:
    """Class index of a shapes-world object (label = shape, colour among its attributes)."""
    return class_id(_colour_of(obj), obj.label)


def _size_of(obj: SGObject) -> str | None:
    return next((a for a in obj.attributes if a in SIZES), None)


# ----------------------------------------------------------------------------- graphs


def _overlaps(a: Box, b: Box, gap: float) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _layout(rng: np.random.Generator, sizes: Sequence[str | None]) -> list[Box]:
    """Non-overlapping square boxes, one per object (rejection sampling, largest placed first).

    When a draw does not fit (four large objects rarely do), the sides are redrawn, and after
    repeated failures shrunk by 5% a round, so the loop always ends.
    """
    shrink = 1.0
    for attempt in range(200):
        sides = [float(rng.uniform(*SIZE_RANGES[s])) * shrink for s in sizes]
        order = sorted(range(len(sides)), key=lambda i: -sides[i])
        boxes: list[Box | None] = [None] * len(sides)
        ok = True
        for i in order:
            side = sides[i]
            lo, hi = EDGE_MARGIN, 1.0 - EDGE_MARGIN - side
            for _ in range(100):
                x0, y0 = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
                box = (x0, y0, x0 + side, y0 + side)
                if not any(b is not None and _overlaps(box, b, GAP) for b in boxes):
                    boxes[i] = box
                    break
            else:
                ok = False
                break
        if ok:
            return [b for b in boxes if b is not None]
        if attempt % 10 == 9:
            shrink *= 0.95
    raise RuntimeError(f"could not lay out {len(sizes)} objects")  # pragma: no cover - unreachable in practice


def relations_for(boxes: Sequence[Box], pairs: Sequence[tuple[int, int]]) -> tuple[SGRelation, ...]:
    """Relations for (subject, object) index pairs, predicates by sg2im's rule on the boxes."""
    rels = []
    for s, o in pairs:
        predicate = relation_from_boxes(boxes[s], boxes[o])
        if predicate not in PREDICATES:
            raise ValueError(f"boxes {boxes[s]} and {boxes[o]} overlap: {predicate!r}")
        rels.append(SGRelation(subject=s, predicate=predicate, object=o))
    return tuple(rels)


def random_graph(rng: np.random.Generator, graph_id: str, min_objects: int = 1, max_objects: int = 4) -> SceneGraph:
    """A random shapes graph with a non-overlapping layout stored as boxes and true relations.

    Objects: label = shape; attributes = (colour,) or, for ~30%, (size, colour). Each object
    after the first gets one relation to a random other object (so every graph is connected).
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects!r}, {max_objects!r}")
    n = int(rng.integers(min_objects, max_objects + 1))
    shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(n)]
    colours = [COLOURS[int(rng.integers(len(COLOURS)))] for _ in range(n)]
    sizes = [SIZES[int(rng.integers(len(SIZES)))] if rng.random() < SIZE_ATTRIBUTE_PROB else None for _ in range(n)]
    boxes = _layout(rng, sizes)
    objects = tuple(
        SGObject(label=shape, attributes=(colour,) if size is None else (size, colour), box=box)
        for shape, colour, size, box in zip(shapes, colours, sizes, boxes)
    )
    pairs = []
    for i in range(1, n):
        j = int(rng.integers(n - 1))
        pairs.append((i, j if j < i else j + 1))
    relations = relations_for(boxes, pairs)
    return SceneGraph(id=graph_id, objects=objects, relations=relations, caption=caption_for(objects, relations))


def caption_for(objects: Sequence[SGObject], relations: Sequence[SGRelation]) -> str:
    """A plain-English caption, for text-prompted baselines and for people reading the data."""

    def name(o: SGObject) -> str:
        return " ".join((*o.attributes, o.label))

    parts = [f"a {name(objects[r.subject])} {r.predicate} a {name(objects[r.object])}" for r in relations]
    mentioned = {i for r in relations for i in (r.subject, r.object)}
    parts += [f"a {name(o)}" for i, o in enumerate(objects) if i not in mentioned]
    return ", ".join(parts)


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class ShapesRender:
    image: Image.Image
    """RGB, size x size."""
    class_map: np.ndarray
    """uint8 [size, size]: class index per pixel (0 background), see :data:`CLASS_NAMES`."""
    boxes: tuple[Box, ...]
    """Tight normalised xyxy box of each object as drawn (after jitter), in graph object order."""
    instance_map: np.ndarray
    """uint8 [size, size]: 0 background, i + 1 for the graph's object i (same pixels as ``class_map``)."""


def _shape_polygon(shape: str, box: Box, angle: float) -> list[tuple[float, float]] | None:
    """Vertices (normalised) of a square/triangle filling ``box``, rotated by ``angle`` radians; None for circles."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    elif shape == "triangle":
        pts = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


def _shape_mask(box: Box, polygon: list[tuple[float, float]] | None, n: int) -> np.ndarray:
    """bool [n, n]: which pixel centres of an n x n grid lie in the shape (the circle in ``box`` if no polygon).

    Exact point-in-shape tests at pixel centres (not PIL's rasteriser, whose fills overshoot
    by about a pixel), so coverage after box-filtering is unbiased and the class map, the
    image and the box all come from one geometry.
    """
    centres = (np.arange(n, dtype=np.float64) + 0.5) / n
    xs, ys = centres[None, :], centres[:, None]
    if polygon is None:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
    inside = np.ones((n, n), dtype=bool)
    k = len(polygon)
    # convex polygon with vertices in a consistent order: inside = same side of every edge
    area2 = sum(
        polygon[i][0] * polygon[(i + 1) % k][1] - polygon[(i + 1) % k][0] * polygon[i][1] for i in range(k)
    )
    sign = 1.0 if area2 > 0 else -1.0
    for i in range(k):
        (x0, y0), (x1, y1) = polygon[i], polygon[(i + 1) % k]
        inside &= sign * ((x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)) >= 0
    return inside


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """Light, low-saturation tint with a mild linear gradient and faint noise: float32 [n, n, 3] in 0..255."""
    base = rng.uniform(205, 245) + rng.uniform(-12, 12, size=3)
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) / max(n - 1, 1) - 0.5
    direction = rng.uniform(0, 2 * math.pi)
    ramp = xs * math.cos(direction) + ys * math.sin(direction)
    amplitude = rng.uniform(0, 25)
    bg = base[None, None, :] + (amplitude * ramp)[:, :, None]
    bg = bg + rng.normal(0, rng.uniform(0, 3), size=(n, n, 3))
    return bg.astype(np.float32)


def render(
    graph: SceneGraph,
    size: int,
    rng: np.random.Generator,
    supersample: int = 4,
    jitter: bool = True,
) -> ShapesRender:
    """Draw a shapes graph (objects need boxes) at ``size`` x ``size`` pixels with its class map.

    Shapes are drawn at ``supersample`` times the size and box-filtered down (anti-aliasing);
    the class map takes each pixel whose coverage by an object is >= 1/2, from the same
    geometry, so it matches the image. ``jitter`` adds colour (±12 per channel), rotation
    (±6 degrees for squares and triangles) and sub-pixel position (±0.5 px) noise.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size!r}")
    if not graph.has_boxes:
        raise ValueError(f"graph {graph.id!r}: every object needs a box to be rendered")
    hi = size * supersample
    canvas = _background(rng, hi)
    class_map = np.zeros((size, size), dtype=np.uint8)
    instance_map = np.zeros((size, size), dtype=np.uint8)
    boxes: list[Box] = []
    for idx, obj in enumerate(graph.objects):
        cls = object_class(obj)
        rgb = np.array(COLOUR_RGB[_colour_of(obj)], dtype=np.float32)
        box = obj.box
        assert box is not None
        angle = 0.0
        if jitter:
            rgb = np.clip(rgb + rng.uniform(-12, 12, size=3), 0, 255)
            dx, dy = rng.uniform(-0.5, 0.5, size=2) / size
            box = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
            if obj.label != "circle":
                angle = math.radians(float(rng.uniform(-6, 6)))
        poly = _shape_polygon(obj.label, box, angle)
        mask = _shape_mask(box, poly, hi)
        if poly is None:
            drawn = box
        else:
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            drawn = (min(xs), min(ys), max(xs), max(ys))
        boxes.append(tuple(float(np.clip(v, 0.0, 1.0)) for v in drawn))  # type: ignore[arg-type]
        canvas[mask] = rgb
        coverage = mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
        inside = coverage >= 0.5
        class_map[inside] = cls
        instance_map[inside] = idx + 1
    arr = np.clip(canvas, 0, 255).reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    image = Image.fromarray(np.round(arr).astype(np.uint8), mode="RGB")
    return ShapesRender(image=image, class_map=class_map, boxes=tuple(boxes), instance_map=instance_map)


# ----------------------------------------------------------------------------- records


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_class_map(class_map: np.ndarray) -> bytes:
    """A class map as a mode-"L" PNG (lossless; class index = pixel value)."""
    if class_map.dtype != np.uint8 or class_map.ndim != 2:
        raise ValueError(f"class map must be a 2-D uint8 array, got {class_map.dtype} {class_map.shape}")
    return encode_png(Image.fromarray(class_map, mode="L"))


def decode_class_map(png_bytes: bytes) -> np.ndarray:
    """uint8 [H, W] class indices from :func:`encode_class_map`'s PNG bytes."""
    with Image.open(io.BytesIO(png_bytes)) as img:
        if img.mode != "L":
            raise ValueError(f"class map PNG must be mode 'L', got {img.mode!r}")
        return np.array(img, dtype=np.uint8)


def record_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for record ``index`` of a stream: record i is the same whatever the count."""
    return np.random.default_rng([seed, index])


def shapes_sample(seed: int, index: int, size: int = 32) -> tuple[SceneGraph, ShapesRender]:
    """One record as objects: the graph (boxes and relations from the drawn geometry) and its render.

    The stored boxes are the drawn (jittered) tight boxes, and the relations are re-derived from
    them for the same (subject, object) pairs, so the row agrees with its picture exactly.
    """
    rng = record_rng(seed, index)
    graph = random_graph(rng, f"shapes-{seed}-{index:06d}")
    out = render(graph, size, rng)
    objects = tuple(SGObject(o.label, o.attributes, b) for o, b in zip(graph.objects, out.boxes))
    relations = relations_for(out.boxes, [(r.subject, r.object) for r in graph.relations])
    graph = SceneGraph(
        id=graph.id, objects=objects, relations=relations, caption=caption_for(objects, relations)
    )
    return graph, out


def iter_shapes_records(count: int, seed: int, size: int = 32) -> Iterator[tuple[SceneGraph, dict[str, bytes]]]:
    """Deterministic stream of (graph with PNG ``image`` and boxes, {"class_map": PNG bytes}).

    Ids are ``shapes-{seed}-{i:06d}``; the class map is a mode-"L" PNG (see :func:`decode_class_map`).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size!r}")
    for i in range(count):
        graph, out = shapes_sample(seed, i, size)
        graph = SceneGraph(
            id=graph.id,
            objects=graph.objects,
            relations=graph.relations,
            caption=graph.caption,
            image=encode_png(out.image),
        )
        yield graph, {"class_map": encode_class_map(out.class_map)}
