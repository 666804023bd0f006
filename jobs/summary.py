"""summary.json: counts and recall statistics of a whole run, computed from its tables.

Read back from metadata/ and errors/ (not from the driver's counters), so a resumed run's summary
covers the earlier attempts too and always agrees with what is on disk.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.schema import ERRORS_SCHEMA, METADATA_SCHEMA
from workers.storage import Storage

HISTOGRAM_BINS = 10
UNSCORABLE_WARNING = 0.2
"""Warn when more than this fraction of a run's objects matched no segmenter class."""

logger = logging.getLogger("sgbatch")


def read_table(storage: Storage, folder: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Concatenate every Parquet file under a run folder (empty table with ``schema`` if none)."""
    files = [u for u in storage.list(folder) if u.endswith(".parquet")]
    wanted = columns or schema.names
    if not files:
        return schema.empty_table().select(wanted)
    tables = []
    for uri in files:
        fs, path = storage.filesystem(uri)
        tables.append(pq.read_table(path, filesystem=fs, columns=wanted))
    return pa.concat_tables(tables, promote_options="default")


def recall_stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    arr = np.asarray(values, dtype=np.float64)
    hist, edges = np.histogram(arr, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return {
        "count": int(arr.size),
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "p10": float(np.percentile(arr, 10)),
        "p90": float(np.percentile(arr, 90)),
        "fraction_at_least": {str(t): float((arr >= t).mean()) for t in (0.5, 0.75, 0.9, 1.0)},
        "histogram": {"edges": [round(float(e), 3) for e in edges], "counts": hist.astype(int).tolist()},
    }


def scorability(recall: list, found: list, missing: list, unscorable: list) -> dict:
    """Recall over the images with at least one scorable object, and the share of objects the segmenter cannot see.

    An image whose objects all match no segmenter class scores recall 1.0 (nothing visible is missing),
    which inflates the overall mean; ``mean_scorable`` leaves those images out.
    """
    scored = [(r, len(f or ()), len(m or ()), len(u or ())) for r, f, m, u in zip(recall, found, missing, unscorable)
              if r is not None]
    objects = sum(f + m + u for _, f, m, u in scored)
    blind = sum(u for *_, u in scored)
    with_scorable = [r for r, f, m, _ in scored if f + m > 0]
    return {
        "mean_scorable": float(np.mean(with_scorable)) if with_scorable else None,
        "images_scorable": len(with_scorable),
        "objects": objects,
        "objects_unscorable": blind,
        "unscorable_fraction": blind / objects if objects else None,
    }


def summarize(storage: Storage, run_uri: str, rows_in: int, extra: dict | None = None) -> dict:
    meta = read_table(storage, f"{run_uri}/metadata", METADATA_SCHEMA,
                      ["id", "sample_index", "recall", "relation_score", "relations_checked", "relations_satisfied",
                       "precision", "extra_objects", "gen_seconds", "score_seconds", "found", "missing", "unscorable"])
    errors = read_table(storage, f"{run_uri}/errors", ERRORS_SCHEMA, ["id", "code"])
    ids = meta.column("id").to_pylist()
    generated_rows = len(set(ids))
    recall = [v for v in meta.column("recall").to_pylist() if v is not None]
    relation = [v for v in meta.column("relation_score").to_pylist() if v is not None and not math.isnan(v)]
    precision = [v for v in meta.column("precision").to_pylist() if v is not None]
    extras = [len(v) for v in meta.column("extra_objects").to_pylist() if v is not None]
    checked = sum(v or 0 for v in meta.column("relations_checked").to_pylist())
    satisfied = sum(v or 0 for v in meta.column("relations_satisfied").to_pylist())
    gen = [v for v in meta.column("gen_seconds").to_pylist() if v is not None]
    score = [v for v in meta.column("score_seconds").to_pylist() if v is not None]
    by_reason = Counter(errors.column("code").to_pylist())
    summary = {
        "rows_in": rows_in,
        "rows_generated": generated_rows,
        "images": meta.num_rows,
        "errors": errors.num_rows,
        "errors_by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], str(kv[0])))),
        "rows_lost": rows_in - generated_rows - errors.num_rows,
        "error_fraction": errors.num_rows / rows_in if rows_in else 0.0,
        "recall": recall_stats(recall) | scorability(
            meta.column("recall").to_pylist(), meta.column("found").to_pylist(), meta.column("missing").to_pylist(),
            meta.column("unscorable").to_pylist()),
        "relation_score": {"count": len(relation), "mean": float(np.mean(relation)) if relation else None},
        # satisfied / checked spatial relations over all images (each relation weighs the same)
        "relation_accuracy": {"checked": checked, "accuracy": satisfied / checked if checked else None},
        "precision": {"count": len(precision), "mean": float(np.mean(precision)) if precision else None},
        "extra_objects": {"total": int(sum(extras)),
                          "images_with_extras": int(sum(n > 0 for n in extras)),
                          "fraction_without_extras": float(np.mean([n == 0 for n in extras])) if extras else None},
        "seconds_per_image": {
            "generate": float(np.mean(gen)) if gen else None,
            "score": float(np.mean(score)) if score else None,
        },
    }
    summary.update(extra or {})
    blind = summary["recall"]["unscorable_fraction"]
    if blind is not None and blind > UNSCORABLE_WARNING:
        scorable = summary["recall"]["mean_scorable"]
        logger.warning(
            "%d of %d objects (%.0f%%) matched no segmenter class and count as found: mean recall %.3f over all images, "
            "%s over the %d images with a scorable object. Map labels to the segmenter's classes with --label-map.",
            summary["recall"]["objects_unscorable"], summary["recall"]["objects"], 100 * blind,
            summary["recall"]["mean"], "n/a" if scorable is None else f"{scorable:.3f}",
            summary["recall"]["images_scorable"])
    return summary
