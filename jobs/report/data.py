"""What the run report reads from a run folder, and which rows it shows.

Large runs stay cheap: metadata is first read with its few scalar columns only, the gallery rows
are chosen from those, and the heavy columns (scene graph JSON, object lists) are then read only
from the files that hold a chosen row. The choice is deterministic (a hash of id and sample
index), so rebuilding a report shows the same images.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sgmodel.sbpc import table3_statistics
from workers.storage import Storage, join

LIGHT_COLUMNS = ("id", "sample_index", "image_key", "recall", "relation_score")
"""Read for every metadata row (cheap); everything else only for the rows shown."""
DETAIL_COLUMNS = ("seed", "found", "missing", "unscorable", "relations_checked", "relations_satisfied", "precision",
                  "extra_objects", "steps",
                  "height", "width", "gen_seconds", "graph", "candidates_drawn", "winner_candidate")
CANDIDATE_COLUMNS = ("id", "candidate_index", "seed", "recall", "relation_score", "won", "image_key")


def read_json(storage: Storage, uri: str) -> dict | None:
    """A JSON object, or None when the file is absent or unreadable (a report of a partial run still renders)."""
    try:
        data = json.loads(storage.read_text(uri))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def parquet_files(storage: Storage, folder: str) -> list[str]:
    return [u for u in storage.list(folder) if u.endswith(".parquet")]


def _read(storage: Storage, uri: str, columns: Sequence[str]) -> pa.Table:
    fs, path = storage.filesystem(uri)
    names = set(pq.read_schema(path, filesystem=fs).names)
    present = [c for c in columns if c in names]
    table = pq.read_table(path, filesystem=fs, columns=present)
    for c in columns:  # a column an older or other job did not write reads as nulls
        if c not in names:
            table = table.append_column(c, pa.nulls(table.num_rows))
    return table


def sample_rank(row_id: str, sample_index: int) -> int:
    """Stable pseudo-random rank of an image: the gallery shows the images with the smallest ranks."""
    digest = hashlib.sha1(f"{row_id}\x1f{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(slots=True)
class Image:
    """One metadata row as the gallery shows it (made only for the rows shown)."""

    file: int
    row: int
    id: str
    sample_index: int
    image_key: str | None
    recall: float | None
    relation_score: float | None
    details: dict[str, Any] = field(default_factory=dict)


class ImageIndex:
    """Every image of a run as numpy columns (file, row, rank, recall) plus the light Arrow tables.

    About 30 bytes per image in numpy and the Arrow columns' own size, instead of a Python object
    per row: choosing the gallery of a run with millions of images stays within a few hundred MB.
    """

    def __init__(self, tables: Sequence[pa.Table]) -> None:
        self.tables = list(tables)
        sizes = [t.num_rows for t in self.tables]
        self.file = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        self.row = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if sizes else np.zeros(0, np.int64)
        ranks, recalls = [], []
        for t in self.tables:
            ids = t.column("id").to_pylist()
            samples = t.column("sample_index").fill_null(0).to_pylist()
            ranks.append(np.fromiter((sample_rank(str(i), int(k)) for i, k in zip(ids, samples)), dtype=np.uint64,
                                     count=t.num_rows))
            recalls.append(t.column("recall").cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False))
        self.rank = np.concatenate(ranks) if ranks else np.zeros(0, np.uint64)
        self.recall = np.concatenate(recalls).astype(np.float64) if recalls else np.zeros(0)

    def __len__(self) -> int:
        return int(self.rank.size)

    @property
    def scored_recalls(self) -> np.ndarray:
        return self.recall[np.isfinite(self.recall)]

    def image(self, i: int) -> Image:
        f, r = int(self.file[i]), int(self.row[i])
        row = self.tables[f].slice(r, 1).to_pylist()[0]
        return Image(f, r, str(row["id"]), int(row["sample_index"] or 0), row["image_key"], row["recall"],
                     row["relation_score"])


@dataclass
class Selection:
    """The gallery (a deterministic sample, shown in id order) and the lowest-recall images (worst first)."""

    total: int
    gallery: list[Image]
    worst: list[Image]

    @property
    def shown(self) -> int:
        return len({(i.file, i.row) for i in [*self.gallery, *self.worst]})


def select_images(index: ImageIndex, max_images: int) -> Selection:
    """At most ``max_images`` distinct images: up to a quarter the lowest-recall ones, the rest a sample.

    The sample is the images with the smallest :func:`sample_rank`, so it does not depend on how
    the rows are spread over files. When the whole run fits, every image is in the gallery and
    the worst section re-lists the lowest ones (no extra files).
    """
    n = len(index)
    scored = np.nonzero(np.isfinite(index.recall))[0]
    n_worst = min(scored.size, max(1, max_images // 4)) if max_images > 1 else 0
    order = np.lexsort((index.rank[scored], index.recall[scored]))  # by recall, ties by rank
    worst = scored[order[:n_worst]]
    if n <= max_images:
        gallery = np.arange(n)
    else:
        rest = np.setdiff1d(np.arange(n), worst, assume_unique=True)
        k = max_images - n_worst
        gallery = rest[np.argsort(index.rank[rest], kind="stable")[:k]] if k > 0 else rest[:0]
    by_pos = {int(i): index.image(int(i)) for i in np.union1d(gallery, worst)}
    shown = sorted((by_pos[int(i)] for i in gallery), key=lambda im: (im.id, im.sample_index))
    return Selection(total=n, gallery=shown, worst=[by_pos[int(i)] for i in worst])


@dataclass
class RunData:
    """Everything the report needs from one run folder."""

    uri: str
    info: dict
    """run.json ({} when missing)."""
    summary: dict | None
    metadata_files: list[str]
    images: ImageIndex
    errors: pa.Table
    errors_total: int
    candidates: pa.Table | None
    metrics: list[dict] | None

    @property
    def job(self) -> str:
        job = self.info.get("job") or (self.summary or {}).get("job")
        if job:
            return str(job)
        return "finetune" if self.metrics is not None and not self.metadata_files else "generate"

    @property
    def recalls(self) -> list[float]:
        return self.images.scored_recalls.tolist()


def load_run(storage: Storage, run_uri: str, max_errors: int) -> RunData:
    info = read_json(storage, join(run_uri, "run.json")) or {}
    summary = read_json(storage, join(run_uri, "summary.json"))
    meta_files = parquet_files(storage, join(run_uri, "metadata"))
    images = ImageIndex([_read(storage, uri, LIGHT_COLUMNS) for uri in meta_files])
    errors, errors_total = _read_errors(storage, run_uri, max_errors)
    cand_files = parquet_files(storage, join(run_uri, "candidates"))
    candidates = (pa.concat_tables([_read(storage, u, CANDIDATE_COLUMNS) for u in cand_files],
                                   promote_options="default") if cand_files else None)
    return RunData(uri=run_uri, info=info, summary=summary, metadata_files=meta_files, images=images,
                   errors=errors, errors_total=errors_total, candidates=candidates,
                   metrics=_read_metrics(storage, join(run_uri, "metrics.jsonl")))


def _read_errors(storage: Storage, run_uri: str, limit: int) -> tuple[pa.Table, int]:
    """The first ``limit`` error rows sorted by (code, id), and how many there are in all."""
    columns = ("id", "code", "reason", "shard")
    tables = [_read(storage, u, columns) for u in parquet_files(storage, join(run_uri, "errors"))]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns}), 0
    table = pa.concat_tables(tables, promote_options="default")
    total = table.num_rows
    table = table.sort_by([("code", "ascending"), ("id", "ascending")])
    return table.slice(0, max(limit, 0)), total


def _read_metrics(storage: Storage, uri: str) -> list[dict] | None:
    """metrics.jsonl rows; a torn last line (a run still writing) is skipped, not fatal."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        return None
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_details(storage: Storage, run: RunData, images: Sequence[Image]) -> None:
    """Fill ``details`` (graph, object lists, seed …) of the given images, reading only their files."""
    by_file: dict[int, list[Image]] = defaultdict(list)
    for image in images:
        if not image.details:
            by_file[image.file].append(image)
    for f, chosen in by_file.items():
        table = _read(storage, run.metadata_files[f], DETAIL_COLUMNS)
        for image in chosen:
            row = table.slice(image.row, 1).to_pylist()[0]
            try:
                row["graph"] = json.loads(row["graph"]) if row.get("graph") else None
            except ValueError:
                row["graph"] = None
            image.details = row


# ----------------------------------------------------------------------------- SBPC


@dataclass
class SbpcStats:
    """FG-DM Table 3 statistics and the best-of-n curve, from the candidates table."""

    table3: dict[str, Any]
    """:func:`sgmodel.sbpc.table3_statistics` of the run's candidates."""
    by_graph: dict[str, list[dict]]
    """Candidates of each graph, in candidate order."""

    @property
    def curve(self) -> list[tuple[int, float]]:
        return self.table3["best_of_n"]

    @property
    def max_candidates(self) -> int:
        return len(self.curve)


def sbpc_stats(candidates: pa.Table) -> SbpcStats | None:
    """Per graph, its candidates in draw order; None when no candidate was scored."""
    by_graph: dict[str, list[dict]] = defaultdict(list)
    for row in candidates.to_pylist():
        by_graph[str(row["id"])].append(row)
    for rows in by_graph.values():
        rows.sort(key=lambda r: (r.get("candidate_index") or 0))
    table3 = table3_statistics([[r.get("recall") for r in rows] for rows in by_graph.values()])
    if not table3["graphs"]:
        return None
    return SbpcStats(table3=table3, by_graph=dict(by_graph))
