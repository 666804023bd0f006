"""Scene graphs: the dataclasses, their validation, the Arrow/Parquet contract and PyG conversion.

A scene graph is immutable once built (frozen dataclasses over tuples), so nothing downstream
can mutate a caller's data — the sg2im pitfall where encoding rewrote the input dicts.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class SGObject:
    label: str
    attributes: tuple[str, ...] = ()
    box: Box | None = None
    """Normalised xyxy in [0, 1], or None when the graph carries no layout for this object."""


@dataclass(frozen=True)
class SGRelation:
    subject: int
    predicate: str
    object: int


@dataclass(frozen=True)
class SceneGraph:
    id: str
    objects: tuple[SGObject, ...]
    relations: tuple[SGRelation, ...] = ()
    caption: str | None = None
    image: bytes | None = field(default=None, repr=False)
    seed: int | None = None

    @property
    def has_boxes(self) -> bool:
        return all(o.box is not None for o in self.objects)

    def phrases(self) -> list[str]:
        """Every distinct string this graph needs embedded (labels, attributes, predicates)."""
        out = {o.label for o in self.objects}
        out.update(a for o in self.objects for a in o.attributes)
        out.update(r.predicate for r in self.relations)
        return sorted(out)


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True, kw_only=True)
class ValidationLimits:
    max_text_chars: int = 128
    """Longest label, attribute or predicate accepted."""
    max_objects: int = 64
    """Most objects in one graph."""
    max_relations: int = 256
    """Most relations in one graph."""
    max_id_chars: int = 256
    """Longest id accepted."""

    def __post_init__(self) -> None:
        for name in ("max_text_chars", "max_objects", "max_relations", "max_id_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"ValidationLimits.{name} must be >= 1, got {getattr(self, name)!r}")


DEFAULT_LIMITS = ValidationLimits()


class SceneGraphError(ValueError):
    """A scene graph that breaks the contract. Always names the row id, the field and the value."""

    def __init__(self, row_id: Any, field_name: str, value: Any, problem: str, code: str) -> None:
        self.row_id = row_id
        self.field = field_name
        self.value = value
        self.problem = problem
        self.code = code
        super().__init__(f"graph {row_id!r}: {field_name} = {_short(value)}: {problem}")

    @property
    def reason(self) -> str:
        return str(self)


def is_utf8(text: str) -> bool:
    """Arrow strings are UTF-8; JSON escapes like "\\ud800" decode to lone surrogates that are not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _visible(text: str) -> bool:
    """Whether any character would show: whitespace, control (Cc) and format (Cf: zero-width space and
    joiners, BOM, bidi marks) characters alone make a label a text encoder sees as empty."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf") for ch in text)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(row_id: Any, name: str, value: Any, limits: ValidationLimits) -> str:
    if not isinstance(value, str):
        raise SceneGraphError(row_id, name, value, "must be a string", "bad_type")
    if not is_utf8(value):
        raise SceneGraphError(row_id, name, value, "is not valid Unicode (lone surrogate)", "bad_text")
    if not value.strip():
        raise SceneGraphError(row_id, name, value, "must not be empty", "empty_text")
    if not _visible(value):
        raise SceneGraphError(row_id, name, value, "has no visible characters (only control or zero-width ones)",
                              "empty_text")
    if len(value) > limits.max_text_chars:
        raise SceneGraphError(
            row_id, name, value, f"longer than {limits.max_text_chars} characters ({len(value)})", "text_too_long"
        )
    return value


def _check_box(row_id: Any, name: str, value: Any) -> Box | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 4:
        raise SceneGraphError(row_id, name, value, "must be 4 numbers x0, y0, x1, y1", "bad_box")
    coords = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SceneGraphError(row_id, name, value, "must be 4 numbers x0, y0, x1, y1", "bad_box")
        try:
            coords.append(float(v))
        except OverflowError:  # an int too large for a float
            raise SceneGraphError(row_id, name, value, "has infinite coordinates", "box_not_finite") from None
    if not all(math.isfinite(c) for c in coords):
        raise SceneGraphError(row_id, name, value, "has NaN or infinite coordinates", "box_not_finite")
    if not all(0.0 <= c <= 1.0 for c in coords):
        raise SceneGraphError(row_id, name, value, "coordinates must be normalised to [0, 1]", "box_out_of_range")
    x0, y0, x1, y1 = coords
    if x1 < x0 or y1 < y0:
        raise SceneGraphError(row_id, name, value, "needs x0 <= x1 and y0 <= y1", "box_inverted")
    return (x0, y0, x1, y1)


def _check_int(row_id: Any, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SceneGraphError(row_id, name, value, "must be an integer", "bad_type")
    return value


def _as_list(row_id: Any, name: str, value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise SceneGraphError(row_id, name, value, "must be a list", "bad_type")
    return list(value)


def id_key(value: Any) -> str | None:
    """The text an accepted id becomes (and the output keys derive from): strings as they are, integers in
    decimal; None for any other type. Duplicates are found on this, so 7 and "7" are the same id."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _check_id(value: Any, limits: ValidationLimits) -> str:
    text = id_key(value)
    if text is None:
        raise SceneGraphError(value, "id", value, "must be a string or an integer", "bad_id")
    if not is_utf8(text):
        raise SceneGraphError(value, "id", value, "is not valid Unicode (lone surrogate)", "bad_id")
    if not text.strip():
        raise SceneGraphError(value, "id", value, "must not be empty", "bad_id")
    if len(text) > limits.max_id_chars:
        raise SceneGraphError(value, "id", value, f"longer than {limits.max_id_chars} characters", "bad_id")
    return text


