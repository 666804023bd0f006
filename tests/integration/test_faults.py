"""The generation job under faults and hostile input, on a local Ray (127.0.0.1) and moto behind a fault proxy.

Streaming commits, per-file schemas, damaged files, integer ids, the run lease with a killed
driver, a flaky S3 endpoint, and credentials in URLs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.generate import GenerateConfig, build_dataset, main, run
from jobs.lease import RunLockedError
from jobs.stages import generator_stage, read_validated, sink_stage
from sgmodel.graph import GRAPH_SCHEMA
from tests.faultproxy import FaultProxy, FaultRates
from tests.integration.gate import hold_last_shard
from tests.integration.jobdata import shapes_rows, write_shards
from tests.unit.test_reader import corrupt_row_group

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def config(model: str, input_uri: str, output: str, run_id: str, **kw) -> GenerateConfig:
    values = {"segmenter": "none", "steps": 2, "batch_size": 4, "report": False, "log_every": 1000} | kw
    return GenerateConfig(input=input_uri, output=output, model=model, run_id=run_id, **values)


def table(run_dir: Path, folder: str) -> pa.Table | None:
    files = sorted((run_dir / folder).glob("*.parquet"))
    return pq.ParquetDataset(files).read() if files else None


def stats(run_dir: Path) -> dict[str, dict]:
    return {p.name[: -len("_stats.json")]: json.loads(p.read_text()) for p in (run_dir / "stats").glob("*_stats.json")}


def pngs(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "images").rglob("*.png"))}


@pytest.fixture
def sgbatch_log(tmp_path):
    """The job's log lines (progress, warnings) in a file, as a user's terminal shows them."""
    path = tmp_path / "sgbatch.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("sgbatch")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield path
    logger.removeHandler(handler)
    logger.setLevel(level)
    handler.close()


# ----------------------------------------------------------------------------- streaming


def test_shards_are_committed_and_reported_while_later_shards_are_still_running(
        local_ray, tiny_model_dir, tmp_path, sgbatch_log):
    write_shards(tmp_path / "in", shapes_rows(12, seed=8), per_shard=4)
    flag = tmp_path / "held.json"

    def gated_build(cfg, pending, storage, dupes, run_uri, model_fp):
        from jobs.stages import generation_settings
        from workers.generator import Generator

        ds = read_validated(cfg, pending, storage, dupes)
        ds = ds.map_batches(hold_last_shard, batch_size=None, batch_format="pyarrow", num_cpus=0.1,
                            fn_args=(pending[-1].name, str(tmp_path / "out" / "s" / "stats"), str(sgbatch_log),
                                     str(flag)))
        ds = generator_stage(ds, cfg, Generator, (generation_settings(cfg, 0), storage.settings), 0)
        return sink_stage(ds, cfg, run_uri, model_fp, storage)

    summary, code = run(config(tiny_model_dir, str(tmp_path / "in"), str(tmp_path / "out"), "s", log_every=0.5),
                        build=gated_build)
    assert code == 0 and summary["images"] == 12 and summary["rows_lost"] == 0
    # The last shard was held back until the first two were committed and a progress line had shown it:
    # results reach the driver as they are made, and progress lines come on time, not with the next result.
    assert json.loads(flag.read_text()) == {"stats_files": 2, "progress_line": True}
    assert len(stats(tmp_path / "out" / "s")) == 3
    lines = [line for line in sgbatch_log.read_text().splitlines() if line.startswith("progress:")]
    assert lines[-1].startswith("progress: 12/12 rows (100%), 12 images") and "3/3 shards committed" in lines[-1]


# ----------------------------------------------------------------------------- hostile input files


def test_files_with_their_own_columns_damage_integer_ids_and_no_rows(local_ray, tiny_model_dir, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    good = shapes_rows(10, seed=9)
    objects = [r["objects"] for r in good]
    # a: no seed column; b: explicit seeds; c: integer ids, 7 twice; d: no rows; e: a damaged row group; f: no objects
    pq.write_table(pa.table({"id": ["a0", "a1"], "objects": pa.array(objects[:2], GRAPH_SCHEMA.field("objects").type)}),
                   folder / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{**good[2], "id": "b0", "seed": 11}, {**good[3], "id": "b1", "seed": 12}],
                                        schema=GRAPH_SCHEMA), folder / "b.parquet")
    pq.write_table(pa.Table.from_pylist([{**good[4 + k], "id": i} for k, i in enumerate([7, 7, 10, 11])]),
                   folder / "c.parquet")
    pq.write_table(GRAPH_SCHEMA.empty_table(), folder / "d.parquet")
    pq.write_table(pa.Table.from_pylist([{**good[k % 10], "id": f"e{k}"} for k in range(8)], schema=GRAPH_SCHEMA),
                   folder / "e.parquet", row_group_size=4)
    corrupt_row_group(folder / "e.parquet", 1)
    pq.write_table(pa.table({"id": ["f0"], "caption": ["no graph here"]}), folder / "f.parquet")

    summary, code = run(config(tiny_model_dir, str(folder), str(tmp_path / "out"), "m", max_error_fraction=1.0))
    run_dir = tmp_path / "out" / "m"

    assert code == 0
    assert (summary["rows_in"], summary["images"], summary["errors"], summary["rows_lost"]) == (17, 10, 7, 0)
    assert summary["errors_by_reason"] == {"unreadable_file": 4, "duplicate_id": 2, "no_objects": 1}
    meta = {(r["id"], r["sample_index"]): r for r in table(run_dir, "metadata").to_pylist()}
    assert sorted(i for i, _ in meta) == ["10", "11", "a0", "a1", "b0", "b1", "e0", "e1", "e2", "e3"]
    assert (meta[("b0", 0)]["seed"], meta[("b1", 0)]["seed"]) == (11, 12)  # the second file's own seeds
    assert meta[("a0", 0)]["seed"] not in (11, 12)
    errors = table(run_dir, "errors").to_pylist()
    damaged = [e for e in errors if e["code"] == "unreadable_file"]
    assert len(damaged) == 4 and all(str(folder / "e.parquet") in e["reason"] and "rows 4-7" in e["reason"]
                                     for e in damaged)
    assert sorted(e["id"] for e in errors if e["code"] == "duplicate_id") == ["7", "7"]
    assert [e["id"] for e in errors if e["code"] == "no_objects"] == ["f0"]
    assert len(pngs(run_dir)) == 10

    by_input = {Path(s["input"]).name: s for s in stats(run_dir).values()}
    assert sorted(by_input) == ["a.parquet", "b.parquet", "c.parquet", "d.parquet", "e.parquet", "f.parquet"]
    assert (by_input["d.parquet"]["count"], by_input["d.parquet"]["images"]) == (0, 0)
    assert by_input["e.parquet"]["status_dict"] == {"success": 4, "unreadable_file": 4}
    assert by_input["c.parquet"]["status_dict"] == {"duplicate_id": 2, "success": 2}
    assert sum(s["count"] for s in by_input.values()) == 17


# ----------------------------------------------------------------------------- one run at a time, killed driver


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def test_a_run_in_use_is_refused_and_a_killed_driver_is_resumed(local_ray, tiny_model_dir, tmp_path, capsys):
    import ray

    write_shards(tmp_path / "in", shapes_rows(24, seed=10), per_shard=3)  # 8 shards
    out, run_dir = tmp_path / "out", tmp_path / "out" / "k"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--run-id", "k", "--model", tiny_model_dir,
            "--segmenter", "none", "--steps", "10", "--batch-size", "1", "--no-report"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    driver_log = tmp_path / "driver.log"
    with driver_log.open("wb") as sink:
        child = subprocess.Popen([sys.executable, "-m", "jobs.generate", *args], env=env, cwd=ROOT, stdout=sink,
                                 stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(stats(run_dir)) >= 1 or child.poll() is not None, 900, "the first committed shard")
        assert child.poll() is None, driver_log.read_text()[-3000:]
        with pytest.raises(RunLockedError, match=f"in use by pid {child.pid} on host"):
            run(config(tiny_model_dir, str(tmp_path / "in"), str(out), "k", steps=10, batch_size=1, resume=True))
        assert main(args + ["--resume"]) == 2
        assert f"in use by pid {child.pid}" in capsys.readouterr().err
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
    committed = stats(run_dir)
    assert 1 <= len(committed) < 8, "the driver was killed before the run ended"
    kept = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
            and any(name in str(p) for name in committed)}

    summary, code = run(config(tiny_model_dir, str(tmp_path / "in"), str(out), "k", steps=10, batch_size=1,
                               resume=True))  # takes over the dead driver's lease

    assert code == 0 and (summary["rows_in"], summary["images"], summary["rows_lost"]) == (24, 24, 0)
    assert summary["shards_skipped"] == len(committed) and len(stats(run_dir)) == 8
    assert all(p.read_bytes() == data for p, data in kept.items())  # committed shards untouched
    meta = table(run_dir, "metadata")
    assert Counter(meta["id"].to_pylist()).most_common(1)[0][1] == 1  # no row twice
    assert not (run_dir / "_lease.json").exists()
    run(config(tiny_model_dir, str(tmp_path / "in"), str(out), "ref", steps=10, batch_size=1))
    assert pngs(run_dir) == pngs(out / "ref")


# ----------------------------------------------------------------------------- S3 faults, credentials in URLs


def test_s3_run_through_a_faulty_endpoint_loses_nothing(local_ray, tiny_model_dir, s3_bucket, tmp_path):
    storage = s3_bucket.storage()
    for path in write_shards(tmp_path / "in", shapes_rows(8, seed=11), per_shard=4):
        storage.write_bytes(s3_bucket.uri(f"in/{path.name}"), path.read_bytes())
    rates = FaultRates(slow_down=0.2, reset=0.02, truncate=0.05, seed=3)
    with FaultProxy(s3_bucket.endpoint_url, rates=rates) as proxy:
        summary, code = run(config(tiny_model_dir, s3_bucket.uri("in/"), s3_bucket.uri("runs"), "flaky",
                                   s3_endpoint_url=proxy.endpoint_url))
    assert code == 0 and (summary["images"], summary["errors"], summary["rows_lost"]) == (8, 0, 0)
    assert sum(proxy.injected.values()) >= 5 and proxy.injected["slow_down"] > 0
    keys = [u.split("/runs/flaky/", 1)[1] for u in storage.list(s3_bucket.uri("runs/flaky"))]
    assert len([k for k in keys if k.endswith(".png")]) == 8
    assert len([k for k in keys if k.endswith("_stats.json")]) == 2 and "_lease.json" not in keys


def test_credentials_in_urls_are_never_written_or_logged(local_ray, tiny_model_dir, tmp_path, sgbatch_log):
    write_shards(tmp_path / "in", shapes_rows(2, seed=12), per_shard=2)
    cfg = config(tiny_model_dir, str(tmp_path / "in"), str(tmp_path / "out"), "c", report=True, log_every=0.5,
                 s3_endpoint_url="http://AKIAEXAMPLE:wJalr-s3cret@127.0.0.1:9")  # never contacted: all local
    summary, code = run(cfg)
    assert code == 0
    run_dir = tmp_path / "out" / "c"
    written = {p.name: p.read_text(errors="replace") for p in run_dir.rglob("*") if p.suffix in (".json", ".html")}
    assert {"run.json", "summary.json", "report.html"} <= set(written)
    for name, text in [*written.items(), ("log", sgbatch_log.read_text())]:
        assert "s3cret" not in text and "AKIAEXAMPLE" not in text, name
    assert json.loads(written["run.json"])["config"]["s3_endpoint_url"] == "http://***@127.0.0.1:9"


def test_the_real_build_streams_each_generator_batch_to_the_sink(local_ray, tiny_model_dir, tmp_path):
    # 2 shards of 5 rows, batch size 2: the sink writes generator batches as they come, so each shard has
    # several files, not one at the end (Ray Data may hand a busy sink two queued batches at once).
    write_shards(tmp_path / "in", shapes_rows(10, seed=13), per_shard=5)
    summary, code = run(config(tiny_model_dir, str(tmp_path / "in"), str(tmp_path / "out"), "b", batch_size=2),
                        build=build_dataset)
    assert code == 0 and summary["images"] == 10
    files = sorted((tmp_path / "out" / "b" / "metadata").glob("*.parquet"))
    calls = [set(pq.read_table(f, columns=["generated_at"]).column(0).to_pylist()) for f in files]
    assert len(files) >= 4 and all(len(c) <= 2 for c in calls)
