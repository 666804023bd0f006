"""Fixtures shared by every test suite: a local S3 server (moto, over real HTTP) and fresh buckets.

Use ``s3_bucket`` in a test that needs S3: it gives a new, empty bucket on a moto server running
on 127.0.0.1 and the ``StorageSettings`` pointing at it, so both boto3 and pyarrow (and Ray Data
through ``Storage.filesystem``) talk to the same endpoint. Tests that use these fixtures get the
``s3`` marker automatically. Never use moto's in-process ``mock_aws``: pyarrow's C++ S3 client
does not see it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from workers.storage import Storage, StorageSettings

# Ray resolves the node address 127.0.0.1 to this machine's routable address unless it runs as a
# single-host instance: this keeps every Ray started by the tests (and their workers) on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
LOOPBACK = "127.0.0.1"

S3_FIXTURES = {"s3_server", "s3_settings", "s3_bucket"}

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
"""Fake credentials, and no shared config or instance metadata: a test can never reach real AWS."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses the S3 fixtures with ``s3`` (select or skip them with ``-m``)."""
    for item in items:
        if S3_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's standalone S3 server on 127.0.0.1 (one per test run); yields its endpoint URL.

    Sets fake AWS credentials in the environment for the whole test run (Ray workers started later
    inherit them) and removes any endpoint override the developer's shell may carry.
    """
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_AWS_ENV.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def s3_settings(s3_server: str) -> StorageSettings:
    """StorageSettings for the moto server (endpoint, us-east-1, few retries so failures are quick)."""
    return StorageSettings(endpoint_url=s3_server, region="us-east-1", retries=2)


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the moto server, with the settings that reach it."""

    name: str
    settings: StorageSettings

    @property
    def endpoint_url(self) -> str:
        assert self.settings.endpoint_url is not None
        return self.settings.endpoint_url

    def uri(self, *parts: str) -> str:
        """``s3://{bucket}/{parts joined by /}``."""
        return "/".join([f"s3://{self.name}", *(p.strip("/") for p in parts)])

    def storage(self) -> Storage:
        return Storage(self.settings)

    def client(self):
        """A boto3 S3 client on the moto endpoint (independent of ``Storage``, for cross-checks)."""
        return self.settings.boto3_client()


_bucket_numbers = itertools.count(1)


@pytest.fixture
def s3_bucket(s3_settings: StorageSettings) -> S3Bucket:
    """A new empty bucket ``sgb-test-<n>`` (a valid S3 name) on the test run's moto server."""
    name = f"sgb-test-{next(_bucket_numbers)}"
    s3_settings.boto3_client().create_bucket(Bucket=name)
    return S3Bucket(name=name, settings=s3_settings)


# ----------------------------------------------------------------------------- models and Ray


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny untrained scene-graph pipeline (debug flavour, 16x16, shapes vocabulary), saved once."""
    from sgmodel.shapes.diffusion import VOCABULARY
    from sgmodel.shapes.flavours import build_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny-sg"
    build_pipeline("debug", VOCABULARY, seed=0, use_caption=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def segmenter_dir() -> str:
    """The project's trained shapes segmenter (3 MB, committed under models/)."""
    from jobs.defaults import DEMO_SEGMENTER, resolve

    path = resolve(DEMO_SEGMENTER)
    if not (Path(path) / "config.json").exists():
        pytest.fail(f"the shapes segmenter checkpoint is missing at {path}")
    return path


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """One local Ray instance (2 CPUs) for the whole test run; workers get the fake AWS credentials."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address=LOOPBACK,
                 runtime_env={"env_vars": dict(FAKE_AWS_ENV)})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield
    ray.shutdown()
