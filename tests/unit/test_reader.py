"""The read stage: each file with its own columns, unreadable parts as error rows naming the file, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sgmodel.graph import GRAPH_SCHEMA
from workers.reader import FILE_ERROR_CODE, ReadSettings, read_file
from workers.storage import Storage

SETTINGS = ReadSettings(batch_rows=3, attempts=2, backoff_seconds=0.0)


def rows(n: int, prefix: str = "g") -> list[dict]:
    return [{"id": f"{prefix}{i}", "objects": [{"label": "circle", "attributes": ["red"], "box": None}],
             "relations": [], "caption": None, "image": None, "seed": 100 + i} for i in range(n)]


def read(path: Path, expected: int, settings: ReadSettings = SETTINGS) -> list[dict]:
    tables = list(read_file(Storage(), str(path), "shard", expected, settings))
    return [r for t in tables for r in t.to_pylist()]


def corrupt_row_group(path: Path, group: int) -> None:
    """Overwrite the pages of one row group's first column; the footer stays readable."""
    column = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(data))


def test_each_file_is_read_with_its_own_columns(tmp_path):
    # no seed column here, explicit seeds in the next file; no objects column here, objects next door
    pq.write_table(pa.table({"id": ["a0", "a1"], "objects": [[{"label": "circle"}]] * 2}), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows(2, "b"), schema=GRAPH_SCHEMA), tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": ["c0"]}), tmp_path / "c.parquet")

    a, b, c = (read(tmp_path / f"{n}.parquet", k) for n, k in (("a", 2), ("b", 2), ("c", 1)))
    assert [json.loads(r["graph"])["seed"] for r in a] == [None, None]
    assert [json.loads(r["graph"])["seed"] for r in b] == [100, 101]
    assert [json.loads(r["graph"])["objects"][0]["attributes"] for r in b] == [["red"], ["red"]]
    assert [(r["id"], r["error_code"]) for r in c] == [("c0", "no_objects")]


def test_a_damaged_row_group_becomes_error_rows_and_the_rest_is_read(tmp_path):
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.Table.from_pylist(rows(12), schema=GRAPH_SCHEMA), path, row_group_size=4)
    corrupt_row_group(path, 1)
    out = read(path, 12)
    assert len(out) == 12
    assert [r["id"] for r in out if r["error"] is None] == [f"g{i}" for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    errors = [r for r in out if r["error"] is not None]
    assert len(errors) == 4 and {r["error_code"] for r in errors} == {FILE_ERROR_CODE}
    assert all(r["id"] is None and r["shard"] == "shard" for r in errors)
    assert f"input file {str(path)!r} (rows 4-7) cannot be read: OSError" in errors[0]["error"]


def test_a_file_gone_mid_run_becomes_error_rows_for_all_its_rows(tmp_path):
    out = read(tmp_path / "gone.parquet", 5)
    assert len(out) == 5 and all(r["error_code"] == FILE_ERROR_CODE for r in out)
    assert "gone.parquet' (rows 0-4) cannot be read: FileNotFoundError" in out[0]["error"]


def test_a_file_shorter_than_its_count_at_the_start_accounts_for_the_missing_rows(tmp_path):
    path = tmp_path / "shrunk.parquet"
    pq.write_table(pa.Table.from_pylist(rows(3), schema=GRAPH_SCHEMA), path)
    out = read(path, 5)
    assert [r["id"] for r in out[:3]] == ["g0", "g1", "g2"]
    assert [r["error_code"] for r in out[3:]] == [FILE_ERROR_CODE] * 2
    assert "has fewer rows than when the run started (3 of 5)" in out[3]["error"]


def test_integer_ids_and_their_duplicates_are_rejected_alike(tmp_path):
    path = tmp_path / "ints.parquet"
    base = rows(4)
    pq.write_table(pa.Table.from_pylist([{**r, "id": i} for r, i in zip(base, [7, 7, 10, 11])]), path)
    out = read(path, 4, ReadSettings(duplicate_ids=frozenset({"7"})))
    assert [(r["id"], r["error_code"]) for r in out] == [("7", "duplicate_id"), ("7", "duplicate_id"),
                                                          ("10", None), ("11", None)]


def test_the_read_stage_does_not_import_torch():
    # A Ray task that runs it holds only what it imports: torch would add ~150 MiB per read worker.
    code = "import sys, workers.reader; sys.exit(1 if 'torch' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.returncode == 0