def parse_graph(row: Mapping[str, Any], limits: ValidationLimits = DEFAULT_LIMITS) -> SceneGraph:
    """Build a validated SceneGraph from a contract row (a dict as Arrow's ``to_pylist`` gives it).

    Raises SceneGraphError — and only that — for anything that breaks the contract. The input
    mapping is read, never modified.
    """
    if not isinstance(row, Mapping):
        raise SceneGraphError(None, "row", row, "must be a mapping with id, objects, relations", "bad_type")
    row_id = _check_id(row.get("id"), limits)

    raw_objects = _as_list(row_id, "objects", row.get("objects"))
    if not raw_objects:
        raise SceneGraphError(row_id, "objects", row.get("objects"), "a graph needs at least one object", "no_objects")
    if len(raw_objects) > limits.max_objects:
        raise SceneGraphError(
            row_id, "objects", f"<{len(raw_objects)} objects>", f"more than {limits.max_objects} objects", "too_many_objects"
        )
    objects = []
    for i, obj in enumerate(raw_objects):
        if not isinstance(obj, Mapping):
            raise SceneGraphError(row_id, f"objects[{i}]", obj, "must be a struct with label", "bad_type")
        label = _check_text(row_id, f"objects[{i}].label", obj.get("label"), limits)
        attrs = tuple(
            _check_text(row_id, f"objects[{i}].attributes[{j}]", a, limits)
            for j, a in enumerate(_as_list(row_id, f"objects[{i}].attributes", obj.get("attributes")))
        )
        box = _check_box(row_id, f"objects[{i}].box", obj.get("box"))
        objects.append(SGObject(label=label, attributes=attrs, box=box))

    raw_relations = _as_list(row_id, "relations", row.get("relations"))
    if len(raw_relations) > limits.max_relations:
        raise SceneGraphError(
            row_id,
            "relations",
            f"<{len(raw_relations)} relations>",
            f"more than {limits.max_relations} relations",
            "too_many_relations",
        )
    relations = []
    for k, rel in enumerate(raw_relations):
        if not isinstance(rel, Mapping):
            raise SceneGraphError(row_id, f"relations[{k}]", rel, "must be a struct subject/predicate/object", "bad_type")
        s = _check_int(row_id, f"relations[{k}].subject", rel.get("subject"))
        o = _check_int(row_id, f"relations[{k}].object", rel.get("object"))
        for name, idx in (("subject", s), ("object", o)):
            if not 0 <= idx < len(objects):
                raise SceneGraphError(
                    row_id,
                    f"relations[{k}].{name}",
                    idx,
                    f"index out of range for {len(objects)} objects",
                    "relation_index_out_of_range",
                )
        if s == o:
            raise SceneGraphError(row_id, f"relations[{k}]", dict(rel), "relates an object to itself", "self_relation")
        pred = _check_text(row_id, f"relations[{k}].predicate", rel.get("predicate"), limits)
        relations.append(SGRelation(subject=s, predicate=pred, object=o))

    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise SceneGraphError(row_id, "caption", caption, "must be a string or null", "bad_type")
    if caption is not None and not is_utf8(caption):
        raise SceneGraphError(row_id, "caption", caption, "is not valid Unicode (lone surrogate)", "bad_text")
    image = row.get("image")
    if image is not None and not isinstance(image, (bytes, bytearray, memoryview)):
        raise SceneGraphError(row_id, "image", _short(image, 40), "must be encoded image bytes or null", "bad_type")
    seed = row.get("seed")
    if seed is not None:
        seed = _check_int(row_id, "seed", seed)
        if not 0 <= seed < 2**63:
            raise SceneGraphError(row_id, "seed", seed, "must be in [0, 2**63)", "bad_seed")
    return SceneGraph(
        id=row_id,
        objects=tuple(objects),
        relations=tuple(relations),
        caption=caption,
        image=bytes(image) if image is not None else None,
        seed=seed,
    )


