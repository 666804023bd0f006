"""Storage under faults (a fault proxy on 127.0.0.1 in front of moto), conditional writes, URL redaction."""

from __future__ import annotations

import os
import threading

import pytest

from tests.faultproxy import FaultProxy, FaultRates, FaultRule
from workers.storage import Storage, StorageSettings, redact, redact_values

DATA = os.urandom(300_000)


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server) as p:
        yield p


def through(proxy: FaultProxy, retries: int) -> Storage:
    return Storage(StorageSettings(endpoint_url=proxy.endpoint_url, region="us-east-1", retries=retries))


def test_read_bytes_retries_a_cut_body(s3_bucket, proxy):
    s3_bucket.storage().write_bytes(s3_bucket.uri("model/weights.bin"), DATA)
    proxy.rules.append(FaultRule("truncate", "model/weights.bin", times=2, method="GET"))
    assert through(proxy, retries=3).read_bytes(s3_bucket.uri("model/weights.bin")) == DATA
    assert proxy.injected["truncate"] == 2


def test_read_bytes_gives_up_after_its_retries(s3_bucket, proxy):
    s3_bucket.storage().write_bytes(s3_bucket.uri("cut.bin"), DATA)
    proxy.rules.append(FaultRule("truncate", "cut.bin", times=100, method="GET"))
    from botocore.exceptions import ResponseStreamingError

    with pytest.raises(ResponseStreamingError):
        through(proxy, retries=2).read_bytes(s3_bucket.uri("cut.bin"))
    assert proxy.injected["truncate"] == 3  # the first read and two retries, then the error


def test_reads_and_writes_survive_a_flaky_endpoint(s3_bucket, s3_server):
    rates = FaultRates(slow_down=0.2, reset=0.02, truncate=0.05, seed=1)
    with FaultProxy(s3_server, rates=rates) as proxy:
        storage = through(proxy, retries=8)
        for i in range(30):
            storage.write_bytes(s3_bucket.uri(f"f/{i}.bin"), DATA[i * 1000 : i * 1000 + 5000])
        for i in range(30):
            assert storage.read_bytes(s3_bucket.uri(f"f/{i}.bin")) == DATA[i * 1000 : i * 1000 + 5000]
        assert len(storage.list(s3_bucket.uri("f"))) == 30
    assert proxy.injected["slow_down"] > 0 and proxy.injected["truncate"] > 0


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """A storage and a fresh URI in a folder, locally and on S3."""
    if request.param == "local":
        return Storage(), str(tmp_path / "run" / "_lease.json")
    bucket = request.getfixturevalue("s3_bucket")
    return bucket.storage(), bucket.uri("run/_lease.json")


def test_conditional_writes(place):
    storage, uri = place
    first = storage.create_new(uri, b"one")
    assert first is not None
    assert storage.create_new(uri, b"two") is None
    assert storage.read_versioned(uri) == (b"one", first)
    assert storage.replace_if(uri, b"three", "not-the-version") is None
    second = storage.replace_if(uri, b"three", first)
    assert second is not None and second != first
    assert storage.read_bytes(uri) == b"three"
    assert not storage.delete_if(uri, first)
    assert storage.delete_if(uri, second)
    assert storage.read_versioned(uri) is None and not storage.exists(uri)


def test_exactly_one_of_racing_creates_wins(place):
    storage, uri = place
    results: list = [None] * 8
    start = threading.Barrier(8)

    def create(i: int) -> None:
        mine = Storage(storage.settings)  # a client per thread, as separate processes would have
        start.wait()
        results[i] = mine.create_new(uri, f"writer {i}".encode())

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [i for i, v in enumerate(results) if v is not None]
    assert len(winners) == 1
    assert storage.read_bytes(uri) == f"writer {winners[0]}".encode()


def test_a_conditional_create_whose_answer_was_lost_is_recognised(s3_bucket, proxy):
    # S3 applied the put, the answer never came, boto3 retried and S3 refused: the stored bytes are ours.
    proxy.rules.append(FaultRule("reset_after", "run/_lease.json", times=1, method="PUT"))
    storage = through(proxy, retries=3)
    version = storage.create_new(s3_bucket.uri("run/_lease.json"), b"mine")
    assert version is not None and proxy.injected["reset_after"] == 1
    assert storage.create_new(s3_bucket.uri("run/_lease.json"), b"someone else") is None


def test_redact_removes_user_and_password_from_urls():
    assert redact("http://AKIA123:s3cr%2Fet@minio.local:9000/bucket") == "http://***@minio.local:9000/bucket"
    assert redact("see https://user@host/x and s3://bucket/key") == "see https://***@host/x and s3://bucket/key"
    assert redact("no url here: a@b") == "no url here: a@b"
    nested = redact_values({"cfg": {"endpoint": "http://u:p@h:1"}, "list": ["ftp://x:y@z/"], "n": 3})
    assert nested == {"cfg": {"endpoint": "http://***@h:1"}, "list": ["ftp://***@z/"], "n": 3}
    settings = StorageSettings(endpoint_url="http://u:secret@127.0.0.1:9")
    assert "secret" not in repr(settings) and "127.0.0.1:9" in repr(settings)
