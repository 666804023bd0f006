"""Storage: one API for local paths and s3:// (moto's standalone server over HTTP)."""

from __future__ import annotations

import io
import os
import pickle

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from workers.storage import Storage, StorageSettings, is_s3, join, split_s3

TABLE = pa.table({"id": ["a", "b", "c"], "n": [1, 2, 3]})


# ----------------------------------------------------------------------------- pure helpers


def test_split_and_join():
    assert split_s3("s3://bucket/a/b.parquet") == ("bucket", "a/b.parquet")
    assert split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="not an s3:// URI"):
        split_s3("/local/path")
    assert is_s3("s3://b/k") and not is_s3("out/s3://x")
    assert join("s3://b/prefix/", "part-0.parquet") == "s3://b/prefix/part-0.parquet"
    assert join("out", "a", "b") == "out/a/b"
    assert join("/", "x") == "/x"


def test_settings_from_env_and_overrides(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_REGION", raising=False)
    settings = StorageSettings.from_env()
    assert settings.endpoint_url == "http://s3-specific:2"  # the S3-specific variable wins, as in boto3
    assert settings.resolved_region == "eu-west-3"
    assert StorageSettings.from_env(endpoint_url="http://flag:3").endpoint_url == "http://flag:3"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert StorageSettings.from_env().endpoint_url == "http://generic:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert StorageSettings.from_env().endpoint_url is None
    assert StorageSettings.from_env().resolved_region == "us-east-1"


def test_settings_reject_endpoint_without_scheme():
    with pytest.raises(ValueError, match="'localhost:9000'"):
        StorageSettings(endpoint_url="localhost:9000")
    with pytest.raises(ValueError, match="retries"):
        StorageSettings(retries=-1)


def test_one_settings_object_configures_both_clients():
    settings = StorageSettings(endpoint_url="http://127.0.0.1:9", region="eu-central-1", retries=3)
    client = settings.boto3_client()
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "eu-central-1"
    assert client.meta.config.retries["total_max_attempts"] == 4  # 3 retries after the first attempt
    fs = settings.arrow_s3()
    assert isinstance(fs, pafs.S3FileSystem)
    assert fs.region == "eu-central-1"
    # pyarrow exposes endpoint and scheme only through its pickled form.
    options = fs.__reduce__()[1][0]
    assert (options["endpoint_override"], options["scheme"]) == ("127.0.0.1:9", "http")


def test_storage_pickles_without_clients():
    storage = Storage(StorageSettings(endpoint_url="http://127.0.0.1:9"))
    _ = storage.s3  # build the lazy client
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.settings == storage.settings
    assert "s3" not in clone.__dict__


# ----------------------------------------------------------------------------- local paths


def test_local_bytes_text_exists_delete(tmp_path):
    storage = Storage(StorageSettings())
    uri = str(tmp_path / "deep" / "dir" / "file.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00\x01payload")
    assert storage.read_bytes(uri) == b"\x00\x01payload"
    storage.write_text(str(tmp_path / "t.txt"), "héllo\n")
    assert storage.read_text(str(tmp_path / "t.txt")) == "héllo\n"
    assert storage.exists(uri)
    assert [p.name for p in (tmp_path / "deep" / "dir").iterdir()] == ["file.bin"]  # no temp file left
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting a missing file is not an error
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)


def test_local_overwrite_is_atomic_replace(tmp_path):
    storage = Storage(StorageSettings())
    uri = str(tmp_path / "f.bin")
    storage.write_bytes(uri, b"first version, longer")
    storage.write_bytes(uri, b"second")
    assert storage.read_bytes(uri) == b"second"


def test_local_list_and_delete_prefix(tmp_path):
    storage = Storage(StorageSettings())
    for name in ("a/1.parquet", "a/sub/2.parquet", "a/notes.txt", "a/.hidden", "b/3.parquet"):
        storage.write_bytes(str(tmp_path / name), b"x")
    listed = storage.list(str(tmp_path / "a"))
    assert listed == sorted(str(tmp_path / n) for n in ("a/1.parquet", "a/sub/2.parquet", "a/notes.txt"))
    assert storage.list(str(tmp_path / "missing")) == []
    assert storage.delete_prefix(str(tmp_path / "a")) == 3
    assert storage.list(str(tmp_path / "a")) == []
    assert storage.list(str(tmp_path / "b")) == [str(tmp_path / "b/3.parquet")]


def test_local_parquet_roundtrip_and_batches(tmp_path):
    storage = Storage(StorageSettings())
    uri = str(tmp_path / "out" / "t.parquet")
    storage.write_parquet(TABLE, uri)
    assert storage.read_parquet(uri).equals(TABLE)
    assert storage.read_parquet(uri, columns=["n"]).column_names == ["n"]
    assert storage.parquet_rows(uri) == 3
    batches = list(storage.iter_parquet_batches(uri, batch_size=2))
    assert [b.num_rows for b in batches] == [2, 1]
    assert pq.read_table(uri).equals(TABLE)  # a plain Parquet file, readable without Storage
    fs, path = storage.filesystem(uri)
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.abspath(uri)


