"""The shared Ray Data stages: how rows reach the generator actor pool."""

from __future__ import annotations

import os
import time
from collections import Counter
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.stages import generator_stage

pytestmark = pytest.mark.usefixtures("local_ray")


class RecordingActor:
    """Stands in for the model: tags each row with the process that handled it."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        time.sleep(0.2)
        return batch.append_column("pid", pa.array([os.getpid()] * len(batch), pa.int64()))


@pytest.fixture
def actors_ready_first():
    """Dispatch only once the whole pool is up, so the split does not depend on actor start-up order."""
    import ray

    ctx = ray.data.DataContext.get_current()
    before, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 60
    yield
    ctx.wait_for_min_actors_s = before


def test_every_actor_of_the_pool_gets_rows_from_small_files(tmp_path, actors_ready_first):
    import ray

    # Small files are read as a single block; the stage must still spread it over both actors.
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"part{i}.parquet"))
        pq.write_table(pa.table({"id": [f"r{i}-{k}" for k in range(24)]}), paths[-1])
    cfg = SimpleNamespace(worker_range=(2, 2), batch_size=4, cpus_per_worker=0.25)
    ds = generator_stage(ray.data.read_parquet(paths), cfg, RecordingActor, (), gpus=0)
    rows = ds.take_all()

    assert sorted(r["id"] for r in rows) == sorted(f"r{i}-{k}" for i in range(2) for k in range(24))
    per_actor = Counter(r["pid"] for r in rows)
    assert len(per_actor) == 2, per_actor
    assert min(per_actor.values()) >= 8, per_actor


class ThreadRecordingActor:
    """Tags each row with whether ``__call__`` ran on the thread that built the actor (its main thread)."""

    def __init__(self) -> None:
        import threading

        self.init_thread = threading.get_ident()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import threading

        same = threading.get_ident() == self.init_thread and threading.current_thread() is threading.main_thread()
        return batch.append_column("on_main_thread", pa.array([same] * len(batch)))


def test_model_actors_run_batches_on_their_main_thread(tmp_path):
    import ray

    # Torch's OpenMP kernels lose a third of their CPU when called from Ray Data's helper thread.
    path = str(tmp_path / "part.parquet")
    pq.write_table(pa.table({"id": [f"r{k}" for k in range(8)]}), path)
    cfg = SimpleNamespace(worker_range=(1, 1), batch_size=4, cpus_per_worker=0.25)
    rows = generator_stage(ray.data.read_parquet(path), cfg, ThreadRecordingActor, (), gpus=0).take_all()

    assert len(rows) == 8
    assert all(r["on_main_thread"] for r in rows)
