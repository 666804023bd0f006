"""Contract Parquet shards of scene graphs, and the table of rejected rows, written as an import streams.

Used by ``jobs.prepare``; the storage is any object with ``write_parquet``, ``write_bytes``,
``list`` and ``delete`` for local paths and ``s3://`` URIs (``workers.storage.Storage``).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sgmodel.graph import (
    ERROR_SCHEMA,
    DuplicateIdChecker,
    SceneGraph,
    SceneGraphError,
    graphs_to_table,
    is_utf8,
)

ERRORS_FILE = "_errors.parquet"  # leading "_": readers of the folder (generate, Spark, Arrow) skip it
SHARD_PATTERN = re.compile(r"^part-(\d{5,})\.parquet$")
ERROR_TABLE_SCHEMA = ERROR_SCHEMA.append(pa.field("code", pa.string()))
"""The error contract (id, reason) plus the machine-readable reason code the summary counts."""

Item = SceneGraph | SceneGraphError | tuple[SceneGraph | SceneGraphError, Mapping[str, Any]]


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _join(base: str, name: str) -> str:
    return posixpath.join(base, name)


def _error_id(row_id: Any) -> str | None:
    """The error table's id: the row id when it is a usable string, else a printable stand-in."""
    if row_id is None:
        return None
    text = row_id if isinstance(row_id, str) else repr(row_id)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


_PY_TYPES: dict[pa.DataType, tuple[type, ...]] = {
    pa.binary(): (bytes, bytearray, memoryview),
    pa.string(): (str,),
    pa.int64(): (int,),
    pa.float64(): (float, int),
    pa.bool_(): (bool,),
}


def _infer_type(value: Any) -> pa.DataType:
    for py, arrow in ((bool, pa.bool_()), ((bytes, bytearray, memoryview), pa.binary()), (str, pa.string()),
                      (int, pa.int64()), (float, pa.float64())):
        if isinstance(value, py):
            return arrow
    return pa.string()


class GraphShardWriter:
    """Writes graphs in shards of ``rows_per_shard`` and rejected rows to one error table.

    Holds one shard of graphs in memory; error rows are spilled to a local temporary Parquet file
    every ``error_batch`` rows, so memory stays flat however many rows are rejected.
    """

    def __init__(
        self,
        storage: Any,
        output: str,
        rows_per_shard: int = 1000,
        extra_schema: Mapping[str, pa.DataType] | None = None,
        error_batch: int = 10_000,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard!r}")
        self.storage = storage
        self.output = output.rstrip("/") if output.startswith("s3://") else os.path.normpath(output)
        self.rows_per_shard = rows_per_shard
        self.extra_schema: dict[str, pa.DataType] | None = dict(extra_schema) if extra_schema is not None else None
        self._log = log or (lambda _msg: None)
        self._ids = DuplicateIdChecker()
        self._rows: list[tuple[SceneGraph, Mapping[str, Any]]] = []
        self._errors: list[tuple[str | None, str, str]] = []
        self._error_batch = error_batch
        self._error_tmp = tempfile.NamedTemporaryFile(prefix="sgbatch-errors-", suffix=".parquet", delete=False)
        self._error_writer = pq.ParquetWriter(self._error_tmp.name, ERROR_TABLE_SCHEMA, compression="zstd")
        self.shards: list[str] = []
        self.rows_read = 0
        self.rows_written = 0
        self.rejected: Counter[str] = Counter()

    # -- rows
    def add(self, item: Item) -> None:
        """One importer item: a graph (optionally with extra column values) or a rejection."""
        self.rows_read += 1
        extras: Mapping[str, Any] = {}
        if isinstance(item, tuple):
            item, extras = item
        if isinstance(item, SceneGraphError):
            self.reject(item)
            return
        try:
            self._ids.check(item.id)
            self._check_extras(item.id, extras)
        except SceneGraphError as err:
            self.reject(err)
            return
        self._rows.append((item, extras))
        if len(self._rows) >= self.rows_per_shard:
            self._flush_shard()

    def reject(self, err: SceneGraphError) -> None:
        self.rejected[err.code] += 1
        self._errors.append((_error_id(err.row_id), err.reason, err.code))
        if len(self._errors) >= self._error_batch:
            self._flush_errors()

    def _check_extras(self, row_id: str, extras: Mapping[str, Any]) -> None:
        if self.extra_schema is None:
            self.extra_schema = {name: _infer_type(value) for name, value in extras.items()}
        for name, value in extras.items():
            if name not in self.extra_schema:
                raise SceneGraphError(
                    row_id, name, _short_value(value),
                    f"unexpected extra column (this output has {sorted(self.extra_schema) or 'none'})", "bad_extra",
                )
            arrow_type = self.extra_schema[name]
            if value is None:
                continue
            ok = isinstance(value, _PY_TYPES.get(arrow_type, (object,)))
            if isinstance(value, bool) and arrow_type != pa.bool_():
                ok = False
            if isinstance(value, str) and not is_utf8(value):
                ok = False
            if not ok:
                raise SceneGraphError(row_id, name, _short_value(value), f"must be {arrow_type} or null", "bad_extra")

    # -- files
    def _flush_shard(self) -> None:
        if not self._rows:
            return
        graphs = [graph for graph, _ in self._rows]
        extra = {
            name: pa.array([_arrow_value(extras.get(name)) for _, extras in self._rows], type=arrow_type)
            for name, arrow_type in (self.extra_schema or {}).items()
        }
        table = graphs_to_table(graphs, extra=extra)
        name = shard_name(len(self.shards))
        self.storage.write_parquet(table, _join(self.output, name))
        self.shards.append(name)
        self.rows_written += len(graphs)
        self._rows = []
        self._log(f"wrote {name} ({self.rows_written} rows so far)")

    def _flush_errors(self) -> None:
        if self._errors:
            ids, reasons, codes = zip(*self._errors)
            batch = pa.table([list(ids), list(reasons), list(codes)], schema=ERROR_TABLE_SCHEMA)
            self._error_writer.write_table(batch)
            self._errors = []

    def close(self) -> None:
        """Write the last shard and the error table; remove shards a previous, larger run left behind."""
        self._flush_shard()
        self._flush_errors()
        self._error_writer.close()
        try:
            with open(self._error_tmp.name, "rb") as f:
                self.storage.write_bytes(_join(self.output, ERRORS_FILE), f.read(), "application/vnd.apache.parquet")
        finally:
            self.discard()
        for uri in self.storage.list(self.output):
            match = SHARD_PATTERN.match(uri.rsplit("/", 1)[-1])
            if match and int(match.group(1)) >= len(self.shards) and _parent(uri) == self.output:
                self.storage.delete(uri)
                self._log(f"removed stale {uri}")

    def discard(self) -> None:
        """Drop the local spill file (after close, or when the run failed)."""
        if not self._error_tmp.closed:
            with contextlib.suppress(Exception):
                self._error_writer.close()
            self._error_tmp.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._error_tmp.name)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0]


def _arrow_value(value: Any) -> Any:
    return bytes(value) if isinstance(value, (bytearray, memoryview)) else value


def _short_value(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return value