def test_local_expand_input(tmp_path):
    storage = Storage(StorageSettings())
    for name in ("in/b.parquet", "in/a.parquet", "in/x/c.parquet", "in/skip.json"):
        storage.write_bytes(str(tmp_path / name), b"x")
    single = str(tmp_path / "in" / "a.parquet")
    assert storage.expand_input(single) == [single]
    assert storage.expand_input(str(tmp_path / "in")) == [
        str(tmp_path / n) for n in ("in/a.parquet", "in/b.parquet", "in/x/c.parquet")
    ]
    assert storage.expand_input(str(tmp_path / "in" / "*.parquet")) == [
        str(tmp_path / n) for n in ("in/a.parquet", "in/b.parquet")
    ]
    assert storage.expand_input(str(tmp_path / "in"), suffix=".json") == [str(tmp_path / "in/skip.json")]
    with pytest.raises(FileNotFoundError, match="no input files match"):
        storage.expand_input(str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError):
        storage.expand_input(str(tmp_path / "in" / "*.csv"))


# ----------------------------------------------------------------------------- s3:// on moto


def test_s3_bytes_text_exists_delete(s3_bucket):
    storage = s3_bucket.storage()
    uri = s3_bucket.uri("dir/file.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00payload", content_type="application/octet-stream")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"\x00payload"
    head = s3_bucket.client().head_object(Bucket=s3_bucket.name, Key="dir/file.bin")
    assert head["ContentType"] == "application/octet-stream"
    storage.write_text(s3_bucket.uri("t.txt"), "héllo")
    assert storage.read_text(s3_bucket.uri("t.txt")) == "héllo"
    assert not storage.exists(s3_bucket.uri("dir"))  # a prefix is not an object
    assert not storage.exists(f"s3://{s3_bucket.name}")  # nor is the bucket
    storage.delete(uri)
    assert not storage.exists(uri)


def test_s3_missing_object_is_file_not_found(s3_bucket):
    storage = s3_bucket.storage()
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_bytes(s3_bucket.uri("missing.bin"))
    with pytest.raises(FileNotFoundError):
        storage.read_parquet(s3_bucket.uri("missing.parquet"))


def test_s3_list_is_scoped_to_the_folder(s3_bucket):
    storage = s3_bucket.storage()
    for key in ("run/a.parquet", "run/sub/b.parquet", "run2/c.parquet", "top.txt"):
        storage.write_bytes(s3_bucket.uri(key), b"x")
    assert storage.list(s3_bucket.uri("run")) == [s3_bucket.uri("run/a.parquet"), s3_bucket.uri("run/sub/b.parquet")]
    assert len(storage.list(f"s3://{s3_bucket.name}")) == 4
    assert storage.delete_prefix(s3_bucket.uri("run")) == 2
    assert storage.list(s3_bucket.uri("run")) == []
    assert storage.list(s3_bucket.uri("run2")) == [s3_bucket.uri("run2/c.parquet")]


def test_s3_list_paginates(s3_bucket):
    client = s3_bucket.client()
    for i in range(1005):  # more than one list_objects_v2 page (1000 keys)
        client.put_object(Bucket=s3_bucket.name, Key=f"many/{i:05d}", Body=b"")
    listed = s3_bucket.storage().list(s3_bucket.uri("many"))
    assert len(listed) == 1005 and listed[0].endswith("/00000") and listed[-1].endswith("/01004")


def test_s3_parquet_written_by_storage_reads_with_boto3_and_pyarrow(s3_bucket):
    storage = s3_bucket.storage()
    uri = s3_bucket.uri("tables/t.parquet")
    storage.write_parquet(TABLE, uri)
    assert storage.read_parquet(uri).equals(TABLE)
    assert storage.parquet_rows(uri) == 3
    assert [b.num_rows for b in storage.iter_parquet_batches(uri, batch_size=2)] == [2, 1]
    # Independently of Storage: raw boto3 bytes, and pyarrow's own S3 filesystem.
    raw = boto3.client(
        "s3", endpoint_url=s3_bucket.endpoint_url, region_name="us-east-1"
    ).get_object(Bucket=s3_bucket.name, Key="tables/t.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(raw)).equals(TABLE)
    host = s3_bucket.endpoint_url.split("://", 1)[1]
    fs = pafs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1")
    assert pq.read_table(f"{s3_bucket.name}/tables/t.parquet", filesystem=fs).equals(TABLE)


def test_s3_parquet_written_by_pyarrow_reads_through_storage(s3_bucket):
    storage = s3_bucket.storage()
    fs, path = storage.filesystem(s3_bucket.uri("by-arrow/t.parquet"))
    pq.write_table(TABLE, path, filesystem=fs)
    assert storage.read_parquet(s3_bucket.uri("by-arrow/t.parquet")).equals(TABLE)
    assert storage.exists(s3_bucket.uri("by-arrow/t.parquet"))


def test_s3_expand_input(s3_bucket):
    storage = s3_bucket.storage()
    for key in ("in/b.parquet", "in/a.parquet", "in/x/c.parquet", "in/skip.json", "other/d.parquet"):
        storage.write_bytes(s3_bucket.uri(key), b"x")
    uri = s3_bucket.uri
    assert storage.expand_input(uri("in/a.parquet")) == [uri("in/a.parquet")]
    assert storage.expand_input(uri("in")) == [uri("in/a.parquet"), uri("in/b.parquet"), uri("in/x/c.parquet")]
    assert storage.expand_input(uri("in/*.json"), suffix=".json") == [uri("in/skip.json")]
    assert storage.expand_input(f"s3://{s3_bucket.name}") == [
        uri("in/a.parquet"), uri("in/b.parquet"), uri("in/x/c.parquet"), uri("other/d.parquet")
    ]
    with pytest.raises(FileNotFoundError, match="no input files match"):
        storage.expand_input(uri("nope"))
