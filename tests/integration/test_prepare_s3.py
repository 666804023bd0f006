"""prepare writes to s3:// on moto's standalone server; the Parquet reads back through boto3 and pyarrow."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.prepare import main
from sgmodel.graph import GRAPH_SCHEMA, table_to_graphs

pytestmark = pytest.mark.s3

SAMPLES = str(Path(__file__).resolve().parents[2] / "jobs" / "samples" / "graphs.json")


def arrow_fs(endpoint_url: str) -> pafs.S3FileSystem:
    """pyarrow's own S3 client, built here rather than through Storage, as a cross-check."""
    return pafs.S3FileSystem(endpoint_override=endpoint_url.split("://", 1)[1], scheme="http", region="us-east-1")


def test_prepare_to_s3_reads_back_with_boto3_and_pyarrow(s3_bucket, capsys):
    out = s3_bucket.uri("prepared/samples")
    rc = main([
        "sg2im", "--input", SAMPLES, "--output", out, "--rows-per-shard", "4",
        "--s3-endpoint-url", s3_bucket.endpoint_url,
    ])
    assert rc == 0
    assert "rows written   10" in capsys.readouterr().out

    client = s3_bucket.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket.name, Prefix="prepared/")["Contents"])
    assert keys == [
        "prepared/samples/_errors.parquet",
        "prepared/samples/_summary.json",
        "prepared/samples/part-00000.parquet",
        "prepared/samples/part-00001.parquet",
        "prepared/samples/part-00002.parquet",
    ]
    # boto3: raw bytes of each shard are plain Parquet
    tables = [
        pq.read_table(io.BytesIO(client.get_object(Bucket=s3_bucket.name, Key=k)["Body"].read()))
        for k in keys if "/part-" in k
    ]
    assert [t.num_rows for t in tables] == [4, 4, 2]
    assert all(t.schema == GRAPH_SCHEMA for t in tables)
    summary = json.loads(client.get_object(Bucket=s3_bucket.name, Key="prepared/samples/_summary.json")["Body"].read())
    assert (summary["rows_read"], summary["rows_written"], summary["rows_rejected"]) == (12, 10, 2)

    # pyarrow: the folder as one dataset (its default ignore_prefixes skip the "_" side files), and the errors
    fs = arrow_fs(s3_bucket.endpoint_url)
    dataset = ds.dataset(f"{s3_bucket.name}/prepared/samples", filesystem=fs, format="parquet")
    table = dataset.to_table()
    assert table.num_rows == 10
    ids = {g.id for g in table_to_graphs(table)}
    assert "sheep-meadow" in ids and "living-room-layout" in ids
    errors = pq.read_table(f"{s3_bucket.name}/prepared/samples/_errors.parquet", filesystem=fs)
    assert sorted(errors.column("id").to_pylist()) == ["broken-box", "broken-relation-index"]


def test_prepare_reads_s3_input_and_takes_the_endpoint_from_the_environment(s3_bucket, monkeypatch, tmp_path):
    images = [
        {"image_id": i, "objects": [
            {"object_id": 1, "x": 0, "y": 0, "w": 300, "h": 100, "names": ["sky"]},
            {"object_id": 2, "x": 0, "y": 100, "w": 300, "h": 200, "names": ["sea"]},
            {"object_id": 3, "x": 100, "y": 120, "w": 60, "h": 40, "names": ["boat"]},
        ], "relationships": [
            {"relationship_id": 1, "predicate": "above", "subject_id": 1, "object_id": 2},
            {"relationship_id": 2, "predicate": "on", "subject_id": 3, "object_id": 2},
        ]}
        for i in range(1, 6)
    ]
    storage = s3_bucket.storage()
    storage.write_text(s3_bucket.uri("raw/scene_graphs.json"), json.dumps(images))
    storage.write_text(s3_bucket.uri("raw/image_data.json"),
                       json.dumps([{"image_id": i, "width": 300, "height": 300} for i in range(1, 6)]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint_url)
    out = s3_bucket.uri("vg")
    rc = main(["vg", "--scene-graphs", s3_bucket.uri("raw/scene_graphs.json"),
               "--image-data", s3_bucket.uri("raw/image_data.json"), "--output", out, "--rows-per-shard", "2"])
    assert rc == 0
    table = pq.read_table(f"{s3_bucket.name}/vg/part-00002.parquet", filesystem=arrow_fs(s3_bucket.endpoint_url))
    (g,) = table_to_graphs(table)
    assert g.id == "5" and g.objects[2].box == pytest.approx((1 / 3, 0.4, 160 / 300, 160 / 300))

    # a smaller rerun removes the shards the first run left
    rc = main(["vg", "--scene-graphs", s3_bucket.uri("raw/scene_graphs.json"), "--output", out])
    assert rc == 0
    assert [u.rsplit("/", 1)[1] for u in storage.list(out)] == ["_errors.parquet", "_summary.json", "part-00000.parquet"]


def test_missing_s3_input_is_an_argument_error(s3_bucket, capsys):
    rc = main(["sg2im", "--input", s3_bucket.uri("nope.json"), "--output", s3_bucket.uri("o"),
               "--s3-endpoint-url", s3_bucket.endpoint_url])
    assert rc == 2
    assert "--input" in capsys.readouterr().err
