"""Run folders for the report tests, written without Ray: an SBPC run and a fine-tune folder.

Images are real shapes-world renders (so screenshots show recognisable pictures); recall values
are chosen by the test so the report's statistics can be checked by hand. The SBPC layout is the
job's: metadata rows with ``candidates_drawn``/``winner_candidate`` and
a ``candidates/`` table with one row per candidate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from html.parser import HTMLParser

import pyarrow as pa

from jobs.summary import recall_stats
from sgmodel.shapes.world import iter_shapes_records
from workers.schema import ERRORS_SCHEMA, METADATA_SCHEMA, SCORED_SCHEMA
from workers.storage import Storage, join
from workers.validate import graph_to_json

HOSTILE_ID = 'evil"<script>alert(1)</script>&'
"""An id that breaks any page that forgets to escape."""

SBPC_RECALLS: tuple[tuple[float, ...], ...] = (
    (0.25, 0.5, 1.0, 0.75),
    (1.0, 0.0, 0.5, 0.5),
    (0.0, 0.0, 0.25, 0.5),
)
"""Candidate recalls per graph, in draw order. Hand-computed from these:
best of n = 1..4: 0.41667, 0.5, 0.75, 0.83333; avg min 0.08333, avg median 0.41667, avg max 0.83333;
avg count >= 0.5 / 0.75 / 0.9: 2.33333 / 1.0 / 0.66667."""

CANDIDATE_SCHEMA = pa.schema([
    pa.field("id", pa.string()), pa.field("shard", pa.string()), pa.field("candidate_index", pa.int32()),
    pa.field("seed", pa.int64()), pa.field("stage", pa.string()), pa.field("steps", pa.int32()),
    pa.field("height", pa.int32()), pa.field("width", pa.int32()), pa.field("recall", pa.float64()),
    pa.field("found", pa.list_(pa.string())), pa.field("missing", pa.list_(pa.string())),
    pa.field("unscorable", pa.list_(pa.string())), pa.field("relation_score", pa.float64()),
    pa.field("relations_checked", pa.int32()), pa.field("relations_satisfied", pa.int32()),
    pa.field("won", pa.bool_()), pa.field("image_key", pa.string()),
])
SBPC_METADATA_SCHEMA = pa.schema([*METADATA_SCHEMA, pa.field("candidates_drawn", pa.int32()),
                                  pa.field("winner_candidate", pa.int32())])


def _describe(obj) -> str:
    return " ".join((*obj.attributes, obj.label))


def write_sbpc_run(storage: Storage, run_uri: str, recalls: Sequence[Sequence[float]] = SBPC_RECALLS,
                   keep_candidates: bool = True, size: int = 32) -> dict:
    """An SBPC run: one winner image per graph, its candidates (images when kept), one error; returns summary.json."""
    shard = "shapes-abc123"
    records = list(iter_shapes_records(len(recalls), seed=11, size=size))
    meta, cands = [], []
    for g, ((graph, _), values) in enumerate(zip(records, recalls)):
        winner = max(range(len(values)), key=lambda i: (values[i], -i))
        renders = list(iter_shapes_records(len(values), seed=100 + g, size=size))
        for c, recall in enumerate(values):
            key = f"candidates/{shard}/{graph.id}-c{c:02d}.png" if keep_candidates else None
            if key:
                storage.write_bytes(join(run_uri, key), renders[c][0].image)
            cands.append({"id": graph.id, "shard": shard, "candidate_index": c, "seed": 1000 * g + c, "stage": "draft",
                          "steps": 4, "height": size, "width": size, "recall": recall, "found": [], "missing": [],
                          "unscorable": [], "relation_score": None, "relations_checked": 0, "relations_satisfied": 0,
                          "won": c == winner, "image_key": key})
        names = [_describe(o) for o in graph.objects]
        n_found = round(values[winner] * len(names))
        key = f"images/{shard}/{graph.id}-000.png"
        storage.write_bytes(join(run_uri, key), graph.image)
        meta.append({"id": graph.id, "sample_index": 0, "seed": 1000 * g + winner, "image_key": key,
                     "recall": values[winner], "found": names[:n_found], "missing": names[n_found:], "unscorable": [],
                     "relation_score": None, "relations_checked": 0, "relations_satisfied": 0, "steps": 25,
                     "guidance": 3.0, "height": size, "width": size, "model_fingerprint": "fp", "gen_seconds": 0.5,
                     "score_seconds": 0.1, "shard": shard, "graph": graph_to_json(graph),
                     "candidates_drawn": len(values), "winner_candidate": winner})
    storage.write_parquet(pa.Table.from_pylist(meta, schema=SBPC_METADATA_SCHEMA),
                          join(run_uri, "metadata", f"{shard}-0001.parquet"))
    storage.write_parquet(pa.Table.from_pylist(cands, schema=CANDIDATE_SCHEMA),
                          join(run_uri, "candidates", f"{shard}-0001.parquet"))
    storage.write_parquet(pa.Table.from_pylist(
        [{"id": HOSTILE_ID, "reason": f"graph {HOSTILE_ID!r}: objects = []: must not be empty", "code": "no_objects",
          "shard": shard}], schema=ERRORS_SCHEMA), join(run_uri, "errors", f"{shard}-0002.parquet"))
    winners = [m["recall"] for m in meta]
    summary = {
        "rows_in": len(recalls) + 1, "rows_generated": len(recalls), "images": len(recalls), "errors": 1,
        "errors_by_reason": {"no_objects": 1}, "rows_lost": 0, "error_fraction": 1 / (len(recalls) + 1),
        "recall": recall_stats(winners), "relation_score": {"count": 0, "mean": None},
        "seconds_per_image": {"generate": 0.5, "score": 0.1}, "run_id": run_uri.rsplit("/", 1)[-1],
        "job": "sbpc", "elapsed_seconds": 12.0, "images_per_second": 0.25, "status": "succeeded",
        "sbpc": {"mode": "draft", "candidates": max(len(v) for v in recalls), "avg_min_recall": 0.08333,
                 "avg_median_recall": 0.41667, "avg_max_recall": 0.83333,
                 "avg_count_at_least": {"0.5": 2.33333, "0.75": 1.0, "0.9": 0.66667},
                 "avg_candidates_drawn": 4.0, "seconds_per_graph": 3.2},
    }
    storage.write_text(join(run_uri, "summary.json"), json.dumps(summary))
    storage.write_text(join(run_uri, "run.json"), json.dumps({
        "job": "sbpc", "run_id": summary["run_id"], "model_fingerprint": "fp",
        "config": {"candidates": 4, "mode": "draft", "keep_candidates": keep_candidates, "steps": 25},
        "versions": {"python": "3.11"},
    }))
    return summary


def finetune_metrics(steps: int = 30) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss_total": 1.0 / step + 0.05, "loss_recon": 0.8 / step + 0.04,
               "loss_clip": 0.3 / step + 0.01, "loss_mmd": 0.02, "lr": 1e-4 * min(1.0, step / 10),
               "samples_per_s": 12.5}
        if step % 10 == 0:
            row["val_loss"] = 1.1 / step + 0.06
        rows.append(row)
    return rows


def write_finetune_run(storage: Storage, run_uri: str, steps: int = 30) -> dict:
    """A fine-tune output folder: pipeline files, run.json, metrics.jsonl (with a torn last line) and summary.json."""
    storage.write_text(join(run_uri, "model_index.json"), json.dumps({"_class_name": "SceneGraphDiffusionPipeline"}))
    storage.write_text(join(run_uri, "run.json"), json.dumps({
        "job": "finetune", "run_id": "ft-1",
        "config": {"model": "models/shapes-sg-diffusion", "zero_stage": 2, "lr": 1e-4, "train_unet": False},
    }))
    lines = [json.dumps(r) for r in finetune_metrics(steps)]
    storage.write_text(join(run_uri, "metrics.jsonl"), "\n".join(lines) + '\n{"step": 31, "loss_to')
    summary = {"job": "finetune", "steps": steps, "final_loss_total": finetune_metrics(steps)[-1]["loss_total"],
               "elapsed_seconds": 95.5, "samples_per_second": 12.5, "status": "succeeded"}
    storage.write_text(join(run_uri, "summary.json"), json.dumps(summary))
    return summary


def write_generate_run(storage: Storage, run_uri: str, count: int = 12, output_format: str = "webdataset",
                       size: int = 32) -> dict:
    """A generate run written by the job's own Sink (PNG files or WebDataset tars), scores set by hand.

    Image i gets recall i / (count - 1) with the last objects listed as missing; one input row
    (with :data:`HOSTILE_ID`) is rejected. Returns summary.json as the job computes it.
    """
    from jobs.summary import summarize
    from workers.sink import Sink, SinkSettings

    shard = "shapes-fed987"
    rows = []
    for i, (graph, _) in enumerate(iter_shapes_records(count, seed=31, size=size)):
        names = [_describe(o) for o in graph.objects]
        recall = i / max(count - 1, 1)
        n_found = math.floor(recall * len(names) + 1e-9)
        rows.append({"id": graph.id, "shard": shard, "graph": graph_to_json(graph), "error": None,
                     "error_code": None, "sample_index": 0, "seed": 7000 + i, "image": graph.image, "height": size,
                     "width": size, "steps": 2, "guidance": 3.0, "gen_seconds": 0.2, "recall": recall,
                     "found": names[:n_found], "missing": names[n_found:], "unscorable": [],
                     "relation_score": 1.0 if graph.relations else None,
                     "relations_checked": len(graph.relations), "relations_satisfied": len(graph.relations),
                     "score_seconds": 0.05})
    rows.append({"id": HOSTILE_ID, "shard": shard, "graph": None, "error": f"graph {HOSTILE_ID!r}: no objects",
                 "error_code": "no_objects", "image": None})
    sink = Sink(SinkSettings(run_uri=run_uri, output_format=output_format, model_fingerprint="fp"), storage.settings)
    half = len(rows) // 2
    for part in (rows[:half], rows[half:]):  # two batches: two tars
        sink(pa.Table.from_pylist([{**{k: None for k in SCORED_SCHEMA.names}, **r} for r in part],
                                  schema=SCORED_SCHEMA))
    summary = summarize(storage, run_uri, rows_in=len(rows), extra={
        "run_id": run_uri.rsplit("/", 1)[-1], "job": "generate", "elapsed_seconds": 4.0, "images_per_second": 3.0})
    summary["status"] = "succeeded"
    storage.write_text(join(run_uri, "summary.json"), json.dumps(summary))
    storage.write_text(join(run_uri, "run.json"), json.dumps({
        "job": "generate", "run_id": summary["run_id"], "config": {"output_format": output_format, "steps": 2}}))
    return summary


# ----------------------------------------------------------------------------- reading a report back


class ReportPage(HTMLParser):
    """What the tests check in report.html, parsed with the standard library (text unescaped)."""

    VOID = {"img", "br", "meta", "link", "input", "hr", "col", "area", "base", "source", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.html = html
        self.stack: list[tuple[str, dict]] = []
        self.section: str | None = None
        self.sections: list[str] = []
        self.images: list[tuple[str | None, str]] = []
        """(section id, src) of every <img>."""
        self.links: list[str] = []
        self.scripts = 0
        self.cards: list[dict] = []
        """Gallery cards: section, id, sample, recall."""
        self.stats: dict[str, str] = {}
        self.tables: dict[str, list[list[str]]] = {}
        """Rows of cell texts of each table, by its last class name (data rows only)."""
        self.texts: dict[str, list[str]] = {}
        """Text of elements by class name (for the classes in TEXT_CLASSES)."""
        self.attrs_of: dict[str, dict] = {}
        self._captures: list[tuple[str, list[str]]] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(html)

    TEXT_CLASSES = ("hist-counts", "sbpc-curve", "gallery-note", "v", "cid", "missing", "chip winner", "cand winner")

    def handle_starttag(self, tag: str, attrs_list: list) -> None:
        attrs = dict(attrs_list)
        cls = attrs.get("class") or ""
        if tag == "section":
            self.section = attrs.get("id")
            self.sections.append(self.section or "")
        if tag == "img":
            self.images.append((self.section, attrs.get("src", "")))
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.scripts += 1
        if tag == "figure" and cls == "card":
            self.cards.append({"section": self.section, "id": attrs.get("data-id"), "sample": attrs.get("data-sample"),
                               "recall": attrs.get("data-recall")})
        if "data-key" in attrs:
            self._pending_key = attrs["data-key"]
        if cls == "v" and getattr(self, "_pending_key", None):
            self._captures.append(("stat:" + self._pending_key, []))
            self._pending_key = None
        elif self._capture_name(cls):
            self._captures.append((self._capture_name(cls), []))
        if cls:
            self.attrs_of.setdefault(cls.split()[-1], attrs)
        if tag == "table":
            self._table = cls.split()[-1] if cls else ""
            self.tables.setdefault(self._table, [])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        if tag not in self.VOID:
            self.stack.append((tag, attrs))

    def _capture_name(self, cls: str) -> str | None:
        if cls in self.TEXT_CLASSES:
            return cls
        last = cls.split()[-1] if cls.strip() else ""
        return last if last in self.TEXT_CLASSES else None

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._table is not None and self._row:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        while self.stack:
            open_tag, attrs = self.stack.pop()
            cls = attrs.get("class") or ""
            if self._captures and (self._capture_name(cls) or cls == "v"):
                name, parts = self._captures.pop()
                text = "".join(parts).strip()
                if name.startswith("stat:"):
                    self.stats[name[5:]] = text
                else:
                    self.texts.setdefault(name, []).append(text)
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, parts in self._captures:
            parts.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def stat(self, key: str) -> str:
        return self.stats[key].replace(",", "")

    def section_images(self, section: str) -> list[str]:
        return [src for sec, src in self.images if sec == section]
