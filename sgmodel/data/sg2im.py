"""sg2im's scene-graph JSON (its ``scene_graphs/*.json``), streamed into validated SceneGraphs.

Format: one graph object or a list of them, e.g.
``{"objects": ["sky", "grass", "sheep"], "relationships": [[0, "above", 1], [2, "standing on", 1]]}``.
We also accept objects as ``{"label", "attributes", "box"}`` dicts (box = normalised xyxy),
relationships as ``{"subject", "predicate", "object"}`` dicts, ``relations`` as an alias of
``relationships``, and the optional contract fields ``id``, ``caption``, ``seed``. The id is the
``id`` key, else the graph's position in the file. Unknown keys are rejected rather than
ignored, so a typo (``"relationship"``) cannot silently drop a graph's relations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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

GRAPH_KEYS = frozenset({"id", "objects", "relationships", "relations", "caption", "seed"})
OBJECT_KEYS = frozenset({"label", "attributes", "box"})


def sg2im_to_row(item: Any, index: int) -> dict[str, Any]:
    """One sg2im graph as a contract row (a new dict; ``item`` is not modified).

    Raises SceneGraphError for shapes the contract cannot express (parse_graph checks the rest).
    """
    if not isinstance(item, Mapping):
        raise SceneGraphError(str(index), "graph", item, "must be an object with objects and relationships", "bad_type")
    row_id = item.get("id", str(index))
    unknown = sorted(str(k) for k in item if k not in GRAPH_KEYS)
    if unknown:
        raise SceneGraphError(
            row_id, unknown[0], item[unknown[0]] if unknown[0] in item else None,
            f"unknown key (expected {', '.join(sorted(GRAPH_KEYS))})", "unknown_field",
        )
    if "relationships" in item and "relations" in item:
        raise SceneGraphError(
            row_id, "relations", item["relations"], "give relationships or relations, not both", "unknown_field"
        )
    raw_objects = item.get("objects")
    objects: Any = raw_objects
    if isinstance(raw_objects, list):
        objects = [_object(row_id, i, obj) for i, obj in enumerate(raw_objects)]
    raw_rels = item.get("relationships", item.get("relations"))
    relations: Any = raw_rels
    if isinstance(raw_rels, list):
        relations = [_relation(row_id, k, rel) for k, rel in enumerate(raw_rels)]
    return {
        "id": row_id,
        "objects": objects,
        "relations": relations,
        "caption": item.get("caption"),
        "image": None,
        "seed": item.get("seed"),
    }


def _object(row_id: Any, i: int, obj: Any) -> Any:
    if isinstance(obj, str):
        return {"label": obj, "attributes": [], "box": None}
    if isinstance(obj, Mapping):
        unknown = sorted(str(k) for k in obj if k not in OBJECT_KEYS)
        if unknown:
            raise SceneGraphError(
                row_id, f"objects[{i}].{unknown[0]}", obj.get(unknown[0]),
                "unknown key (expected label, attributes, box)", "unknown_field",
            )
        return {"label": obj.get("label"), "attributes": obj.get("attributes"), "box": obj.get("box")}
    raise SceneGraphError(row_id, f"objects[{i}]", obj, "must be a label string or {label, attributes, box}", "bad_type")


def _relation(row_id: Any, k: int, rel: Any) -> Any:
    if isinstance(rel, list):
        if len(rel) != 3:
            raise SceneGraphError(
                row_id, f"relationships[{k}]", rel, "must be [subject index, predicate, object index]", "bad_relation"
            )
        return {"subject": rel[0], "predicate": rel[1], "object": rel[2]}
    if isinstance(rel, Mapping):
        return {"subject": rel.get("subject"), "predicate": rel.get("predicate"), "object": rel.get("object")}
    raise SceneGraphError(
        row_id, f"relationships[{k}]", rel, "must be [subject index, predicate, object index]", "bad_relation"
    )


def iter_sg2im(
    source: Source, *, name: str | None = None, limits: ValidationLimits = DEFAULT_LIMITS, chunk_size: int = 1 << 20
) -> Iterator[ImportItem]:
    """Stream an sg2im JSON file: each element becomes a SceneGraph or the SceneGraphError that rejects it.

    Never raises for bad content: invalid JSON ends the stream with one ``invalid_json`` error.
    """
    name = source_name(source, name)
    with open_source(source) as handle:
        stream = JSONStream(handle, name, chunk_size)
        index = 0
        try:
            if stream.peek_kind() == "[":
                elements: Iterator[Any] = stream.iter_array()
            else:
                elements = iter([stream.read_value()])
            for element in elements:
                try:
                    yield parse_graph(sg2im_to_row(element, index), limits)
                except SceneGraphError as err:
                    yield err
                index += 1
        except JSONStreamError as err:
            yield json_error_item(err)
