"""Validation stage: contract rows in, one validated row out per input row (never raises)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from sgmodel.graph import SceneGraph, SceneGraphError, ValidationLimits, graph_to_row, parse_graph
from workers.schema import VALIDATED_SCHEMA

GRAPH_COLUMNS = ("id", "objects", "relations", "caption", "seed")
"""Input columns the jobs read (``image`` is left on disk: generation does not need it)."""


def graph_to_json(graph: SceneGraph) -> str:
    row = graph_to_row(graph)
    row.pop("image", None)
    return json.dumps(row, separators=(",", ":"))


def graph_from_json(text: str) -> SceneGraph:
    return parse_graph(json.loads(text))


def validate_rows(
    rows: list[dict[str, Any]], shards: list[str], limits: ValidationLimits, duplicate_ids: frozenset[str]
) -> pa.Table:
    out = []
    for row, shard in zip(rows, shards):
        raw_id = row.get("id")
        try:
            if isinstance(raw_id, str) and raw_id in duplicate_ids:
                raise SceneGraphError(raw_id, "id", raw_id, "duplicate id in this input (every copy is rejected)",
                                      "duplicate_id")
            graph = parse_graph(row, limits)
            out.append({"id": graph.id, "shard": shard, "graph": graph_to_json(graph), "error": None, "error_code": None})
        except SceneGraphError as err:
            out.append({"id": None if raw_id is None else str(raw_id), "shard": shard, "graph": None,
                        "error": str(err), "error_code": err.code})
    return pa.Table.from_pylist(out, schema=VALIDATED_SCHEMA)


def validate_batch(
    batch: pa.Table, limits: ValidationLimits, duplicate_ids: frozenset[str], shard_of_path: dict[str, str]
) -> pa.Table:
    """Ray Data task: a batch of input rows (with the ``path`` of their file) -> validated rows."""
    rows = batch.drop_columns([c for c in ("path",) if c in batch.column_names]).to_pylist()
    shards = [shard_of_path[p] for p in batch.column("path").to_pylist()]
    return validate_rows(rows, shards, limits, duplicate_ids)
