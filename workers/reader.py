"""Read stage: each input file read with its own columns and validated; what cannot be read becomes error rows.

One Ray Data task per input file (a shard). Rows stream out in batches as they are read. A read
that fails is retried from the first row not yet handed on; when it keeps failing, the rows it
cannot reach (the row group, or the whole file when it cannot be opened) become error rows naming
the file and the reason. The other files finish, and every input row is accounted for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from sgmodel.graph import DEFAULT_LIMITS, ValidationLimits
from workers.storage import Storage, StorageSettings, redact
from workers.validate import GRAPH_COLUMNS, VALIDATED_SCHEMA, validate_rows

logger = logging.getLogger(__name__)

FILE_ERROR_CODE = "unreadable_file"


@dataclass(frozen=True, kw_only=True)
class ReadSettings:
    limits: ValidationLimits = DEFAULT_LIMITS
    duplicate_ids: frozenset[str] = frozenset()
    storage: StorageSettings | None = None
    batch_rows: int = 256
    """Rows read and validated at a time."""
    attempts: int = 3
    """Reads of a row group before its rows go to the error table (S3 calls have their own retries)."""
    backoff_seconds: float = 1.0


def read_units(batch: pa.Table, settings: ReadSettings) -> Iterator[pa.Table]:
    """Ray Data task over rows (uri, shard, rows): the validated rows of each file (VALIDATED_SCHEMA)."""
    storage = Storage(settings.storage)
    for unit in batch.to_pylist():
        yield from read_file(storage, unit["uri"], unit["shard"], unit["rows"], settings)


def read_file(storage: Storage, uri: str, shard: str, rows: int, settings: ReadSettings) -> Iterator[pa.Table]:
    """Validated rows of one file, ``rows`` in all (its footer's count when the run started).

    A failing read is retried from the first row not yet handed on; after ``attempts`` failures in a
    row the rows of that row group become error rows and reading goes on with the next one.
    """
    done = failures = 0
    while done < rows:
        try:
            for table in _iter_rows(storage, uri, start=done, batch_rows=settings.batch_rows):
                table = table.slice(0, rows - done)  # rows added since the start are not part of this run
                if table.num_rows:
                    yield validate_rows(table.to_pylist(), [shard] * table.num_rows, settings.limits,
                                        settings.duplicate_ids)
                    done += table.num_rows
                    failures = 0
                if done >= rows:
                    break
            break
        except Exception as err:  # noqa: BLE001 - any failure of one file must leave the others running
            failures += 1
            reason = f"{type(err).__name__}: {redact(str(err))}"
            if failures < settings.attempts:
                logger.warning("reading %s failed at row %d (%s); attempt %d of %d", uri, done, reason,
                               failures + 1, settings.attempts)
                time.sleep(settings.backoff_seconds * failures)
                continue
            end = _row_group_end(storage, uri, done, rows)
            yield file_error_rows(uri, shard, done, end, f"cannot be read: {reason}")
            done, failures = end, 0
    if done < rows:
        yield file_error_rows(uri, shard, done, rows, f"has fewer rows than when the run started ({done} of {rows})")


def _row_group_end(storage: Storage, uri: str, row: int, rows: int) -> int:
    """The first row after the row group holding ``row`` (``rows`` when the file cannot even be opened)."""
    try:
        fs, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        end = 0
        for g in range(meta.num_row_groups):
            end += meta.row_group(g).num_rows
            if end > row:
                return min(end, rows)
    except Exception:  # noqa: BLE001 - an unopenable file fails as a whole
        pass
    return rows


def _iter_rows(storage: Storage, uri: str, start: int, batch_rows: int) -> Iterator[pa.Table]:
    """The file's contract columns from row ``start`` on, one row group at a time (earlier groups are not read)."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        columns = [c for c in GRAPH_COLUMNS if c in parquet.schema_arrow.names]
        offset = 0
        for group in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            if offset + size <= start:
                offset += size
                continue
            skip = max(0, start - offset)
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                table = pa.Table.from_batches([batch])
                cut = min(skip, table.num_rows)
                table, skip = table.slice(cut), skip - cut
                if table.num_rows:
                    yield table
            offset += size


def file_error_rows(uri: str, shard: str, first: int, rows: int, problem: str) -> pa.Table:
    """One error row for each of rows ``first`` … ``rows - 1`` of a file (ids unknown: they could not be read)."""
    count = max(0, rows - first)
    reason = f"input file {redact(uri)!r} (rows {first}-{rows - 1}) {problem}"
    logger.error("%s", reason)
    return pa.table({
        "id": pa.nulls(count, pa.string()),
        "shard": pa.repeat(pa.scalar(shard), count),
        "graph": pa.nulls(count, pa.string()),
        "error": pa.repeat(pa.scalar(reason), count),
        "error_code": pa.repeat(pa.scalar(FILE_ERROR_CODE), count),
    }, schema=VALIDATED_SCHEMA)
