"""Validation: contract rows in, one validated row out per input row (never raises).

Imports nothing heavier than pyarrow: the read tasks that run it must stay small (the recall
schema in ``workers.schema`` pulls in torch, about 150 MiB per process).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from sgmodel.graph import SceneGraph, SceneGraphError, ValidationLimits, graph_to_row, id_key, parse_graph

GRAPH_COLUMNS = ("id", "objects", "relations", "caption", "seed")
"""Input columns the jobs read (``image`` is left on disk: generation does not need it)."""

VALIDATED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("graph", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_code", pa.string()),
    ]
)
"""After validation: the contract columns the generator needs, plus where the row came from and why it
was rejected (null when valid). ``graph`` is the validated graph as JSON (null for rejected rows)."""


def graph_to_json(graph: SceneGraph) -> str:
    row = graph_to_row(graph)
    row.pop("image", None)
    return json.dumps(row, separators=(",", ":"))


def graph_from_json(text: str) -> SceneGraph:
    return parse_graph(json.loads(text))


def find_duplicates(ids: Iterable[Any], seen: set[str], dupes: set[str]) -> None:
    """Add to ``dupes`` every id (as :func:`id_key` reads it) already in ``seen``; ``seen`` grows."""
    for value in ids:
        key = id_key(value)
        if key is None:
            continue
        if key in seen:
            dupes.add(key)
        seen.add(key)


def validate_rows(
    rows: list[dict[str, Any]], shards: list[str], limits: ValidationLimits, duplicate_ids: frozenset[str]
) -> pa.Table:
    out = []
    for row, shard in zip(rows, shards):
        raw_id = row.get("id")
        try:
            key = id_key(raw_id)
            if key is not None and key in duplicate_ids:
                raise SceneGraphError(raw_id, "id", raw_id, "duplicate id in this input (every copy is rejected)",
                                      "duplicate_id")
            graph = parse_graph(row, limits)
            out.append({"id": graph.id, "shard": shard, "graph": graph_to_json(graph), "error": None, "error_code": None})
        except SceneGraphError as err:
            out.append({"id": None if raw_id is None else str(raw_id), "shard": shard, "graph": None,
                        "error": str(err), "error_code": err.code})
    return pa.Table.from_pylist(out, schema=VALIDATED_SCHEMA)
