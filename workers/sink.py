"""Sink: writes images, metadata and error tables for each batch and reports small per-shard stats.

File names are functions of the rows they hold (ids and sample indices), so a batch that Ray
retries overwrites its own files instead of duplicating them. Commit markers are written by the
driver, last, once every row of an input shard has come through here.

Every image has a ``key`` (img2dataset's): the PNG file's stem, or the WebDataset sample's
``__key__`` in a tar, where ``{key}.png`` sits beside ``{key}.txt`` (the caption: the graph as
text) and ``{key}.json`` (the metadata row: graph, seed, scores). Metadata rows carry the same
``key`` and ``caption``, so tables join to files by key alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from sgmodel.caption import graph_caption
from sgmodel.graph import safe_key
from workers.schema import (
    CANDIDATES_SCHEMA,
    ERRORS_SCHEMA,
    METADATA_SCHEMA,
    SBPC_METADATA_SCHEMA,
    STATS_SCHEMA,
)
from workers.storage import Storage, join
from workers.validate import graph_from_json

OUTPUT_FORMATS = ("png", "webdataset")
UNREPEATABLE = ("gen_seconds", "score_seconds", "generated_at", "image_key", "shard")
"""Metadata left out of a tar's ``{key}.json``: timings and where the row sits, so identical reruns
write identical tars."""


@dataclass(frozen=True, kw_only=True)
class SinkSettings:
    run_uri: str
    output_format: str = "png"
    model_fingerprint: str = ""


def image_name(row_id: str, sample_index: int) -> str:
    """``{key}-{k:03d}`` with no dots (WebDataset groups a sample's files by the name before the first dot)."""
    key = safe_key(row_id)
    if "." in key:
        key = key.replace(".", "_") + "-" + hashlib.sha1(row_id.encode()).hexdigest()[:8]
    return f"{key}-{sample_index:03d}"


def call_starts(rows: list[dict]) -> dict:
    """When each generator call began, by the time it ended: a call stamps its rows with its end
    (``generated_at``) and their seconds (``gen_seconds``), which add up to its length."""
    spent: dict = {}
    for r in rows:
        if r.get("generated_at") is not None:
            spent[r["generated_at"]] = spent.get(r["generated_at"], 0.0) + (r.get("gen_seconds") or 0.0)
    return {end: end.timestamp() - seconds for end, seconds in spent.items()}


def batch_digest(rows: list[dict]) -> str:
    names = sorted(f"{r['id']}\x1f{r['sample_index']}" for r in rows)
    return hashlib.sha1("\x1e".join(names).encode()).hexdigest()[:12]


class Sink:
    def __init__(self, settings: SinkSettings, storage_settings=None) -> None:
        if settings.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {settings.output_format!r}")
        self.settings = settings
        self.storage = Storage(storage_settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        by_shard: dict[str, list[dict]] = {}
        for row in rows:
            by_shard.setdefault(row["shard"], []).append(row)
        starts = call_starts(rows)
        out = []
        for shard, part in by_shard.items():
            began = [starts[r["generated_at"]] for r in part if r.get("generated_at") is not None]
            out.append({**self._write_shard(shard, part), "started": min(began, default=time.time())})
        return pa.Table.from_pylist(out, schema=STATS_SCHEMA)

    def _write_shard(self, shard: str, rows: list[dict]) -> dict:
        run = self.settings.run_uri
        digest = batch_digest(rows)
        images = [r for r in rows if r.get("image") is not None]
        errors = [r for r in rows if r.get("image") is None]
        sbpc = bool(images) and "candidates" in images[0]
        schema = SBPC_METADATA_SCHEMA if sbpc else METADATA_SCHEMA
        keys = [image_name(r["id"], r["sample_index"]) for r in images]
        meta = [self._metadata_row(r, key, self._image_path(shard, digest, key), schema) for r, key in zip(images, keys)]
        self._write_images(shard, digest, images, meta)
        if images:
            self.storage.write_parquet(pa.Table.from_pylist(meta, schema=schema),
                                       join(run, "metadata", f"{shard}-{digest}.parquet"))
        if sbpc:
            self._write_candidates(shard, digest, images)
        if errors:
            err = [{"id": r["id"], "reason": r["error"], "code": r["error_code"], "shard": shard} for r in errors]
            self.storage.write_parquet(pa.Table.from_pylist(err, schema=ERRORS_SCHEMA),
                                       join(run, "errors", f"{shard}-{digest}.parquet"))
        recalls = [r["recall"] for r in images if r.get("recall") is not None]
        # An input row counts once: by its first image, or by its error row.
        inputs = sum(1 for r in images if r["sample_index"] == 0) + len(errors)
        return {"shard": shard, "rows": inputs, "images": len(images), "errors": len(errors),
                "recall_sum": float(sum(recalls)), "recall_count": len(recalls),
                "errors_by_reason": json.dumps(Counter(r["error_code"] for r in errors))}

    def _image_path(self, shard: str, digest: str, key: str) -> str:
        """``image_key``: the PNG's path in the run, or ``{tar path}/{key}.png`` for a sample inside a tar."""
        if self.settings.output_format == "png":
            return f"images/{shard}/{key}.png"
        return f"images/{shard}-{digest}.tar/{key}.png"

    def _write_images(self, shard: str, digest: str, rows: list[dict], meta: list[dict]) -> None:
        run = self.settings.run_uri
        if self.settings.output_format == "png":
            for row, m in zip(rows, meta):
                self.storage.write_bytes(join(run, m["image_key"]), row["image"], content_type="image/png")
            return
        if not rows:
            return
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row, m in zip(rows, meta):
                for ext, data in (("png", row["image"]), ("txt", m["caption"].encode()),
                                  ("json", json.dumps(sample_json(m)).encode())):
                    info = tarfile.TarInfo(f"{m['key']}.{ext}")
                    info.size, info.mtime = len(data), 0  # mtime 0: identical reruns give identical bytes
                    tar.addfile(info, io.BytesIO(data))
        self.storage.write_bytes(join(run, f"images/{shard}-{digest}.tar"), buf.getvalue(),
                                 content_type="application/x-tar")

    def _write_candidates(self, shard: str, digest: str, rows: list[dict]) -> None:
        """candidates/{shard}-{digest}.parquet, and the candidate images when the job kept them."""
        run = self.settings.run_uri
        table = []
        for row in rows:
            name = image_name(row["id"], 0)
            for c in row["candidates"]:
                key = None
                if c.get("image") is not None:
                    key = f"candidates/images/{shard}/{name}-c{c['candidate_index']:03d}.png"
                    self.storage.write_bytes(join(run, key), c["image"], content_type="image/png")
                table.append({
                    "id": row["id"], "shard": shard, "stage": "draft" if row["candidate_steps"] != row["steps"] else "full",
                    "steps": row["candidate_steps"], "height": row["candidate_height"],
                    "width": row["candidate_height"] * row["width"] // row["height"], "image_key": key,
                    **{k: c[k] for k in CANDIDATES_SCHEMA.names if k in c and k != "image"},
                })
        self.storage.write_parquet(pa.Table.from_pylist(table, schema=CANDIDATES_SCHEMA),
                                   join(run, "candidates", f"{shard}-{digest}.parquet"))

    def _metadata_row(self, row: dict, key: str, image_path: str, schema: pa.Schema = METADATA_SCHEMA) -> dict:
        out = {name: row.get(name) for name in schema.names}
        out["image_key"] = image_path
        out["model_fingerprint"] = self.settings.model_fingerprint
        out["key"] = key
        out["caption"] = graph_caption(graph_from_json(row["graph"]))
        return out


def sample_json(meta: dict) -> dict:
    """A tar sample's ``{key}.json``: its metadata row with the graph as JSON, without timings."""
    out = {k: v for k, v in meta.items() if k not in UNREPEATABLE}
    out["graph"] = json.loads(meta["graph"])
    return out
