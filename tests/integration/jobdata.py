"""Input tables for the job tests: shapes graphs in several Parquet shards, plus one bad row per validation error."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sgmodel.graph import GRAPH_SCHEMA, graph_to_row
from sgmodel.shapes.world import iter_shapes_records

GOOD = {"objects": [{"label": "circle", "attributes": ["red"], "box": None}], "relations": []}

BAD_ROWS = {
    # expected error code: a row that triggers it
    "no_objects": {"id": "bad-empty", "objects": [], "relations": []},
    "relation_index_out_of_range": {"id": "bad-index", **GOOD, "relations": [{"subject": 0, "predicate": "above", "object": 5}]},
    "self_relation": {"id": "bad-self", "objects": GOOD["objects"] * 2, "relations": [{"subject": 1, "predicate": "above", "object": 1}]},
    "empty_text": {"id": "bad-label", "objects": [{"label": " ", "attributes": [], "box": None}], "relations": []},
    "text_too_long": {"id": "bad-long", "objects": [{"label": "x" * 200, "attributes": [], "box": None}], "relations": []},
    "box_not_finite": {"id": "bad-nan", "objects": [{"label": "circle", "attributes": [], "box": [0.1, math.nan, 0.5, 0.5]}], "relations": []},
    "box_out_of_range": {"id": "bad-range", "objects": [{"label": "circle", "attributes": [], "box": [0.1, 0.1, 1.5, 0.5]}], "relations": []},
    "box_inverted": {"id": "bad-inverted", "objects": [{"label": "circle", "attributes": [], "box": [0.6, 0.1, 0.2, 0.5]}], "relations": []},
    "too_many_objects": {"id": "bad-many", "objects": GOOD["objects"] * 9, "relations": []},
}
"""With --max-objects 8; a duplicated id adds ``duplicate_id`` (both copies rejected)."""


def shapes_rows(count: int, seed: int) -> list[dict]:
    return [graph_to_row(replace(g, image=None)) for g, _ in iter_shapes_records(count, seed)]


def write_shards(folder: Path, rows: list[dict], per_shard: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, len(rows), per_shard):
        path = folder / f"part-{i // per_shard:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[i : i + per_shard], schema=GRAPH_SCHEMA), path)
        paths.append(path)
    return paths


def bad_rows() -> list[dict]:
    dup = {"id": "dup", **GOOD}
    rows = [{"caption": None, "image": None, "seed": None, **r} for r in BAD_ROWS.values()]
    return rows + [{"caption": None, "image": None, "seed": None, **dup}] * 2
