"""The generation job on a local Ray instance: counts, determinism, errors, resume, S3."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.common import RunExistsError
from jobs.generate import GenerateConfig, run
from tests.integration.jobdata import BAD_ROWS, bad_rows, shapes_rows, write_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def config(model: str, segmenter: str, input_uri: str, output: str, run_id: str, **kw) -> GenerateConfig:
    return GenerateConfig(input=input_uri, output=output, model=model, segmenter=segmenter, run_id=run_id, steps=2,
                          batch_size=4, report=False, log_every=1000, **kw)


def table(run_dir: Path, folder: str):
    files = sorted((run_dir / folder).glob("*.parquet"))
    return pq.ParquetDataset(files).read() if files else None


def image_bytes(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "images").rglob("*.png"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs") / "graphs"
    write_shards(folder, shapes_rows(10, seed=3), per_shard=4)  # 3 shards: 4 + 4 + 2 rows
    return folder


def test_counts_metadata_markers_and_rerun_identical(local_ray, tiny_model_dir, segmenter_dir, inputs, tmp_path):
    cfg = config(tiny_model_dir, segmenter_dir, str(inputs), str(tmp_path), "a", samples_per_graph=2)
    started = datetime.now(timezone.utc)
    summary, code = run(cfg)
    assert code == 0
    run_dir = tmp_path / "a"
    assert (summary["rows_in"], summary["images"], summary["errors"], summary["rows_lost"]) == (10, 20, 0, 0)
    meta = table(run_dir, "metadata")
    assert meta.num_rows == 20
    assert sorted(zip(meta["id"].to_pylist(), meta["sample_index"].to_pylist())) == sorted(
        (f"shapes-3-{i:06d}", k) for i in range(10) for k in range(2)
    )
    assert all((run_dir / key).is_file() for key in meta["image_key"].to_pylist())
    assert len(image_bytes(run_dir)) == 20
    recall = [r for r in meta["recall"].to_pylist()]
    assert all(r is not None and 0.0 <= r <= 1.0 for r in recall)
    assert summary["recall"]["count"] == 20
    assert summary["recall"]["mean"] == pytest.approx(sum(recall) / 20)
    assert len(set(meta["seed"].to_pylist())) == 20
    done = meta["generated_at"].to_pylist()  # when each image's batch left the generator
    assert all(started <= t <= datetime.now(timezone.utc) for t in done)
    stats = [json.loads(p.read_text()) for p in sorted((run_dir / "stats").glob("*_stats.json"))]
    assert len(stats) == 3
    assert sum(s["count"] for s in stats) == 10 and sum(s["successes"] for s in stats) == 10
    assert sum(s["images"] for s in stats) == 20 and all(s["failed"] == 0 for s in stats)
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["config"]["samples_per_graph"] == 2 and run_json["model_fingerprint"] and run_json["versions"]["ray"]

    again, _ = run(config(tiny_model_dir, segmenter_dir, str(inputs), str(tmp_path), "b", samples_per_graph=2))
    assert image_bytes(run_dir) == image_bytes(tmp_path / "b")
    assert again["recall"]["mean"] == pytest.approx(summary["recall"]["mean"])


def test_existing_run_needs_resume_or_overwrite(local_ray, tiny_model_dir, inputs, tmp_path):
    cfg = config(tiny_model_dir, "none", str(inputs), str(tmp_path), "r")
    run(cfg)
    with pytest.raises(RunExistsError, match="--resume"):
        run(cfg)
    (tmp_path / "r" / "stray.txt").write_text("from an old attempt")
    summary, code = run(config(tiny_model_dir, "none", str(inputs), str(tmp_path), "r", overwrite=True))
    assert code == 0 and summary["images"] == 10 and not (tmp_path / "r" / "stray.txt").exists()
    assert summary["recall"]["count"] == 0  # scoring off


def test_a_cpu_layout_that_cannot_run_leaves_no_run_folder(local_ray, tiny_model_dir, inputs, tmp_path):
    from jobs.config import ConfigError

    with pytest.raises(ConfigError, match="leave at least one free"):
        run(config(tiny_model_dir, "none", str(inputs), str(tmp_path), "big", workers="64", cpus_per_worker=1.0))
    assert not (tmp_path / "big").exists()


def test_resume_completes_exactly_the_missing_shards(local_ray, tiny_model_dir, segmenter_dir, inputs, tmp_path):
    run(config(tiny_model_dir, segmenter_dir, str(inputs), str(tmp_path), "x"))
    run_dir = tmp_path / "x"
    markers = sorted((run_dir / "stats").glob("*_stats.json"))
    interrupted = markers[1].name[: -len("_stats.json")]
    # Simulate an interruption in the middle of shard 2: no marker, half of its images and all its metadata gone.
    markers[1].unlink()
    lost = sorted((run_dir / "images" / interrupted).glob("*.png"))
    for p in lost[: len(lost) // 2]:
        p.unlink()
    for p in (run_dir / "metadata").glob(f"{interrupted}-*.parquet"):
        p.unlink()
    (run_dir / "metadata" / f"{interrupted}-stale.parquet").write_bytes(b"partial file of a dead attempt")
    committed = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*")
                 if p.is_file() and interrupted not in str(p) and p.parent.name != run_dir.name}

    summary, code = run(config(tiny_model_dir, segmenter_dir, str(inputs), str(tmp_path), "x", resume=True))
    assert code == 0
    assert (summary["rows_in"], summary["images"], summary["errors"], summary["rows_lost"]) == (10, 10, 0, 0)
    assert summary["shards_skipped"] == 2 and summary["shards_committed_now"] == 1
    assert (run_dir / "stats" / f"{interrupted}_stats.json").exists()
    assert not (run_dir / "metadata" / f"{interrupted}-stale.parquet").exists()
    for path, (mtime, data) in committed.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == data, path
    assert len(image_bytes(run_dir)) == 10
    assert table(run_dir, "metadata").num_rows == 10


def test_bad_rows_go_to_the_error_table_and_good_rows_are_generated(local_ray, tiny_model_dir, tmp_path):
    folder = tmp_path / "mixed"
    write_shards(folder, shapes_rows(5, seed=4) + bad_rows(), per_shard=6)
    cfg = config(tiny_model_dir, "none", str(folder), str(tmp_path / "out"), "m", max_objects=8, max_error_fraction=1.0)
    summary, code = run(cfg)
    assert code == 0
    errors = table(tmp_path / "out" / "m", "errors")
    by_id = {}
    for row in errors.to_pylist():
        by_id.setdefault(row["id"], []).append(row)
    expected = {r["id"]: code for code, r in BAD_ROWS.items()}
    for row_id, code_ in expected.items():
        (row,) = by_id[row_id]
        assert row["code"] == code_ and row_id in row["reason"], row
    assert [r["code"] for r in by_id["dup"]] == ["duplicate_id", "duplicate_id"]
    assert summary["errors"] == len(BAD_ROWS) + 2 and summary["images"] == 5 and summary["rows_lost"] == 0
    assert summary["rows_in"] == 5 + len(BAD_ROWS) + 2
    assert summary["errors_by_reason"]["duplicate_id"] == 2


def test_too_many_errors_fail_the_job_but_write_the_summary(local_ray, tiny_model_dir, tmp_path):
    folder = tmp_path / "mostly-bad"
    write_shards(folder, shapes_rows(2, seed=5) + bad_rows(), per_shard=20)
    summary, code = run(config(tiny_model_dir, "none", str(folder), str(tmp_path / "out"), "f", max_objects=8,
                               max_error_fraction=0.5))
    assert code == 1 and summary["status"] == "failed"
    assert json.loads((tmp_path / "out" / "f" / "summary.json").read_text())["errors"] == len(BAD_ROWS) + 2


def test_webdataset_output(local_ray, tiny_model_dir, inputs, tmp_path):
    import tarfile

    summary, code = run(config(tiny_model_dir, "none", str(inputs), str(tmp_path), "w", output_format="webdataset"))
    assert code == 0
    tars = sorted((tmp_path / "w" / "images").glob("*.tar"))
    names = [n for t in tars for n in tarfile.open(t).getnames()]
    assert len([n for n in names if n.endswith(".png")]) == 10 and len([n for n in names if n.endswith(".json")]) == 10
    meta = table(tmp_path / "w", "metadata")
    assert all(".tar/" in key for key in meta["image_key"].to_pylist())


def test_s3_input_and_output(local_ray, tiny_model_dir, segmenter_dir, s3_bucket, inputs):
    storage = s3_bucket.storage()
    for path in sorted(inputs.glob("*.parquet")):
        storage.write_bytes(s3_bucket.uri(f"in/{path.name}"), path.read_bytes())
    cfg = config(tiny_model_dir, segmenter_dir, s3_bucket.uri("in/"), s3_bucket.uri("runs"), "s3run",
                 s3_endpoint_url=s3_bucket.endpoint_url)
    summary, code = run(cfg)
    assert code == 0 and summary["images"] == 10
    keys = [u.split("/runs/s3run/", 1)[1] for u in storage.list(s3_bucket.uri("runs/s3run"))]
    assert len([k for k in keys if k.startswith("images/") and k.endswith(".png")]) == 10
    assert len([k for k in keys if k.startswith("stats/") and k.endswith("_stats.json")]) == 3
    assert {"run.json", "summary.json"} <= set(keys)
    meta = [k for k in keys if k.startswith("metadata/")]
    fs, path = storage.filesystem(s3_bucket.uri(f"runs/s3run/{meta[0]}"))
    assert pq.read_table(path, filesystem=fs).num_rows >= 1
