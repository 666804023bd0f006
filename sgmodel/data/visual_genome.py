"""Visual Genome v1.4 scene graphs, streamed into validated SceneGraphs with sg2im's filters.

``scene_graphs.json`` is a list of images ``{"image_id", "objects": [{"object_id", "x", "y", "w", "h",
"names", ...}], "relationships": [{"relationship_id", "predicate", "subject_id", "object_id"}]}``.
The real file is about 1 GB, so it is read element by element (memory does not grow with the file).
``image_data.json`` (sizes, to normalise boxes) and ``attributes.json`` are joined by image id
while streaming too: Visual Genome lists images in the same order in all its files, so a bounded
read-ahead window finds each match without loading either file.

Filters follow sg2im's ``scripts/preprocess_vg.py`` (same names and defaults): objects with a side
under ``min_object_size`` pixels are dropped; an image is rejected when fewer/more than
``min/max_objects_per_image`` objects or ``min/max_relations_per_image`` relations remain, or
when it is smaller than ``min_image_size``. sg2im's vocabulary thresholds (min instances per
name/predicate) and alias files need whole-dataset counts and are not applied here. What is
dropped inside a kept image is counted in ``stats``; a rejected image is yielded as a
SceneGraphError with a ``filtered_*`` code, so it lands in the error table.
"""

from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sgmodel.data.jsonstream import (
    ImportItem,
    JSONStream,
    JSONStreamError,
    Source,
    json_error_item,
    open_source,
    source_name,
)
from sgmodel.graph import DEFAULT_LIMITS, SceneGraphError, ValidationLimits, parse_graph


