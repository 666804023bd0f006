"""Input files checked up front: unreadable files, missing ids and unusable columns are named before anything runs."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.generate import main
from jobs.inputs import InputFileError, check_graph_schema, discover_inputs, duplicate_ids
from sgmodel.graph import GRAPH_SCHEMA
from workers.storage import Storage

ROW = {"id": "g1", "objects": [{"label": "circle", "attributes": [], "box": None}], "relations": [],
       "caption": None, "image": None, "seed": None}


def good_file(path, rows=(ROW,)) -> str:
    pq.write_table(pa.Table.from_pylist(list(rows), schema=GRAPH_SCHEMA), path)
    return str(path)


def discover(folder) -> list:
    return discover_inputs(Storage(), str(folder), check=check_graph_schema)


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("empty.parquet", b"", "not a readable Parquet file"),
    ("text.parquet", b"id,objects\ng1,circle\n" * 20, "not a readable Parquet file"),
])
def test_unreadable_files_are_named(tmp_path, name, content, problem):
    good_file(tmp_path / "a-good.parquet")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputFileError) as info:
        discover(tmp_path)
    assert repr(str(tmp_path / name)) in str(info.value) and problem in str(info.value)


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "whole.parquet"
    good_file(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match="whole.parquet.*not a readable Parquet file"):
        discover(tmp_path)


def test_missing_id_column_is_named_with_the_columns_there(tmp_path):
    pq.write_table(pa.table({"name": ["g1"], "objects": [[{"label": "circle"}]]}), tmp_path / "noid.parquet")
    with pytest.raises(InputFileError, match=r"noid.parquet' has no 'id' column \(its columns: name, objects\)"):
        discover(tmp_path)


@pytest.mark.parametrize(("column", "values", "expected"), [
    ("id", pa.array([1.5]), "a string or an integer"),
    ("objects", pa.array(['[{"label": "circle"}]']), "a list of structs"),
    ("relations", pa.array([[1, 2]]), "a list of structs"),
    ("seed", pa.array(["7"]), "an integer"),
    ("caption", pa.array([3]), "a string"),
])
def test_columns_the_contract_cannot_read_are_named(tmp_path, column, values, expected):
    table = pa.Table.from_pylist([ROW], schema=GRAPH_SCHEMA)
    table = table.set_column(table.schema.get_field_index(column), column, values)
    pq.write_table(table, tmp_path / "typed.parquet")
    with pytest.raises(InputFileError, match=f"typed.parquet': column '{column}' is .*, expected {expected}"):
        discover(tmp_path)


def test_each_file_keeps_its_own_columns_and_empty_files_pass(tmp_path):
    good_file(tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["g2"], "objects": [[{"label": "circle"}]], "seed": [5]}), tmp_path / "b.parquet")
    good_file(tmp_path / "c.parquet", rows=())
    pq.write_table(pa.table({"id": pa.array([], pa.float64())}), tmp_path / "d.parquet")  # no rows: nothing to check
    shards = discover(tmp_path)
    assert [(s.rows, s.columns) for s in shards] == [
        (1, tuple(GRAPH_SCHEMA.names)), (1, ("id", "objects", "seed")), (0, tuple(GRAPH_SCHEMA.names)), (0, ("id",))]


def test_duplicate_ids_compare_integers_and_strings_as_keys(tmp_path):
    pq.write_table(pa.table({"id": [7, 7, 10, 11]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["11", "x", None]}), tmp_path / "b.parquet")
    shards = discover_inputs(Storage(), str(tmp_path))
    assert duplicate_ids(Storage(), shards) == {"7", "11"}


def test_job_exits_2_naming_the_file_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    good_file(tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1 not really")
    code = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--run-id", "r"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "b.parquet" in err and err.startswith("error: input file")
    assert not (tmp_path / "out").exists()
