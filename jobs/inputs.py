"""A job's input: its Parquet files as shards, each checked up front, and the ids that repeat across them.

Every file's footer and schema are read before the run starts (cheap: no data pages), so an empty,
truncated or non-Parquet file, or one whose columns cannot hold the contract, stops the job with
its name and the problem before anything is written. Each file keeps its own columns: a column
missing in one file is missing only there.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from sgmodel.graph import safe_key
from workers.storage import Storage, redact, split_s3
from workers.validate import GRAPH_COLUMNS, find_duplicates

logger = logging.getLogger("sgbatch")

FOOTER_READERS = 16
"""Footers read at once (S3 round trips dominate; local files are read just as well this way)."""


class InputFileError(ValueError):
    """An input file that cannot be read as the contract; the message names the file and the problem."""


@dataclass(frozen=True)
class InputShard:
    uri: str
    name: str
    """Stable output name of this input file (survives other files being added to the input)."""
    rows: int
    columns: tuple[str, ...] = ()
    """The file's own top-level columns."""


def shard_name(uri: str) -> str:
    stem = PurePosixPath(uri).name.rsplit(".", 1)[0]
    return f"{safe_key(stem)}-{hashlib.sha1(uri.encode()).hexdigest()[:6]}"


SchemaCheck = Callable[[str, pa.Schema], None]
"""Raises InputFileError when a file's schema (the file's URI given) cannot serve the job."""


def read_footer(storage: Storage, uri: str, check: SchemaCheck | None = None) -> InputShard:
    """One file's row count and columns from its footer; InputFileError naming the file when unreadable."""
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            rows, schema = parquet.metadata.num_rows, parquet.schema_arrow
    except FileNotFoundError:
        raise InputFileError(f"input file {uri!r} disappeared while the input was listed") from None
    except (OSError, pa.ArrowException) as err:
        raise InputFileError(f"input file {uri!r} is not a readable Parquet file: {redact(str(err))}") from None
    if check is not None and rows:
        check(uri, schema)
    return InputShard(uri, shard_name(uri), rows, tuple(schema.names))


def discover_inputs(storage: Storage, input_uri: str, check: SchemaCheck | None = None) -> list[InputShard]:
    """Every input Parquet file with its row count and columns (read from the footers, not the data).

    ``check`` is run on the schema of every non-empty file.
    """
    uris = storage.expand_input(input_uri)
    if any(u.startswith("s3://") for u in uris):
        _ = storage.arrow_s3  # build the client once, before the threads share it
    with ThreadPoolExecutor(max_workers=min(FOOTER_READERS, len(uris))) as pool:
        return list(pool.map(lambda uri: read_footer(storage, uri, check), uris))


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_list_of_structs(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type)


EXPECTED_TYPES = {
    "id": ("a string or an integer", lambda t: _is_string(t) or pa.types.is_integer(t)),
    "objects": ("a list of structs (label, attributes, box)", _is_list_of_structs),
    "relations": ("a list of structs (subject, predicate, object)", _is_list_of_structs),
    "caption": ("a string", _is_string),
    "seed": ("an integer", pa.types.is_integer),
}
"""Contract columns whose Arrow type can never hold a valid value otherwise (null-typed columns always can)."""


def check_graph_schema(uri: str, schema: pa.Schema) -> None:
    """The file has an ``id`` column, and each contract column it has is of a type the contract can read."""
    if "id" not in schema.names:
        raise InputFileError(f"input file {uri!r} has no 'id' column (its columns: {', '.join(schema.names) or 'none'})")
    for name in GRAPH_COLUMNS:
        found = schema.get_all_field_indices(name)
        if not found:
            continue
        if len(found) > 1:
            raise InputFileError(f"input file {uri!r}: column {name!r} appears {len(found)} times")
        kind = schema.field(found[0]).type
        expected, accepts = EXPECTED_TYPES[name]
        if not (pa.types.is_null(kind) or accepts(kind)):
            raise InputFileError(f"input file {uri!r}: column {name!r} is {kind}, expected {expected}")


def duplicate_ids(storage: Storage, shards: Iterable[InputShard]) -> frozenset[str]:
    """Ids that occur more than once across the whole input, compared as the keys they become (7 == "7").

    Only the ``id`` column is read. A file whose ids cannot be read is left out here: the read
    stage reports that file's rows in the error table.
    """
    seen: set[str] = set()
    dupes: set[str] = set()
    for shard in shards:
        if not shard.rows:
            continue
        try:
            for batch in storage.iter_parquet_batches(shard.uri, batch_size=65536, columns=["id"]):
                find_duplicates(batch.column(0).to_pylist(), seen, dupes)
        except (OSError, pa.ArrowException) as err:
            logger.warning("ids of %s could not be read for the duplicate check: %s", shard.uri, redact(str(err)))
    return frozenset(dupes)


def parquet_paths(storage: Storage, shards: list[InputShard]) -> tuple[list[str], object, dict[str, str]]:
    """Paths and filesystem for ``ray.data.read_parquet``, and the map from the ``path`` column to shard names."""
    if not shards:
        return [], None, {}
    fs, _ = storage.filesystem(shards[0].uri)
    paths, back = [], {}
    for shard in shards:
        path = "/".join(split_s3(shard.uri)) if shard.uri.startswith("s3://") else os.path.abspath(shard.uri)
        paths.append(path)
        back[path] = shard.name
    return paths, fs, back


def input_columns(storage: Storage, shard: InputShard, wanted: Iterable[str]) -> list[str]:
    fs, path = storage.filesystem(shard.uri)
    with fs.open_input_file(path) as f:
        names = set(pq.ParquetFile(f).schema_arrow.names)
    return [c for c in wanted if c in names]