def validate_graph(graph: SceneGraph, limits: ValidationLimits = DEFAULT_LIMITS) -> SceneGraph:
    """Validate a SceneGraph built in code (round-trips it through the row contract)."""
    return parse_graph(graph_to_row(graph), limits)


class DuplicateIdChecker:
    """Remembers the ids seen in one input and rejects a repeat (memory grows with the id count)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def check(self, row_id: str) -> None:
        if row_id in self._seen:
            raise SceneGraphError(row_id, "id", row_id, "duplicate id in this input", "duplicate_id")
        self._seen.add(row_id)


# ----------------------------------------------------------------------------- Arrow contract

OBJECT_TYPE = pa.struct(
    [
        pa.field("label", pa.string()),
        pa.field("attributes", pa.list_(pa.string())),
        pa.field("box", pa.list_(pa.float32())),
    ]
)
RELATION_TYPE = pa.struct(
    [
        pa.field("subject", pa.int32()),
        pa.field("predicate", pa.string()),
        pa.field("object", pa.int32()),
    ]
)
GRAPH_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("objects", pa.list_(OBJECT_TYPE)),
        pa.field("relations", pa.list_(RELATION_TYPE)),
        pa.field("caption", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("seed", pa.int64()),
    ]
)
ERROR_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("reason", pa.string())])


def graph_to_row(graph: SceneGraph) -> dict[str, Any]:
    return {
        "id": graph.id,
        "objects": [
            {"label": o.label, "attributes": list(o.attributes), "box": list(o.box) if o.box is not None else None}
            for o in graph.objects
        ],
        "relations": [{"subject": r.subject, "predicate": r.predicate, "object": r.object} for r in graph.relations],
        "caption": graph.caption,
        "image": graph.image,
        "seed": graph.seed,
    }


def graphs_to_table(graphs: Iterable[SceneGraph], extra: Mapping[str, pa.Array] | None = None) -> pa.Table:
    """Graphs as a contract table; ``extra`` adds columns (e.g. the shapes world's class maps)."""
    table = pa.Table.from_pylist([graph_to_row(g) for g in graphs], schema=GRAPH_SCHEMA)
    for name, column in (extra or {}).items():
        table = table.append_column(name, column)
    return table


def table_to_graphs(table: pa.Table, limits: ValidationLimits = DEFAULT_LIMITS) -> list[SceneGraph]:
    return [parse_graph(row, limits) for row in table.to_pylist()]


# ----------------------------------------------------------------------------- keys and seeds

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_key(row_id: str) -> str:
    """A filesystem/S3-safe key for an id. Sanitised ids get a hash suffix so distinct ids never collide."""
    cleaned = _UNSAFE.sub("_", row_id).strip("._")[:80]
    if cleaned == row_id:
        return cleaned
    digest = hashlib.sha1(row_id.encode()).hexdigest()[:10]
    return f"{cleaned or 'id'}-{digest}"


def derive_seed(base_seed: int, row_id: str, sample_index: int) -> int:
    """Seed of one sample from (base seed, graph id, sample index): reruns reproduce the same image."""
    digest = hashlib.blake2b(f"{base_seed}\x1f{row_id}\x1f{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ----------------------------------------------------------------------------- PyG


def to_pyg(graph: SceneGraph):
    """A torch-geometric ``Data`` with the graph's structure; strings stay strings for the text embedder.

    Fields: ``edge_index`` [2, T] (subject -> object), ``boxes`` [N, 4] (zeros where missing),
    ``has_box`` [N] bool, ``labels`` list[str] (N), ``attributes`` list[list[str]] (N),
    ``predicates`` list[str] (T). ``Batch.from_data_list`` offsets ``edge_index`` per graph.
    """
    import torch
    from torch_geometric.data import Data

    edge_index = torch.tensor(
        [[r.subject for r in graph.relations], [r.object for r in graph.relations]], dtype=torch.long
    ).reshape(2, -1)
    boxes = torch.tensor([list(o.box) if o.box is not None else [0.0] * 4 for o in graph.objects], dtype=torch.float32)
    has_box = torch.tensor([o.box is not None for o in graph.objects], dtype=torch.bool)
    return Data(
        edge_index=edge_index,
        num_nodes=len(graph.objects),
        boxes=boxes,
        has_box=has_box,
        labels=[o.label for o in graph.objects],
        attributes=[list(o.attributes) for o in graph.objects],
        predicates=[r.predicate for r in graph.relations],
    )


def to_pyg_batch(graphs: Sequence[SceneGraph]):
    from torch_geometric.data import Batch

    return Batch.from_data_list([to_pyg(g) for g in graphs])
