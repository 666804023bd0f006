"""Generator actor: holds a SceneGraphDiffusionPipeline on its device and turns graph rows into images.

Ray Data creates a pool of these (``map_batches(Generator, compute=ActorPoolStrategy(...),
num_gpus=…)``); each loads the model once in ``__init__`` and then serves batches. A bad row never
raises: rejected rows pass through untouched, and a graph whose generation fails becomes an
error row with the reason, so the job decides (error table, ``max_error_fraction``).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from sgmodel.graph import SceneGraph, derive_seed
from workers.runtime import (
    keep_freed_memory,
    load_pipeline,
    localize_model,
    pick_device,
    pick_dtype,
    set_threads,
)
from workers.schema import GENERATED_SCHEMA
from workers.validate import graph_from_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    model: str
    """Scene-graph pipeline folder (local or s3://)."""
    steps: int = 25
    guidance: float = 3.0
    height: int | None = None
    width: int | None = None
    samples_per_graph: int = 1
    base_seed: int = 0
    precision: str = "auto"
    scheduler: str = "model"
    use_gpu: bool = False
    threads: int | None = None
    compile: bool = False
    channels_last: bool = False
    """The UNet's weights in channels-last memory format (faster convolutions, same images up to rounding)."""
    separate_guidance: bool = False
    """Guided steps as two UNet calls (cond, uncond) instead of one batched call: same images."""
    layout: str = "sample"
    """Layout-grounded models, graphs without boxes: draw each image's layout ("sample") or start from the
    mean layout ("mean")."""


def encode_png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def sample_seed(graph: SceneGraph, base_seed: int, sample_index: int) -> int:
    """A row's own ``seed`` column wins (offset per sample); else derived from (base seed, id, sample)."""
    if graph.seed is not None:
        return (graph.seed + sample_index) % 2**63
    return derive_seed(base_seed, graph.id, sample_index)


class Generator:
    def __init__(self, settings: GenerationSettings, storage_settings=None) -> None:
        from workers.storage import Storage

        self.settings = settings
        self.threads = set_threads(settings.threads)
        self.device = pick_device(settings.use_gpu)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.dtype = pick_dtype(settings.precision, self.device)
        path = localize_model(settings.model, Storage(storage_settings) if storage_settings else None)
        self.pipe = load_pipeline(path, self.device, self.dtype, settings.scheduler, settings.compile,
                                  settings.channels_last, settings.separate_guidance)
        self.height = settings.height or self.pipe.default_size
        self.width = settings.width or self.pipe.default_size
        logger.info("generator ready: %s on %s/%s, %d threads", settings.model, self.device, self.dtype, self.threads)

    def render(self, graphs: list[SceneGraph], seeds: list[int], steps: int, height: int, width: int) -> list[bytes]:
        """PNG bytes of one image per (graph, seed) pair."""
        images = self.pipe(
            graphs, num_inference_steps=steps, guidance_scale=self.settings.guidance, height=height, width=width,
            seeds=seeds, output_type="np", layout=self.settings.layout,
        ).images
        return [encode_png((img * 255).round().clip(0, 255).astype("uint8")) for img in images]

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = self.settings
        rows = batch.to_pylist()
        out: list[dict] = []
        good = []  # (row, graph) of the valid rows
        for row in rows:
            if row["error"] is not None:
                out.append(_passthrough(row))
                continue
            graph = graph_from_json(row["graph"])
            good.append((row, graph))
        if good:
            out.extend(self._generate(good, s))
        return pa.Table.from_pylist(out, schema=GENERATED_SCHEMA)

    def _generate(self, good: list[tuple[dict, SceneGraph]], s: GenerationSettings) -> list[dict]:
        graphs = [g for _, g in good for _ in range(s.samples_per_graph)]
        owners = [row for row, _ in good for _ in range(s.samples_per_graph)]
        index = [k for _ in good for k in range(s.samples_per_graph)]
        seeds = [sample_seed(g, s.base_seed, k) for g, k in zip(graphs, index)]
        start = time.perf_counter()
        try:
            pngs = self.render(graphs, seeds, s.steps, self.height, self.width)
        except Exception as err:  # noqa: BLE001 - a batch failure must not kill the job
            if len(good) > 1:  # find the culprit: retry graph by graph
                return [r for item in good for r in self._generate([item], s)]
            row = good[0][0]
            logger.exception("generation failed for %r", row["id"])
            return [_passthrough(row, f"graph {row['id']!r}: generation failed: {type(err).__name__}: {err}",
                                 "generation_failed")]
        per_image = (time.perf_counter() - start) / max(1, len(pngs))
        done = datetime.now(timezone.utc)
        return [
            {
                "id": row["id"], "shard": row["shard"], "graph": row["graph"], "error": None, "error_code": None,
                "sample_index": k, "seed": seed, "image": png, "height": self.height, "width": self.width,
                "steps": s.steps, "guidance": s.guidance, "gen_seconds": per_image,
                "generated_at": done,
            }
            for row, k, seed, png in zip(owners, index, seeds, pngs)
        ]


def _passthrough(row: dict, error: str | None = None, code: str | None = None) -> dict:
    return {
        "id": row["id"], "shard": row["shard"], "graph": row.get("graph"), "error": error or row["error"],
        "error_code": code or row["error_code"], "sample_index": None, "seed": None, "image": None,
        "height": None, "width": None, "steps": None, "guidance": None, "gen_seconds": None,
        "generated_at": None,
    }
