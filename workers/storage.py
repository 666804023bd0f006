"""One I/O layer for local paths and s3:// URIs.

A single ``StorageSettings`` builds both the boto3 client (objects) and the
``pyarrow.fs.S3FileSystem`` (Parquet), so endpoint, region and retries can never disagree.
Credentials are never stored here: both clients use the standard AWS credential chain
(environment, shared config, instance profile).
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import io
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def _hidden(uri: str) -> bool:
    return posixpath.basename(uri).startswith(("_", "."))


def join(base: str, *parts: str) -> str:
    """Join URI/path parts with '/' (local paths too: the project runs on POSIX)."""
    return posixpath.join(base.rstrip("/") if base != "/" else base, *parts)


@dataclass(frozen=True, kw_only=True)
class StorageSettings:
    endpoint_url: str | None = None
    """S3 endpoint override (MinIO, moto, a VPC endpoint). Default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    region: str | None = None
    """AWS region. Default: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1."""
    retries: int = 5
    """Retry attempts for S3 calls (boto3 'standard' mode and pyarrow's retry strategy)."""

    def __post_init__(self) -> None:
        # boto3 needs a scheme; without this check a bare "host:port" fails later, far from its cause.
        if self.endpoint_url is not None and urlparse(self.endpoint_url).scheme not in ("http", "https"):
            raise ValueError(f"endpoint_url must start with http:// or https://, got {self.endpoint_url!r}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries!r}")

    @classmethod
    def from_env(cls, **overrides) -> StorageSettings:
        env = os.environ
        values = {
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def resolved_region(self) -> str:
        return self.region or "us-east-1"

    def boto3_client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.resolved_region,
            config=Config(retries={"max_attempts": self.retries, "mode": "standard"}),
        )

    def arrow_s3(self) -> pafs.S3FileSystem:
        kwargs = {
            "region": self.resolved_region,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.retries),
        }
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        return pafs.S3FileSystem(**kwargs)


class Storage:
    """Bytes, listings and Parquet at local paths and s3:// URIs alike. Picklable (clients are lazy)."""

    def __init__(self, settings: StorageSettings | None = None) -> None:
        self.settings = settings or StorageSettings.from_env()

    def __getstate__(self):
        return {"settings": self.settings}

    def __setstate__(self, state):
        self.settings = state["settings"]

    @cached_property
    def s3(self):
        return self.settings.boto3_client()

    @cached_property
    def arrow_s3(self) -> pafs.S3FileSystem:
        return self.settings.arrow_s3()

    # -- filesystem handles for pyarrow / Ray Data
    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the path inside it for a URI."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return self.arrow_s3, f"{bucket}/{key}"
        return pafs.LocalFileSystem(), os.path.abspath(uri)

    # -- bytes
    def write_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            extra = {"ContentType": content_type} if content_type else {}
            self.s3.put_object(Bucket=bucket, Key=key, Body=data, **extra)
            return
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    def read_bytes(self, uri: str) -> bytes:
        """The object's bytes; a missing object raises FileNotFoundError for local paths and S3 alike."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            if not key:
                raise IsADirectoryError(f"{uri!r} is a bucket, not an object")
            try:
                return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except self.s3.exceptions.NoSuchKey:
                raise FileNotFoundError(f"no such S3 object: {uri!r}") from None
        return Path(uri).read_bytes()

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"), content_type="text/plain; charset=utf-8")

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            if not key:
                return False  # a bucket is not an object (and head_object rejects an empty key)
            try:
                self.s3.head_object(Bucket=bucket, Key=key)
                return True
            except self.s3.exceptions.ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
        return os.path.exists(uri)

    def list(self, prefix: str) -> list[str]:
        """Every file URI under a folder prefix (recursive), sorted."""
        if is_s3(prefix):
            bucket, key = split_s3(prefix)
            key = key.rstrip("/") + "/" if key else ""
            out = []
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                out.extend(f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", []))
            return sorted(out)
        root = Path(prefix)
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            self.s3.delete_object(Bucket=bucket, Key=key)
        elif os.path.exists(uri):
            os.remove(uri)

    def delete_prefix(self, prefix: str) -> int:
        files = self.list(prefix)
        for uri in files:
            self.delete(uri)
        return len(files)

    # -- Parquet
    def write_parquet(self, table: pa.Table, uri: str) -> None:
        if is_s3(uri):
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="zstd")
            self.write_bytes(uri, buf.getvalue(), content_type="application/vnd.apache.parquet")
            return
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(uri).with_name(f".{Path(uri).name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, uri)

    def read_parquet(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        fs, path = self.filesystem(uri)
        return pq.read_table(path, filesystem=fs, columns=columns)

    def parquet_rows(self, uri: str) -> int:
        fs, path = self.filesystem(uri)
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def iter_parquet_batches(self, uri: str, batch_size: int = 1024, columns: list[str] | None = None) -> Iterator:
        fs, path = self.filesystem(uri)
        with fs.open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)

    # -- inputs
    def expand_input(self, uri: str, suffix: str = ".parquet") -> list[str]:
        """A file, a folder (every ``*suffix`` below it) or a glob, local or s3://; sorted, never empty.

        In folders, files whose name starts with ``_`` or ``.`` (side tables such as prepare's
        ``_errors.parquet``) are not inputs, as for Spark and Arrow datasets.
        """
        if is_s3(uri):
            bucket, key = split_s3(uri)
            if any(ch in key for ch in "*?["):
                base = key[: min(key.find(ch) for ch in "*?[" if ch in key)].rsplit("/", 1)[0]
                found = [u for u in self.list(f"s3://{bucket}/{base}") if fnmatch.fnmatch(split_s3(u)[1], key)]
            elif self.exists(uri):
                found = [uri]
            else:
                found = [u for u in self.list(uri) if u.endswith(suffix) and not _hidden(u)]
        elif any(ch in uri for ch in "*?["):
            found = sorted(p for p in globlib.glob(uri, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(uri):
            found = [u for u in self.list(uri) if u.endswith(suffix) and not _hidden(u)]
        else:
            found = [uri] if os.path.isfile(uri) else []
        if not found:
            raise FileNotFoundError(f"no input files match {uri!r} (expected a file, a folder of *{suffix}, or a glob)")
        return sorted(found)