@dataclass(frozen=True, kw_only=True)
class VGOptions:
    """sg2im's Visual Genome filters; 0 disables a maximum (and a minimum of 0 keeps everything)."""

    min_object_size: int = 32
    """Drop objects whose width or height is under this many pixels (sg2im: 32)."""
    min_objects_per_image: int = 3
    max_objects_per_image: int = 30
    min_relations_per_image: int = 1
    max_relations_per_image: int = 30
    min_image_size: int = 200
    """Reject images whose shorter side is under this (only when the size is known; sg2im: 200)."""
    max_attributes_per_object: int = 30
    lookahead: int = 4096
    """How many image_data/attributes entries may be held while looking for a match."""

    def __post_init__(self) -> None:
        for name in (
            "min_object_size", "min_objects_per_image", "max_objects_per_image", "min_relations_per_image",
            "max_relations_per_image", "min_image_size", "max_attributes_per_object",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"VGOptions.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lookahead < 1:
            raise ValueError(f"VGOptions.lookahead must be >= 1, got {self.lookahead!r}")


def _is_key(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _image_key(entry: Any) -> Any:
    if isinstance(entry, Mapping):
        key = entry.get("image_id", entry.get("id"))
        return key if _is_key(key) else None
    return None


class OrderedJoin:
    """Entries of a second streamed file, looked up by image id with a bounded read-ahead window."""

    def __init__(self, items: Iterator[Any], key: Callable[[Any], Any], window: int) -> None:
        self._items = items
        self._key = key
        self._window = window
        self._pending: OrderedDict[Any, Any] = OrderedDict()
        self._done = False
        self.evicted = 0

    def get(self, key: Any) -> Any | None:
        """The entry for ``key``, or None when it is not within the window (or not in the file)."""
        if key in self._pending:
            return self._pending.pop(key)
        scanned = 0
        while not self._done and scanned < self._window:
            try:
                item = next(self._items)
            except StopIteration:
                self._done = True
                break
            scanned += 1
            item_key = self._key(item)
            if item_key == key:
                return item
            self._pending[item_key] = item
            if len(self._pending) > self._window:
                self._pending.popitem(last=False)
                self.evicted += 1
        return None


def _number(row_id: Any, field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SceneGraphError(row_id, field, value, "must be a number", "bad_type")
    return float(value)


def _clip(v: float) -> float:
    return min(1.0, max(0.0, v))


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def vg_image_to_row(
    image: Any,
    index: int,
    *,
    size: tuple[float, float] | None = None,
    attributes: Mapping[Any, list] | None = None,
    options: VGOptions = VGOptions(),
    stats: Counter | None = None,
) -> dict[str, Any]:
    """One Visual Genome image as a contract row, after sg2im's filters.

    ``size`` is (width, height) in pixels, used to normalise boxes (none without it);
    ``attributes`` maps object_id to attribute strings. Raises SceneGraphError when the image is
    malformed or filtered out; objects and relations dropped inside a kept image go to ``stats``.
    """
    stats = stats if stats is not None else Counter()
    if not isinstance(image, Mapping):
        raise SceneGraphError(None, f"[{index}]", image, "must be an image object with image_id", "bad_type")
    image_id = image.get("image_id", image.get("id"))
    if not _is_key(image_id):
        raise SceneGraphError(None, f"[{index}].image_id", image_id, "must be an integer or string id", "bad_id")
    row_id = str(image_id)
    if size is None and "width" in image and "height" in image:
        size = (_number(row_id, "width", image["width"]), _number(row_id, "height", image["height"]))
    if size is not None:
        width, height = size
        if width <= 0 or height <= 0:
            raise SceneGraphError(row_id, "image size", size, "width and height must be positive", "bad_image_size")
        if min(width, height) < options.min_image_size:
            raise SceneGraphError(
                row_id, "image size", (width, height),
                f"shorter side under --min-image-size {options.min_image_size}", "filtered_small_image",
            )
    else:
        stats["images_without_size"] += 1

    raw_objects = image.get("objects") or []
    if not isinstance(raw_objects, list):
        raise SceneGraphError(row_id, "objects", raw_objects, "must be a list", "bad_type")
    objects: list[dict[str, Any]] = []
    index_of: dict[Any, int] = {}
    seen_ids: set[Any] = set()
    dropped_ids: set[Any] = set()
    for i, obj in enumerate(raw_objects):
        if not isinstance(obj, Mapping):
            raise SceneGraphError(row_id, f"objects[{i}]", obj, "must be an object with object_id, x, y, w, h, names", "bad_type")
        object_id = obj.get("object_id", obj.get("id"))
        if not _is_key(object_id):
            raise SceneGraphError(
                row_id, f"objects[{i}].object_id", object_id, "must be an integer or string id", "bad_type"
            )
        x, y, w, h = (_number(row_id, f"objects[{i}].{k}", obj.get(k)) for k in ("x", "y", "w", "h"))
        if object_id in seen_ids:
            stats["objects_duplicate_id"] += 1
            continue
        seen_ids.add(object_id)
        names = obj.get("names", [obj["name"]] if "name" in obj else [])
        label = _text(names[0]) if isinstance(names, list) and names else ""
        if not label:
            stats["objects_without_name"] += 1
            dropped_ids.add(object_id)
            continue
        if w < options.min_object_size or h < options.min_object_size:
            stats["objects_too_small"] += 1
            dropped_ids.add(object_id)
            continue
        box = None
        if size is not None:
            raw = (x / width, y / height, (x + w) / width, (y + h) / height)
            box = [_clip(v) for v in raw]
            if box != list(raw):
                stats["boxes_clipped"] += 1
        raw_attrs = obj.get("attributes")
        if raw_attrs is None and attributes is not None:
            raw_attrs = attributes.get(object_id)
        attrs: list[str] = []
        for a in raw_attrs if isinstance(raw_attrs, list) else []:
            a = _text(a)
            if a and a not in attrs:
                attrs.append(a)
        if options.max_attributes_per_object and len(attrs) > options.max_attributes_per_object:
            stats["attributes_over_limit"] += len(attrs) - options.max_attributes_per_object
            attrs = attrs[: options.max_attributes_per_object]
        index_of[object_id] = len(objects)
        objects.append({"label": label, "attributes": attrs, "box": box})

    n = len(objects)
    if n < options.min_objects_per_image:
        raise SceneGraphError(
            row_id, "objects", f"<{n} objects kept>",
            f"fewer than --min-objects-per-image {options.min_objects_per_image}", "filtered_few_objects",
        )
    if options.max_objects_per_image and n > options.max_objects_per_image:
        raise SceneGraphError(
            row_id, "objects", f"<{n} objects kept>",
            f"more than --max-objects-per-image {options.max_objects_per_image}", "filtered_many_objects",
        )

    raw_rels = image.get("relationships") or []
    if not isinstance(raw_rels, list):
        raise SceneGraphError(row_id, "relationships", raw_rels, "must be a list", "bad_type")
    relations: list[dict[str, Any]] = []
    for k, rel in enumerate(raw_rels):
        if not isinstance(rel, Mapping):
            raise SceneGraphError(row_id, f"relationships[{k}]", rel, "must be an object", "bad_type")
        sid = _endpoint(rel, "subject")
        oid = _endpoint(rel, "object")
        if not (_is_key(sid) and _is_key(oid)):
            stats["relationships_missing_object"] += 1
            continue
        if sid in dropped_ids or oid in dropped_ids:
            stats["relationships_to_dropped_object"] += 1
            continue
        if sid not in index_of or oid not in index_of:
            stats["relationships_missing_object"] += 1
            continue
        predicate = _text(rel.get("predicate")).lower()
        if not predicate:
            stats["relationships_without_predicate"] += 1
            continue
        s, o = index_of[sid], index_of[oid]
        if s == o:
            stats["relationships_self"] += 1
            continue
        relations.append({"subject": s, "predicate": predicate, "object": o})

    m = len(relations)
    if m < options.min_relations_per_image:
        raise SceneGraphError(
            row_id, "relationships", f"<{m} relations kept>",
            f"fewer than --min-relations-per-image {options.min_relations_per_image}", "filtered_few_relations",
        )
    if options.max_relations_per_image and m > options.max_relations_per_image:
        raise SceneGraphError(
            row_id, "relationships", f"<{m} relations kept>",
            f"more than --max-relations-per-image {options.max_relations_per_image}", "filtered_many_relations",
        )
    return {"id": row_id, "objects": objects, "relations": relations, "caption": None, "image": None, "seed": None}


def _endpoint(rel: Mapping, role: str) -> Any:
    """subject_id/object_id (scene_graphs.json) or a nested subject/object (relationships.json)."""
    value = rel.get(f"{role}_id")
    if value is None and isinstance(rel.get(role), Mapping):
        value = rel[role].get("object_id", rel[role].get("id"))
    return value


def _attribute_map(entry: Any) -> dict[Any, list]:
    out: dict[Any, list] = {}
    items = (entry.get("attributes") or []) if isinstance(entry, Mapping) else []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, Mapping) and _is_key(item.get("object_id")):
            out[item["object_id"]] = item.get("attributes") or []
    return out


def _size_of(entry: Any) -> tuple[float, float] | None:
    if not isinstance(entry, Mapping):
        return None
    w, h = entry.get("width"), entry.get("height")
    if isinstance(w, (int, float)) and isinstance(h, (int, float)) and not isinstance(w, bool):
        return float(w), float(h)
    return None


def iter_visual_genome(
    scene_graphs: Source,
    *,
    image_data: Source | None = None,
    attributes: Source | None = None,
    options: VGOptions = VGOptions(),
    limits: ValidationLimits = DEFAULT_LIMITS,
    stats: Counter | None = None,
    names: Mapping[str, str] | None = None,
    chunk_size: int = 1 << 20,
) -> Iterator[ImportItem]:
    """Stream Visual Genome images as SceneGraphs (or the SceneGraphError rejecting each).

    ``stats`` (a Counter) receives what was dropped without rejecting an image. Invalid JSON in
    scene_graphs.json, image_data.json or attributes.json ends the stream with one
    ``invalid_json`` error naming the file and the position; graphs yielded before stay valid.
    ``names`` overrides the file names used in messages (keys: scene_graphs, image_data, attributes).
    """
    stats = stats if stats is not None else Counter()
    names = names or {}
    with contextlib.ExitStack() as stack:

        def open_stream(source: Source, label: str) -> JSONStream:
            handle = stack.enter_context(open_source(source))
            return JSONStream(handle, source_name(source, names.get(label)), chunk_size)

        sizes = attrs = None
        if image_data is not None:
            sizes = OrderedJoin(open_stream(image_data, "image_data").iter_array(), _image_key, options.lookahead)
        if attributes is not None:
            attrs = OrderedJoin(open_stream(attributes, "attributes").iter_array(), _image_key, options.lookahead)
        stream = open_stream(scene_graphs, "scene_graphs")
        try:
            for index, image in enumerate(stream.iter_array()):
                key = _image_key(image)
                size = None
                if sizes is not None and key is not None:
                    size = _size_of(sizes.get(key))
                    if size is None:
                        stats["images_not_in_image_data"] += 1
                attr_map = _attribute_map(attrs.get(key)) if attrs is not None and key is not None else None
                try:
                    row = vg_image_to_row(image, index, size=size, attributes=attr_map, options=options, stats=stats)
                    yield parse_graph(row, limits)
                except SceneGraphError as err:
                    yield err
        except JSONStreamError as err:
            yield json_error_item(err)
        for join, label in ((sizes, "image_data"), (attrs, "attributes")):
            if join is not None and join.evicted:
                stats[f"{label}_entries_evicted"] += join.evicted
