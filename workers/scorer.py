"""Scorer actor: holds a segmentation model and adds recall / relation columns to generated rows.

Runs as its own actor pool (a fractional GPU is enough for a segmenter), so generation and
scoring overlap. Rows without an image (rejected or failed) pass through unscored; a scoring
failure leaves the recall columns null and never fails the batch.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field

import pyarrow as pa
from PIL import Image

from sgmodel.scoring import RECALL_ROW_SCHEMA, RecallResult, SegmentationScorer
from workers.runtime import keep_freed_memory, localize_model, pick_device, pick_dtype, set_threads
from workers.schema import SCORED_SCHEMA
from workers.validate import graph_from_json

logger = logging.getLogger(__name__)

RECALL_COLUMNS = tuple(RECALL_ROW_SCHEMA.names)


@dataclass(frozen=True, kw_only=True)
class ScoringSettings:
    segmenter: str
    """Segmentation model folder or hub id (AutoModelForSemanticSegmentation + processor)."""
    use_gpu: bool = False
    precision: str = "auto"
    threads: int | None = 1
    batch_size: int = 16
    options: dict = field(default_factory=dict)
    """RecallConfig fields (min_area_fraction, mapping, …)."""


def decode_image(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


class Scorer:
    def __init__(self, settings: ScoringSettings, storage_settings=None) -> None:
        from workers.storage import Storage

        set_threads(settings.threads)
        device = pick_device(settings.use_gpu)
        if device.type == "cpu":
            keep_freed_memory()
        dtype = pick_dtype(settings.precision, device)
        storage = Storage(storage_settings) if storage_settings else None
        self.scorer = SegmentationScorer.from_pretrained(
            localize_model(settings.segmenter, storage), device=device, dtype=dtype, batch_size=settings.batch_size,
            **settings.options)

    def score(self, pngs: list[bytes], graphs_json: list[str]) -> list[RecallResult]:
        return self.scorer.score([decode_image(p) for p in pngs], [graph_from_json(g) for g in graphs_json])

    def score_images(self, images: list, graphs_json: list[str]) -> list[RecallResult]:
        """Uint8 arrays [H, W, 3] (SBPC candidates, never encoded) against their graphs."""
        return self.scorer.score(images, [graph_from_json(g) for g in graphs_json])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["image"] is not None]
        start = time.perf_counter()
        try:
            results = self.score([rows[i]["image"] for i in todo], [rows[i]["graph"] for i in todo])
        except Exception:  # noqa: BLE001 - unscored rows are reported, the job goes on
            logger.exception("scoring failed for a batch of %d images", len(todo))
            results = [None] * len(todo)
        per_image = (time.perf_counter() - start) / max(1, len(todo))
        for i in range(len(rows)):
            rows[i].update({c: None for c in RECALL_COLUMNS}, score_seconds=None)
        for i, result in zip(todo, results):
            if result is not None:
                rows[i].update(result.to_row(), score_seconds=per_image)
        return pa.Table.from_pylist(rows, schema=SCORED_SCHEMA)
