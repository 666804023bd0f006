"""COCO / COCO-Stuff annotations turned into synthetic scene graphs by sg2im's rules.

Follows sg2im's ``sg2im/data/coco.py`` (``CocoSceneGraphDataset``):

- objects are the instance annotations, then the stuff annotations, of an image; one is kept
  when its box covers more than ``min_object_size`` of the image (default 2%) and it is not
  COCO-Stuff's ``other`` class (unless ``include_other``);
- an image is kept with ``min_objects_per_image`` to ``max_objects_per_image`` objects (3-8);
  with a stuff file and ``stuff_only`` (sg2im's default), only images that have stuff annotations;
- for every object, a random other object and a random direction give one triple whose predicate
  comes from the two boxes (:func:`sgmodel.data.geometry.relation_from_boxes`: surrounding /
  inside by containment, else left of / above / right of / below by the centroid angle).

Two deliberate differences: centroids are box centres (sg2im uses mask centroids, which need
pycocotools and the images' masks), and there is no ``__image__`` node or ``__in_image__``
triples (a model adds those itself if it wants them). Randomness is seeded per image from
``(seed, image id)``, so a graph does not depend on file order and reruns are identical.

The annotation files hold every annotation of a split in one list (not grouped by image), so
the per-image boxes are collected first; the stream parser keeps only (category, box) of each
annotation and drops the segmentation polygons/RLE, which are most of the file.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sgmodel.data.geometry import relation_from_boxes
from sgmodel.data.jsonstream import (
    ImportItem,
    JSONStream,
    JSONStreamError,
    Source,
    json_error_item,
    open_source,
    source_name,
)
from sgmodel.graph import DEFAULT_LIMITS, SceneGraphError, ValidationLimits, derive_seed, parse_graph


@dataclass(frozen=True, kw_only=True)
class COCOOptions:
    """sg2im's CocoSceneGraphDataset settings (same names and defaults)."""

    min_object_size: float = 0.02
    """Keep an object only when its box area is more than this fraction of the image."""
    min_objects_per_image: int = 3
    max_objects_per_image: int = 8
    include_other: bool = False
    """Keep COCO-Stuff's catch-all 'other' class (sg2im found it too noisy)."""
    stuff_only: bool = True
    """With a stuff file, keep only images that have stuff annotations."""
    seed: int = 0
    """Base seed of the random relation choice; each image gets its own from (seed, image id)."""
    instance_whitelist: tuple[str, ...] | None = None
    stuff_whitelist: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_object_size < 1.0:
            raise ValueError(f"COCOOptions.min_object_size must be in [0, 1), got {self.min_object_size!r}")
        if self.min_objects_per_image < 0 or self.max_objects_per_image < self.min_objects_per_image:
            raise ValueError(
                "COCOOptions needs 0 <= min_objects_per_image <= max_objects_per_image, got "
                f"{self.min_objects_per_image!r} and {self.max_objects_per_image!r}"
            )


@dataclass
class _Image:
    width: float
    height: float
    file_name: str | None


@dataclass
class _Annotations:
    """What one COCO json contributes: images, categories and per-image (category id, xywh) boxes."""

    images: list[tuple[Any, _Image]]
    """In file order; a repeated id is kept (prepare rejects it as a duplicate, nothing vanishes)."""
    categories: dict[Any, str]
    boxes: dict[Any, list[tuple[Any, float, float, float, float]]]
    image_ids_with_annotations: set[Any]


def _read_annotations(source: Source, name: str | None, stats: Counter, chunk_size: int) -> _Annotations:
    images: list[tuple[Any, _Image]] = []
    categories: dict[Any, str] = {}
    boxes: dict[Any, list] = defaultdict(list)
    with_annotations: set[Any] = set()
    with open_source(source) as handle:
        stream = JSONStream(handle, source_name(source, name), chunk_size)
        for key, value in stream.iter_members(stream_keys=("images", "annotations")):
            if key in ("images", "annotations") and not isinstance(value, (list, Iterator)):
                stats[f"{key}_not_a_list"] += 1  # not COCO: nothing to read from this member
                continue
            if key == "images":
                for entry in value:
                    image = _image(entry)
                    if image is None:
                        stats["images_malformed"] += 1
                        continue
                    images.append((entry["id"], image))
            elif key == "annotations":
                for ann in value:
                    box = _annotation(ann)
                    if box is None:
                        stats["annotations_malformed"] += 1
                        continue
                    image_id = ann["image_id"]
                    with_annotations.add(image_id)
                    boxes[image_id].append(box)
            elif key == "categories" and isinstance(value, list):
                for cat in value:
                    if isinstance(cat, Mapping) and _hashable(cat.get("id")) and isinstance(cat.get("name"), str):
                        categories[cat["id"]] = cat["name"]
    return _Annotations(images, categories, boxes, with_annotations)


