"""End to end: the generation job submitted with the real ``ray job submit --working-dir`` CLI.

A private head node is started with ``ray start --head`` (dashboard on, 2 CPUs, 127.0.0.1, its own
ports and temp dir: see ``tests/e2e/ray_cluster.py``), the repository is uploaded as the job's
working dir exactly as the README tells users to do, the job's status is polled with
``ray job status`` until it finishes, and the run folder is checked. Teardown ends only this
cluster's processes (never ``ray stop``, which would also kill any other Ray on the machine).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import FAKE_AWS_ENV
from tests.e2e.ray_cluster import LocalRayCluster
from tests.integration.jobdata import shapes_rows, write_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
# Ray already skips .git/.venv/__pycache__ and whatever .gitignore lists; these are stated again so
# the upload stays small even where a checkout has a different .gitignore or the env var
# RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 is set.
EXCLUDES = [".git", ".venv", "venv", "out", "build", "*.egg-info", ".pytest_cache", ".ruff_cache", ".hypothesis",
            "__pycache__", "*.log"]
ROWS, PER_SHARD = 6, 3
JOB_TIMEOUT_S = 600  # generous: a loaded 2-core machine starts Ray workers slowly


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    # Fake AWS settings: the job never needs S3 here, and nothing can reach real AWS or instance metadata.
    cluster = LocalRayCluster(num_cpus=2, env_extra=dict(FAKE_AWS_ENV))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("e2e-inputs") / "graphs"
    write_shards(folder, shapes_rows(ROWS, seed=11), per_shard=PER_SHARD)  # 2 shards of 3 rows
    return folder


def test_ray_job_submit_generates_the_dataset(ray_cluster, tiny_model_dir, segmenter_dir, graphs, tmp_path):
    output = tmp_path / "runs"
    submission_id = f"sgb-e2e-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    submit = ray_cluster.cli(
        "job", "submit", "--address", ray_cluster.dashboard_url, "--submission-id", submission_id,
        "--working-dir", str(REPO_ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--no-wait",
        "--",
        "python", "-m", "jobs.generate", "--input", str(graphs), "--output", str(output), "--run-id", "e2e",
        "--model", tiny_model_dir, "--segmenter", segmenter_dir, "--steps", "2", "--batch-size", "4",
        "--samples-per-graph", "1", "--log-every", "1",
        cwd=str(REPO_ROOT),
    )
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout}"
    assert submission_id in submit.stdout, submit.stdout
    # The working dir really was packaged and uploaded (the job then runs from that package).
    assert "Creating a file package for local module" in submit.stdout, submit.stdout
    assert "Uploading package gcs://_ray_pkg_" in submit.stdout, submit.stdout

    status = ray_cluster.wait_for_job(submission_id, timeout=JOB_TIMEOUT_S)
    logs = ray_cluster.job_logs(submission_id)
    if status != "SUCCEEDED":
        pytest.fail(f"job {submission_id} ended {status} after {time.monotonic() - started:.0f}s; logs:\n{logs[-8000:]}")

    run_dir = output / "e2e"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["rows_in"], summary["images"], summary["errors"]) == (ROWS, ROWS, 0), summary
    assert summary["recall"]["count"] == ROWS

    meta = pq.ParquetDataset(sorted((run_dir / "metadata").glob("*.parquet"))).read()
    assert meta.num_rows == ROWS
    assert sorted(meta["id"].to_pylist()) == [f"shapes-11-{i:06d}" for i in range(ROWS)]
    assert all(0.0 <= r <= 1.0 for r in meta["recall"].to_pylist())
    keys = meta["image_key"].to_pylist()
    assert len(set(keys)) == ROWS
    for key in keys:
        image = run_dir / key
        assert image.is_file() and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
    assert len(list((run_dir / "images").rglob("*.png"))) == ROWS

    markers = sorted((run_dir / "stats").glob("*_stats.json"))
    assert len(markers) == ROWS // PER_SHARD
    assert sum(json.loads(m.read_text())["count"] for m in markers) == ROWS
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["config"]["steps"] == 2 and run_json["config"]["run_id"] == "e2e"
    assert not list((run_dir / "errors").glob("*.parquet")) or pq.ParquetDataset(
        sorted((run_dir / "errors").glob("*.parquet"))).read().num_rows == 0
