"""Training rows for fine-tuning: decoded in the Ray Data pipeline, batched in lock-step on the Ray Train workers.

``decode_batch`` runs inside the Ray Data pipeline: it validates each row's scene graph, decodes
and resizes its image, and marks bad rows with a reason instead of raising.

Every rank must run the same number of forward/backward passes (ZeRO gathers parameters and
reduces gradients collectively), but bad rows are skipped per rank, so shards yield different
numbers of batches. ``SyncedBatches`` therefore asks all ranks at each micro-step whether they
still have a batch and starts a new epoch on all of them together when one runs dry.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sgmodel.graph import SceneGraph, SceneGraphError, parse_graph
from workers.train_engine import all_ranks_have

logger = logging.getLogger("sgbatch")

GRAPH_COLUMNS = ("id", "objects", "relations", "caption")


def decode_image(data: bytes | None, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 [size, size, 3] (RGB, centre crop to square, bicubic resize)."""
    from PIL import Image, ImageOps

    if data is None:
        raise ValueError("image_missing")
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def decode_batch(table: pa.Table, size: int) -> pa.Table:
    """Ray Data stage: graph columns + ``pixels`` (raw uint8 HxWx3 bytes) + ``error``/``error_code``.

    Never raises on a bad row: a graph that breaks the contract or an image that is missing or
    cannot be decoded gives a row with ``error`` set (and empty pixels), which the worker counts
    and skips. Dropping the encoded ``image`` here keeps the bytes moved to the workers small.
    """
    from PIL import Image

    pixels: list[bytes] = []
    errors: list[str | None] = []
    codes: list[str | None] = []
    for row in table.to_pylist():
        graph_row = {k: row.get(k) for k in GRAPH_COLUMNS}
        try:
            parse_graph(graph_row)
            pixels.append(decode_image(row.get("image"), size).tobytes())
            errors.append(None)
            codes.append(None)
        except SceneGraphError as err:
            pixels.append(b"")
            errors.append(err.reason)
            codes.append(err.code)
        except (ValueError, OSError, Image.DecompressionBombError, SyntaxError) as err:
            # PIL raises OSError/UnidentifiedImageError for garbage, SyntaxError for some broken PNGs.
            missing = str(err) == "image_missing"
            pixels.append(b"")
            errors.append("image is null" if missing else f"image cannot be decoded: {type(err).__name__}: {err}"[:300])
            codes.append("image_missing" if missing else "image_undecodable")
    columns = {name: table.column(name) for name in GRAPH_COLUMNS if name in table.column_names}
    if "caption" not in columns:
        columns["caption"] = pa.nulls(table.num_rows, pa.string())
    columns["pixels"] = pa.array(pixels, pa.binary())
    columns["error"] = pa.array(errors, pa.string())
    columns["error_code"] = pa.array(codes, pa.string())
    return pa.table(columns)


def rows_to_batch(rows: Sequence[Mapping[str, Any]], size: int) -> tuple[list[SceneGraph], torch.Tensor]:
    """Decoded rows -> (graphs, images [B, 3, size, size] float32 in [-1, 1])."""
    graphs = [parse_graph({k: r.get(k) for k in GRAPH_COLUMNS}) for r in rows]
    arrays = np.stack([np.frombuffer(r["pixels"], dtype=np.uint8).reshape(size, size, 3) for r in rows])
    images = torch.from_numpy(arrays.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return graphs, images


@dataclass
class BadRows:
    """Bad rows seen by one worker, as distinct ids per reason code (a row is counted once across epochs)."""

    ids: dict[str, set[str]] = field(default_factory=dict)
    logged: int = 0
    log_limit: int = 20

    def add(self, row: Mapping[str, Any], rank: int) -> None:
        code = row.get("error_code") or "unknown"
        row_id = str(row.get("id"))
        seen = self.ids.setdefault(code, set())
        if row_id in seen:
            return
        seen.add(row_id)
        if self.logged < self.log_limit:
            logger.warning("rank %d: skipping row %r (%s): %s", rank, row_id, code, row.get("error"))
            self.logged += 1
            if self.logged == self.log_limit:
                logger.warning("rank %d: further bad rows are counted but not logged", rank)

    def merge(self, other: Mapping[str, Sequence[str]]) -> None:
        for code, ids in other.items():
            self.ids.setdefault(code, set()).update(ids)

    def counts(self) -> dict[str, int]:
        return {code: len(ids) for code, ids in sorted(self.ids.items())}

    def as_json(self) -> dict[str, list[str]]:
        return {code: sorted(ids) for code, ids in sorted(self.ids.items())}


class SyncedBatches:
    """Micro-batches of valid rows from a Ray Data shard, in lock-step across ranks (see module docstring)."""

    def __init__(self, shard, batch_size: int, size: int, bad: BadRows, rank: int, seed: int,
                 shuffle_buffer: int) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.size = size
        self.bad = bad
        self.rank = rank
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = -1
        self._rows: Iterator[list[dict]] | None = None

    def _epoch_rows(self, epoch: int) -> Iterator[list[dict]]:
        buffer: list[dict] = []
        shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer, "local_shuffle_seed": self.seed + 7919 * epoch + self.rank} \
            if self.shuffle_buffer > 1 else {}
        for table in self.shard.iter_batches(batch_size=self.batch_size, batch_format="pyarrow", **shuffle):
            for row in table.to_pylist():
                if row.get("error"):
                    self.bad.add(row, self.rank)
                    continue
                buffer.append(row)
                if len(buffer) == self.batch_size:
                    yield buffer
                    buffer = []

    def next(self) -> tuple[list[SceneGraph], torch.Tensor]:
        """The next micro-batch; when any rank's epoch ends, all ranks start the next epoch together."""
        fresh_epochs = 0
        while True:
            rows = next(self._rows, None) if self._rows is not None else None
            if all_ranks_have(rows is not None):
                return rows_to_batch(rows, self.size)
            if fresh_epochs >= 1:  # a whole new epoch gave no batch on some rank
                raise RuntimeError(
                    f"a worker's shard has fewer than --batch-size {self.batch_size} valid rows; "
                    "use a bigger training table, a smaller --batch-size or fewer --workers"
                )
            self._close()
            self.epoch += 1
            fresh_epochs += 1
            self._rows = self._epoch_rows(self.epoch)

    def one_pass(self, limit: int | None) -> Iterator[tuple[list[SceneGraph], torch.Tensor]]:
        """One synchronised pass (validation): stops when any rank runs out, or after ``limit`` batches."""
        self.epoch += 1
        rows_iter = self._epoch_rows(self.epoch)
        count = 0
        try:
            while limit is None or count < limit:
                rows = next(rows_iter, None)
                if not all_ranks_have(rows is not None):
                    return
                count += 1
                yield rows_to_batch(rows, self.size)
        finally:
            rows_iter.close()

    def _close(self) -> None:
        if self._rows is not None:
            self._rows.close()  # let go of the old epoch's stream before the next one starts


def gather_bad_rows(bad: BadRows) -> BadRows:
    """Every rank's bad-row ids merged (a collective: all ranks call it at the same points)."""
    import torch.distributed as dist

    merged = BadRows()
    merged.merge(bad.as_json())
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, bad.as_json())
        for part in parts:
            merged.merge(part)
    return merged
