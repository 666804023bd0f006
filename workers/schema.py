"""Arrow schemas of the rows that flow between the job stages and into the output tables."""

from __future__ import annotations

import pyarrow as pa

from sgmodel.scoring import RECALL_ROW_SCHEMA
from workers.validate import VALIDATED_SCHEMA  # noqa: F401 - defined there so validation never imports torch

GENERATED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("graph", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("sample_index", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("image", pa.binary()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("steps", pa.int32()),
        pa.field("guidance", pa.float32()),
        pa.field("gen_seconds", pa.float32()),
        pa.field("generated_at", pa.timestamp("us", tz="UTC")),
    ]
)
"""One row per image (or one per rejected input row, with ``image`` null and ``error`` set).

``generated_at``: when the generator finished the image's batch (one value per batch), so a run's
output shows its steady generation rate and any stalls."""

SCORED_SCHEMA = pa.schema(list(GENERATED_SCHEMA) + list(RECALL_ROW_SCHEMA) + [pa.field("score_seconds", pa.float32())])

CANDIDATE_SCORES = [
    pa.field("expected_recall", pa.float64()),
    pa.field("final_recall", pa.float64()),
]
"""Per candidate: the soft recall the drafts are ranked by, and the recall of its full render (null when
its seed was not rendered in full; in naive mode the candidate is the full render)."""

CANDIDATE_TYPE = pa.struct(
    [
        pa.field("candidate_index", pa.int32()),
        pa.field("seed", pa.int64()),
        *RECALL_ROW_SCHEMA,
        *CANDIDATE_SCORES,
        pa.field("won", pa.bool_()),
        pa.field("image", pa.binary()),
    ]
)
SBPC_FIELDS = [
    pa.field("candidates_drawn", pa.int32()),
    pa.field("winner_candidate", pa.int32()),
    pa.field("finals_rendered", pa.int32()),
    pa.field("candidate_steps", pa.int32()),
    pa.field("candidate_height", pa.int32()),
]
SBPC_SCHEMA = pa.schema(list(SCORED_SCHEMA) + SBPC_FIELDS + [pa.field("candidates", pa.list_(CANDIDATE_TYPE))])
"""SBPC actor output: the final image of each graph with its recall, and every candidate it drew."""

METADATA_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("sample_index", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("image_key", pa.string()),
        *RECALL_ROW_SCHEMA,
        pa.field("steps", pa.int32()),
        pa.field("guidance", pa.float32()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("model_fingerprint", pa.string()),
        pa.field("gen_seconds", pa.float32()),
        pa.field("generated_at", pa.timestamp("us", tz="UTC")),
        pa.field("score_seconds", pa.float32()),
        pa.field("shard", pa.string()),
        pa.field("graph", pa.string()),
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
    ]
)
"""``metadata/*.parquet``: one row per image; recall columns are null when scoring is off.

``key``: the image file's stem (PNG) or its WebDataset ``__key__`` (tar), unique in a run;
``caption``: the graph written as text (:func:`sgmodel.caption.graph_caption`); ``image_key``: the
image's path in the run (``images/{shard}-{digest}.tar/{key}.png`` for a sample in a tar)."""

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("code", pa.string()),
        pa.field("shard", pa.string()),
    ]
)
"""``errors/*.parquet``: one row per rejected input row."""

SBPC_METADATA_SCHEMA = pa.schema(list(METADATA_SCHEMA) + SBPC_FIELDS)
"""``metadata/*.parquet`` of an SBPC run: the winners, with how many candidates each graph drew."""

CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("candidate_index", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("stage", pa.string()),
        pa.field("steps", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        *RECALL_ROW_SCHEMA,
        *CANDIDATE_SCORES,
        pa.field("won", pa.bool_()),
        pa.field("image_key", pa.string()),
    ]
)
"""``candidates/*.parquet``: every SBPC candidate with its score; image_key set with --keep-candidates."""

STATS_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("images", pa.int64()),
        pa.field("errors", pa.int64()),
        pa.field("recall_sum", pa.float64()),
        pa.field("recall_count", pa.int64()),
        pa.field("errors_by_reason", pa.string()),
        pa.field("started", pa.float64()),
    ]
)
"""What the sink returns to the driver per (batch, shard): small, so the driver's memory stays flat.
``errors_by_reason`` is a JSON object {code: rows}; ``started`` (epoch seconds) when the generator began
the earliest batch of these rows."""
