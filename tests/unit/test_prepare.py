"""``python -m jobs.prepare``: shards, error table, summary, exit codes — on local folders."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import cli
from jobs.prepare import main
from sgmodel.data.writer import ERROR_TABLE_SCHEMA, GraphShardWriter
from sgmodel.graph import GRAPH_SCHEMA, SceneGraph, SceneGraphError, SGObject, table_to_graphs
from workers.storage import Storage, StorageSettings

SAMPLES = str(Path(__file__).resolve().parents[2] / "jobs" / "samples" / "graphs.json")


def read_output(folder: Path) -> tuple[pa.Table, pa.Table, dict]:
    shards = sorted(folder.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in shards]) if shards else None
    return table, pq.read_table(folder / "_errors.parquet"), json.loads((folder / "_summary.json").read_text())


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_bundled_samples(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sg2im", "--input", SAMPLES, "--output", str(out)]) == 0
    table, errors, summary = read_output(out)
    assert table.schema == GRAPH_SCHEMA
    graphs = table_to_graphs(table)
    assert len(graphs) == 10 and len({g.id for g in graphs}) == 10
    assert any(g.has_boxes for g in graphs) and any(o.attributes for g in graphs for o in g.objects)
    assert errors.schema == ERROR_TABLE_SCHEMA
    assert sorted(errors.column("id").to_pylist()) == ["broken-box", "broken-relation-index"]
    assert all("objects[0].box" in r or "relations[0].object" in r for r in errors.column("reason").to_pylist())
    assert summary["rows_read"] == 12 and summary["rows_written"] == 10 and summary["rows_rejected"] == 2
    assert summary["rejected_by_reason"] == {"box_inverted": 1, "relation_index_out_of_range": 1}
    assert summary["complete"] is True and summary["shards"] == ["part-00000.parquet"]
    printed = capsys.readouterr().out
    assert "rows read      12" in printed and "rows rejected  2" in printed and "box_inverted" in printed


def test_sharding_and_nothing_lost(tmp_path):
    out = tmp_path / "out"
    assert main(["sg2im", "--input", SAMPLES, "--output", str(out), "--rows-per-shard", "3"]) == 0
    names = sorted(p.name for p in out.glob("part-*.parquet"))
    assert names == [f"part-{i:05d}.parquet" for i in range(4)]
    assert [pq.read_metadata(out / n).num_rows for n in names] == [3, 3, 3, 1]
    table, errors, summary = read_output(out)
    assert summary["rows_read"] == table.num_rows + errors.num_rows == summary["rows_written"] + summary["rows_rejected"]
    assert summary["shards"] == names
    # a rerun with bigger shards leaves no stale part files behind
    assert main(["sg2im", "--input", SAMPLES, "--output", str(out)]) == 0
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00000.parquet"]


def test_duplicate_ids_rejected(tmp_path):
    data = [{"id": "x", "objects": ["a"]}, {"id": "y", "objects": ["b"]}, {"id": "x", "objects": ["c"]}]
    out = tmp_path / "out"
    assert main(["sg2im", "--input", write_json(tmp_path / "d.json", data), "--output", str(out)]) == 0
    table, errors, summary = read_output(out)
    assert [g.objects[0].label for g in table_to_graphs(table)] == ["a", "b"]
    assert errors.to_pylist() == [
        {"id": "x", "reason": "graph 'x': id = 'x': duplicate id in this input", "code": "duplicate_id"}
    ]
    assert summary["rejected_by_reason"] == {"duplicate_id": 1}


def test_invalid_json_exit_1_keeps_what_came_before(tmp_path, capsys):
    src = tmp_path / "bad.json"
    text = '[{"objects": ["a"]}, {"objects": ["b"]}, {"objects": [} ]'
    src.write_text(text)
    column = text.index("[}") + 2  # 1-based column of the stray "}"
    out = tmp_path / "out"
    assert main(["sg2im", "--input", str(src), "--output", str(out)]) == 1
    table, errors, summary = read_output(out)
    assert table.num_rows == 2
    (row,) = errors.to_pylist()
    assert row["code"] == "invalid_json" and "bad.json" in row["reason"] and f"line 1 column {column}" in row["reason"]
    assert summary["complete"] is False
    assert "INCOMPLETE" in capsys.readouterr().out


def test_argument_errors_exit_2_and_name_the_flag(tmp_path, capsys):
    assert main(["sg2im", "--input", str(tmp_path / "missing.json"), "--output", str(tmp_path / "o")]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["sg2im", "--input", SAMPLES, "--output", str(tmp_path / "o"), "--rows-per-shard", "0"]) == 2
    assert "--rows-per-shard = 0" in capsys.readouterr().err
    assert main(["sg2im", "--input", SAMPLES]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["vg", "--scene-graphs", SAMPLES, "--output", "o", "--s3-endpoint-url", "localhost:9"]) == 2
    assert "--s3-endpoint-url" in capsys.readouterr().err
    assert main(["nope"]) == 2
    assert main(["--help"]) == 0
    assert "sg2im" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["coco", "--help"])
    assert "--min-object-size" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_yaml_config_and_sgbatch_entry_point(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {SAMPLES}\nrows-per-shard: 4\noutput: {tmp_path / 'ignored'}\n")
    out = tmp_path / "out"
    assert cli.main(["prepare", "sg2im", "--config", str(config), "--output", str(out)]) == 0
    _, _, summary = read_output(out)
    assert summary["config"]["rows_per_shard"] == 4 and summary["output"] == str(out)
    assert not (tmp_path / "ignored").exists()  # the flag wins over the YAML file


def test_vg_through_the_cli(tmp_path):
    images = [
        {"image_id": 1, "objects": [
            {"object_id": 1, "x": 0, "y": 0, "w": 400, "h": 100, "names": ["sky"]},
            {"object_id": 2, "x": 0, "y": 100, "w": 400, "h": 200, "names": ["field"]},
            {"object_id": 3, "x": 10, "y": 10, "w": 5, "h": 5, "names": ["bird"]},
        ], "relationships": [
            {"relationship_id": 1, "predicate": "above", "subject_id": 1, "object_id": 2},
            {"relationship_id": 2, "predicate": "in", "subject_id": 3, "object_id": 1},
            {"relationship_id": 3, "predicate": "on", "subject_id": 2, "object_id": 404},
        ]},
        {"image_id": 2, "objects": [], "relationships": []},
    ]
    sizes = [{"image_id": 1, "width": 400, "height": 300}, {"image_id": 2, "width": 400, "height": 300}]
    out = tmp_path / "vg"
    rc = main([
        "vg", "--scene-graphs", write_json(tmp_path / "sg.json", images),
        "--image-data", write_json(tmp_path / "img.json", sizes), "--output", str(out),
        "--min-objects-per-image", "2", "--min-image-size", "0",
    ])
    assert rc == 0
    table, errors, summary = read_output(out)
    (g,) = table_to_graphs(table)
    assert [o.label for o in g.objects] == ["sky", "field"]
    assert g.objects[1].box == pytest.approx((0, 1 / 3, 1, 1))
    assert errors.column("code").to_pylist() == ["filtered_few_objects"]
    assert summary["dropped"] == {
        "objects_too_small": 1, "relationships_missing_object": 1, "relationships_to_dropped_object": 1
    }
    assert summary["config"]["min_objects_per_image"] == 2


def test_coco_through_the_cli_adds_file_name(tmp_path):
    instances = {
        "images": [{"id": 9, "file_name": "000000000009.jpg", "width": 100, "height": 100}],
        "annotations": [
            {"id": i, "image_id": 9, "category_id": 1, "bbox": [30 * i, 0, 25, 25], "segmentation": [[0, 0]]}
            for i in range(3)
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    out = tmp_path / "coco"
    rc = main(["coco", "--instances", write_json(tmp_path / "i.json", instances), "--output", str(out), "--seed", "3"])
    assert rc == 0
    table, errors, summary = read_output(out)
    assert table.column_names == GRAPH_SCHEMA.names + ["file_name"]
    assert table.column("file_name").to_pylist() == ["000000000009.jpg"]
    (g,) = table_to_graphs(table.select(GRAPH_SCHEMA.names))
    assert {r.predicate for r in g.relations} <= {"left of", "right of"}  # three people in a row
    assert errors.num_rows == 0 and summary["rows_written"] == 1


def test_shapes_subcommand_writes_class_maps(tmp_path):
    pytest.importorskip("sgmodel.shapes.world")
    out = tmp_path / "shapes"
    assert main(["shapes", "--count", "5", "--seed", "2", "--output", str(out), "--rows-per-shard", "2"]) == 0
    table, errors, summary = read_output(out)
    assert table.num_rows == 5 and errors.num_rows == 0 and len(summary["shards"]) == 3
    assert table.schema.field("class_map").type == pa.binary()
    assert all(v.startswith(b"\x89PNG") for v in table.column("class_map").to_pylist())
    assert all(v.startswith(b"\x89PNG") for v in table.column("image").to_pylist())
    again = tmp_path / "again"
    assert main(["shapes", "--count", "5", "--seed", "2", "--output", str(again)]) == 0
    assert read_output(again)[0].equals(table)  # deterministic for a seed


def test_writer_extra_columns_are_checked_and_errors_spill(tmp_path):
    storage = Storage(StorageSettings())
    writer = GraphShardWriter(storage, str(tmp_path / "w"), rows_per_shard=2,
                              extra_schema={"mask": pa.binary(), "n": pa.int64()}, error_batch=2)
    good = SceneGraph(id="a", objects=(SGObject("x"),))
    writer.add((good, {"mask": b"\x01", "n": 3}))
    writer.add((SceneGraph(id="b", objects=(SGObject("y"),)), {"mask": "not bytes"}))
    writer.add((SceneGraph(id="c", objects=(SGObject("z"),)), {"other": 1}))
    writer.add((SceneGraph(id="d", objects=(SGObject("w"),)), {"n": True}))
    writer.add(SceneGraph(id="e", objects=(SGObject("v"),)))  # extras missing: nulls
    writer.add(SceneGraphError(None, "json", "x", "broken", "invalid_json"))
    writer.add(SceneGraphError(["weird", "id"], "id", None, "bad", "bad_id"))
    writer.close()
    table = pq.read_table(tmp_path / "w" / "part-00000.parquet")
    assert table.column("mask").to_pylist() == [b"\x01", None]
    assert table.column("n").to_pylist() == [3, None]
    errors = pq.read_table(tmp_path / "w" / "_errors.parquet").to_pylist()
    assert [(e["id"], e["code"]) for e in errors] == [
        ("b", "bad_extra"), ("c", "bad_extra"), ("d", "bad_extra"), (None, "invalid_json"),
        ("['weird', 'id']", "bad_id"),
    ]
    assert writer.rows_read == 7 and writer.rows_written == 2 and writer.rows_rejected == 5
    assert not Path(writer._error_tmp.name).exists()  # the local spill file is gone


def test_writer_rejects_ids_arrow_cannot_store(tmp_path):
    writer = GraphShardWriter(Storage(StorageSettings()), str(tmp_path / "w"))
    writer.add(SceneGraphError("bad\ud800id", "id", "bad\ud800id", "is not valid Unicode", "bad_id"))
    writer.close()
    (row,) = pq.read_table(tmp_path / "w" / "_errors.parquet").to_pylist()
    assert row["id"] == "bad\\ud800id" and row["code"] == "bad_id"
