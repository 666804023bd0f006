"""One I/O layer for local paths and s3:// URIs.

A single ``StorageSettings`` builds both the boto3 client (objects) and the
``pyarrow.fs.S3FileSystem`` (Parquet), so endpoint, region and retries can never disagree.
Credentials are never stored here: both clients use the standard AWS credential chain
(environment, shared config, instance profile); a ``user:password@`` inside a URL is redacted
(:func:`redact`) wherever the project writes or logs one.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob as globlib
import hashlib
import io
import logging
import os
import posixpath
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")


def redact(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://***@host``, for every URL in a text."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


def redact_values(value):
    """:func:`redact` applied to every string inside nested dicts, lists and tuples."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return value


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
    retries: int = 8
    """Retries of an S3 call after its first attempt (boto3 'standard' mode, pyarrow's retry strategy), and
    re-reads of a response body cut off in transit. At one failed request in four, 8 retries leave about
    one lost call in 500,000."""

    def __post_init__(self) -> None:
        # boto3 needs a scheme; without this check a bare "host:port" fails later, far from its cause.
        if self.endpoint_url is not None and urlparse(self.endpoint_url).scheme not in ("http", "https"):
            raise ValueError(f"endpoint_url must start with http:// or https://, got {self.endpoint_url!r}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries!r}")

    def __repr__(self) -> str:
        endpoint = redact(self.endpoint_url) if self.endpoint_url else None
        return f"StorageSettings(endpoint_url={endpoint!r}, region={self.region!r}, retries={self.retries!r})"

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

        # A session of its own: boto3's default session keeps the first credentials it resolved for the
        # life of the process, so a later change of environment (or profile) would go unseen.
        return boto3.session.Session().client(
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
        """The object's bytes; a missing object raises FileNotFoundError for local paths and S3 alike.

        boto3 retries a failed request, but not a response body cut off while it streams in (the
        request had succeeded): that is retried here, with the same number of attempts.
        """
        if is_s3(uri):
            return self._read_s3(uri)[0]
        return Path(uri).read_bytes()

    def _read_s3(self, uri: str) -> tuple[bytes, str]:
        """Bytes and ETag of an S3 object, re-reading a cut-off body with backoff."""
        bucket, key = split_s3(uri)
        if not key:
            raise IsADirectoryError(f"{uri!r} is a bucket, not an object")

        def get() -> tuple[bytes, str]:
            try:
                response = self.s3.get_object(Bucket=bucket, Key=key)
            except self.s3.exceptions.NoSuchKey:
                raise FileNotFoundError(f"no such S3 object: {uri!r}") from None
            return response["Body"].read(), response["ETag"]

        return with_retries(get, self.settings.retries, f"reading {uri}", body_errors())

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

    # -- conditional writes (leases): a version is the S3 ETag, or a content hash for local files
    def create_new(self, uri: str, data: bytes) -> str | None:
        """Write ``data`` only if nothing exists at ``uri``; its version, or None when something does.

        S3: a conditional put (``If-None-Match: *``). A put that S3 applied but whose answer was lost is
        retried by boto3 and then refused; the stored bytes being ``data`` tells it was this call.
        Local: under an exclusive lock on the folder.
        """
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                return self.s3.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
            except self.s3.exceptions.ClientError as err:
                if not _precondition_failed(err):
                    raise
            return self._version_if_ours(uri, data)
        with _folder_lock(uri):
            if os.path.exists(uri):
                return None
            self.write_bytes(uri, data)
            return _content_version(data)

    def read_versioned(self, uri: str) -> tuple[bytes, str] | None:
        """The bytes and version of ``uri``, or None when it does not exist."""
        try:
            if is_s3(uri):
                return self._read_s3(uri)
            data = Path(uri).read_bytes()
        except FileNotFoundError:
            return None
        return data, _content_version(data)

    def replace_if(self, uri: str, data: bytes, version: str) -> str | None:
        """Overwrite ``uri`` only while it is still at ``version``; the new version, or None otherwise.

        S3: a conditional put (``If-Match: <etag>``); local: under an exclusive lock on the folder.
        """
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                return self.s3.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"]
            except self.s3.exceptions.ClientError as err:
                if not _precondition_failed(err):
                    raise
            return self._version_if_ours(uri, data)
        with _folder_lock(uri):
            current = self.read_versioned(uri)
            if current is None or current[1] != version:
                return None
            self.write_bytes(uri, data)
            return _content_version(data)

    def delete_if(self, uri: str, version: str) -> bool:
        """Delete ``uri`` if it is still at ``version`` (on S3 checked just before the delete)."""
        if is_s3(uri):
            current = self.read_versioned(uri)
            if current is None or current[1] != version:
                return False
            self.delete(uri)
            return True
        with _folder_lock(uri):
            current = self.read_versioned(uri)
            if current is None or current[1] != version:
                return False
            os.remove(uri)
            return True

    def _version_if_ours(self, uri: str, data: bytes) -> str | None:
        current = self.read_versioned(uri)
        return current[1] if current is not None and current[0] == data else None

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


# ----------------------------------------------------------------------------- retries and locks


def body_errors() -> tuple[type[BaseException], ...]:
    """Errors of a response body that stopped or arrived damaged after the request succeeded."""
    from botocore import exceptions as bx
    from urllib3.exceptions import ProtocolError
    from urllib3.exceptions import ReadTimeoutError as Urllib3ReadTimeout

    return (bx.ResponseStreamingError, bx.IncompleteReadError, bx.ReadTimeoutError, bx.ConnectionClosedError,
            bx.FlexibleChecksumError, ProtocolError, Urllib3ReadTimeout, ConnectionError)


def with_retries(call: Callable, retries: int, what: str, errors: tuple[type[BaseException], ...]):
    """``call()``, retried up to ``retries`` times on ``errors`` with jittered exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return call()
        except errors as err:
            if attempt == retries:
                raise
            delay = min(5.0, 0.2 * 2**attempt) * random.uniform(0.5, 1.0)
            logger.warning("%s failed (%s: %s); retry %d of %d in %.1f s", redact(what), type(err).__name__,
                           redact(str(err)), attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _precondition_failed(err) -> bool:
    """S3 refused a conditional write: 412, or 409 when a concurrent conditional write won."""
    code = err.response.get("Error", {}).get("Code")
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _folder_lock(uri: str) -> Iterator[None]:
    """An exclusive advisory lock on the folder holding ``uri`` (created if needed), for local conditional writes."""
    folder = os.path.dirname(os.path.abspath(uri))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