def _hashable(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _image(entry: Any) -> _Image | None:
    if not isinstance(entry, Mapping) or not _hashable(entry.get("id")):
        return None
    width, height = entry.get("width"), entry.get("height")
    if not (_positive(width) and _positive(height)):
        return None
    file_name = entry.get("file_name")
    return _Image(float(width), float(height), file_name if isinstance(file_name, str) else None)


def _annotation(ann: Any) -> tuple[Any, float, float, float, float] | None:
    if not isinstance(ann, Mapping) or not _hashable(ann.get("image_id")):
        return None
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return None
    category = ann.get("category_id")
    if not _hashable(category):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return category, x, y, w, h


def coco_relations(boxes: list[list[float]], rng: random.Random) -> list[dict[str, Any]]:
    """sg2im's synthetic triples: each object with one random other object, in a random direction."""
    relations = []
    n = len(boxes)
    for cur in range(n):
        choices = [other for other in range(n) if other != cur]
        if not choices:
            break
        other = rng.choice(choices)
        s, o = (cur, other) if rng.random() > 0.5 else (other, cur)
        relations.append({"subject": s, "predicate": relation_from_boxes(boxes[s], boxes[o]), "object": o})
    return relations


def iter_coco(
    instances: Source,
    *,
    stuff: Source | None = None,
    options: COCOOptions = COCOOptions(),
    limits: ValidationLimits = DEFAULT_LIMITS,
    stats: Counter | None = None,
    names: Mapping[str, str] | None = None,
    chunk_size: int = 1 << 20,
) -> Iterator[ImportItem | tuple[ImportItem, dict[str, Any]]]:
    """One item per image of the instances file: (SceneGraph, {"file_name": ...}) or a SceneGraphError.

    Rejected images carry ``filtered_*`` codes; annotations and objects dropped on the way are
    counted in ``stats``. Invalid JSON in either file yields one ``invalid_json`` error and nothing else.
    """
    stats = stats if stats is not None else Counter()
    names = names or {}
    try:
        inst = _read_annotations(instances, names.get("instances"), stats, chunk_size)
        stuff_ann = _read_annotations(stuff, names.get("stuff"), stats, chunk_size) if stuff is not None else None
    except JSONStreamError as err:
        yield json_error_item(err)
        return

    categories = dict(inst.categories)
    instance_names = set(inst.categories.values())
    stuff_names = set(stuff_ann.categories.values()) if stuff_ann else set()
    if stuff_ann:
        categories.update(stuff_ann.categories)
    allowed = set(options.instance_whitelist or instance_names) | set(options.stuff_whitelist or stuff_names)

    def keep(image: _Image, boxes: list[tuple], kept: list[tuple[str, list[float]]]) -> None:
        for category, x, y, w, h in boxes:
            label = categories.get(category)
            if label is None:
                stats["objects_unknown_category"] += 1
                continue
            if (w * h) / (image.width * image.height) <= options.min_object_size:
                stats["objects_too_small"] += 1
                continue
            if label not in allowed:
                stats["objects_not_whitelisted"] += 1
                continue
            if label == "other" and not options.include_other:
                stats["objects_other"] += 1
                continue
            raw = [x / image.width, y / image.height, (x + w) / image.width, (y + h) / image.height]
            box = [min(1.0, max(0.0, v)) for v in raw]
            if box != raw:
                stats["boxes_clipped"] += 1
            kept.append((label, box))

    known_ids = {image_id for image_id, _ in inst.images}
    for source_ann, label in ((inst, "instances"), (stuff_ann, "stuff")):
        if source_ann is not None:
            unknown = sum(len(source_ann.boxes[i]) for i in source_ann.image_ids_with_annotations - known_ids)
            if unknown:
                stats[f"{label}_annotations_unknown_image"] += unknown

    for image_id, image in inst.images:
        row_id = str(image_id)
        if stuff_ann is not None and options.stuff_only and image_id not in stuff_ann.image_ids_with_annotations:
            yield SceneGraphError(
                row_id, "stuff annotations", 0, "image has no stuff annotations (--stuff-only)", "filtered_no_stuff"
            )
            continue
        kept: list[tuple[str, list[float]]] = []
        keep(image, inst.boxes.get(image_id, []), kept)
        if stuff_ann is not None:
            keep(image, stuff_ann.boxes.get(image_id, []), kept)
        n = len(kept)
        if n < options.min_objects_per_image:
            yield SceneGraphError(
                row_id, "objects", f"<{n} objects kept>",
                f"fewer than --min-objects-per-image {options.min_objects_per_image}", "filtered_few_objects",
            )
            continue
        if n > options.max_objects_per_image:
            yield SceneGraphError(
                row_id, "objects", f"<{n} objects kept>",
                f"more than --max-objects-per-image {options.max_objects_per_image}", "filtered_many_objects",
            )
            continue
        rng = random.Random(derive_seed(options.seed, row_id, 0))
        boxes = [box for _, box in kept]
        row = {
            "id": row_id,
            "objects": [{"label": label, "attributes": [], "box": box} for label, box in kept],
            "relations": coco_relations(boxes, rng),
            "caption": None,
            "image": None,
            "seed": None,
        }
        try:
            yield parse_graph(row, limits), {"file_name": image.file_name}
        except SceneGraphError as err:
            yield err
