"""What does the generate job lose under faults? A few hundred rows under kills, a node loss and a flaky S3.

    python benchmarks/faults.py                                   # every scenario, ~30 min on 2 busy cores
    python benchmarks/faults.py --rows 48 --rows-per-shard 8 --steps 2 --scenarios baseline,generator-kill

Same input, model, segmenter and seeds in every scenario (the shapes demo model and segmenter,
shapes graphs in Parquet shards of ``--rows-per-shard`` rows, scoring on). Faults strike when the
first input shard has been committed (its ``stats/{shard}_stats.json`` exists), so every scenario
is hit mid-run:

* ``baseline``: undisturbed, local output.
* ``generator-kill`` / ``scorer-kill``: SIGKILL of the generator (scorer) actor's process; Ray
  restarts the actor and Ray Data retries its batch.
* ``driver-kill``: the job runs in a driver process of its own (``python -m jobs.generate`` joined to
  this Ray), SIGKILLed; then ``--resume`` in this process takes over its lease and finishes the run.
* ``node-loss``: a two-node Ray built with ``ray.cluster_utils.Cluster`` (head: 1 CPU; worker: 3 CPUs
  and the only place the generator actor, reserving 1.5 CPUs, fits). The worker node is removed
  (its processes killed) and a fresh 3-CPU node joins 10 s later, as an autoscaler would replace it.
* ``s3-baseline``: input and output on S3 (moto's server on 127.0.0.1), no faults.
* ``s3-faults``: the same through a fault proxy on 127.0.0.1 (``tests/faultproxy.py``): 20% of
  requests answered 503 SlowDown, 2% connections reset (half before, half after the request was
  applied), 1% of GET bodies cut in half.

Every Ray node runs on 127.0.0.1 in a private temp folder (no other ``ray.init()`` on the machine
can find or join it); moto and the proxy listen on 127.0.0.1; a watchdog ends everything this
script started if a scenario runs longer than ``--timeout``.

Columns, counted from the run's files (not from its summary): rows in; rows out (distinct ids
with an image in metadata/); rows in errors (errors/); lost = in - out - errors; duplicated =
metadata or error rows beyond one per (id, sample); reused shards (committed before the fault and
skipped by --resume); PNGs missing or differing from the baseline's bytes; wall time, and extra wall
time over the baseline (s3-faults over s3-baseline). Target: 0 lost and 0 duplicated in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Before Ray is imported: nodes on 127.0.0.1 (Ray otherwise swaps loopback for the machine's routable
# address), and a private temp folder (Cluster records its address there for bare ray.init() calls).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
TMP = Path(tempfile.mkdtemp(prefix="sgbf-", dir="/tmp"))
os.environ["RAY_TMPDIR"] = str(TMP)
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
os.environ.update(FAKE_AWS)
for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"):
    os.environ.pop(var, None)

import psutil  # noqa: E402

SCENARIOS = ("baseline", "generator-kill", "scorer-kill", "driver-kill", "s3-baseline", "s3-faults", "node-loss")
LOOPBACK = "127.0.0.1"


@dataclass
class Outcome:
    scenario: str
    rows_in: int = 0
    rows_out: int = 0
    errors: int = 0
    lost: int = 0
    duplicated: int = 0
    reused: int = 0
    png_diff: int | None = None
    wall: float = 0.0
    extra: float | None = None
    status: str = ""
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- inputs and counting


def write_inputs(folder: Path, rows: int, per_shard: int, seed: int) -> list[Path]:
    from dataclasses import replace as dc_replace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sgmodel.graph import GRAPH_SCHEMA, graph_to_row
    from sgmodel.shapes.world import iter_shapes_records

    records = [graph_to_row(dc_replace(g, image=None)) for g, _ in iter_shapes_records(rows, seed)]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, rows, per_shard):
        paths.append(folder / f"part-{i // per_shard:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(records[i : i + per_shard], schema=GRAPH_SCHEMA), paths[-1])
    return paths


def count(storage, run_uri: str, rows_in: int, outcome: Outcome) -> dict[str, bytes]:
    """Fill the row counts of ``outcome`` from the run's files; return its PNGs by (id, sample)."""
    from jobs.summary import read_table
    from workers.schema import ERRORS_SCHEMA, METADATA_SCHEMA

    meta = read_table(storage, f"{run_uri}/metadata", METADATA_SCHEMA, ["id", "sample_index", "image_key"])
    errors = read_table(storage, f"{run_uri}/errors", ERRORS_SCHEMA, ["id"])
    pairs = list(zip(meta.column("id").to_pylist(), meta.column("sample_index").to_pylist()))
    error_ids = errors.column("id").to_pylist()
    outcome.rows_in = rows_in
    outcome.rows_out = len({i for i, _ in pairs})
    outcome.errors = len(error_ids)
    outcome.lost = rows_in - outcome.rows_out - outcome.errors
    outcome.duplicated = (len(pairs) - len(set(pairs))) + (len(error_ids) - len(set(error_ids)))
    # Keyed by row, not by file name: shard folder names derive from the input's URI, which differs
    # between the local and the S3 scenarios.
    keys = meta.column("image_key").to_pylist()
    return {f"{i}/{s}": storage.read_bytes(f"{run_uri}/{key}") for (i, s), key in zip(pairs, keys)}


# ----------------------------------------------------------------------------- fault triggers


def first_commit(storage, run_uri: str, deadline: float) -> bool:
    """Wait until a shard of the run is committed (or the deadline passes)."""
    while time.monotonic() < deadline:
        if any(u.endswith("_stats.json") for u in storage.list(f"{run_uri}/stats")):
            return True
        time.sleep(0.2)
    return False


def strike_after_first_commit(storage, run_uri: str, action, outcome: Outcome, timeout: float) -> threading.Thread:
    """Run ``action()`` once the run has committed its first shard; notes what was done and when."""
    started = time.monotonic()

    def watch() -> None:
        if not first_commit(storage, run_uri, started + timeout):
            outcome.notes.append("no shard was committed in time: no fault injected")
            return
        note = action()
        outcome.notes.append(f"{note} at {time.monotonic() - started:.0f} s")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def kill_actor(stage: str) -> str:
    """SIGKILL the process of this script's Ray actor for a map stage (its title holds the class name)."""
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if f"MapBatches({stage})" in title:
            proc.send_signal(signal.SIGKILL)
            return f"killed the {stage} actor (pid {proc.pid})"
    return f"found no {stage} actor to kill"


def watchdog(seconds: float, what: str) -> threading.Event:
    """End this script and everything it started when ``what`` runs longer than ``seconds``."""
    done = threading.Event()

    def guard() -> None:
        if done.wait(seconds):
            return
        print(f"\n{what} ran longer than {seconds:.0f} s: stopping everything this benchmark started", flush=True)
        for proc in psutil.Process().children(recursive=True):
            try:
                proc.kill()
            except psutil.Error:
                pass
        os._exit(3)

    threading.Thread(target=guard, daemon=True).start()
    return done


# ----------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Bench:
    args: argparse.Namespace
    input_dir: Path
    out_dir: Path

    def config(self, run_id: str, **kw):
        from jobs.defaults import DEMO_MODEL, DEMO_SEGMENTER
        from jobs.generate import GenerateConfig

        a = self.args
        values = {"input": str(self.input_dir), "output": str(self.out_dir), "run_id": run_id,
                  "model": a.model or DEMO_MODEL, "segmenter": a.segmenter or DEMO_SEGMENTER, "steps": a.steps,
                  "batch_size": a.batch_size, "report": False, "log_every": 30.0, "seed": a.seed} | kw
        return GenerateConfig(**values)


def run_job(cfg, outcome: Outcome, storage, rows_in: int, timeout: float) -> dict[str, bytes]:
    from jobs.generate import run

    guard = watchdog(timeout, f"scenario {outcome.scenario}")
    start = time.perf_counter()
    try:
        summary, code = run(cfg)
        outcome.status = summary["status"] if code == 0 else f"exit {code}"
    except Exception as err:  # noqa: BLE001 - a failed scenario is a row of the table, not the end of the benchmark
        outcome.status = f"failed: {type(err).__name__}: {str(err)[:120]}"
    finally:
        guard.set()
    outcome.wall += time.perf_counter() - start
    return count(storage, f"{cfg.output}/{cfg.run_id}", rows_in, outcome)


def scenario_local(bench: Bench, name: str, rows_in: int) -> tuple[Outcome, dict]:
    from workers.storage import Storage

    outcome, storage = Outcome(name), Storage()
    cfg = bench.config(name)
    if name in ("generator-kill", "scorer-kill"):
        stage = "Generator" if name == "generator-kill" else "Scorer"
        strike_after_first_commit(storage, f"{cfg.output}/{cfg.run_id}", lambda: kill_actor(stage), outcome,
                                  bench.args.timeout)
    return outcome, run_job(cfg, outcome, storage, rows_in, bench.args.timeout)


def scenario_driver_kill(bench: Bench, rows_in: int) -> tuple[Outcome, dict]:
    import ray

    from workers.storage import Storage

    outcome, storage = Outcome("driver-kill"), Storage()
    cfg = bench.config("driver-kill")
    run_uri = f"{cfg.output}/{cfg.run_id}"
    cmd = [sys.executable, "-m", "jobs.generate", "--input", cfg.input, "--output", cfg.output, "--run-id",
           cfg.run_id, "--model", cfg.model, "--segmenter", cfg.segmenter, "--steps", str(cfg.steps),
           "--batch-size", str(cfg.batch_size), "--seed", str(cfg.seed), "--no-report"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if first_commit(storage, run_uri, time.monotonic() + bench.args.timeout):
            child.send_signal(signal.SIGKILL)
            outcome.notes.append(f"killed the driver (pid {child.pid}) at {time.perf_counter() - start:.0f} s")
        else:
            outcome.notes.append("no shard was committed in time: the driver was not killed")
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=60)
    outcome.wall = time.perf_counter() - start
    pngs = run_job(replace(cfg, resume=True), outcome, storage, rows_in, bench.args.timeout)
    summary = json.loads(storage.read_text(f"{run_uri}/summary.json"))
    outcome.reused = summary["shards_skipped"]
    return outcome, pngs


BUCKET = "sgb-faults"


def start_s3(bench: Bench):
    """moto's S3 server on 127.0.0.1 with the input uploaded; returns (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    from workers.storage import Storage, StorageSettings

    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    direct = Storage(StorageSettings(endpoint_url=endpoint))
    direct.s3.create_bucket(Bucket=BUCKET)
    for path in sorted(bench.input_dir.glob("*.parquet")):
        direct.write_bytes(f"s3://{BUCKET}/in/{path.name}", path.read_bytes())
    return server, endpoint


def scenario_s3(bench: Bench, name: str, rows_in: int, endpoint: str) -> tuple[Outcome, dict]:
    from tests.faultproxy import FaultProxy, FaultRates
    from workers.storage import Storage, StorageSettings

    direct = Storage(StorageSettings(endpoint_url=endpoint))
    outcome = Outcome(name)
    cfg = bench.config(name, input=f"s3://{BUCKET}/in/", output=f"s3://{BUCKET}/runs")
    if name == "s3-baseline":
        return outcome, run_job(replace(cfg, s3_endpoint_url=endpoint), outcome, direct, rows_in, bench.args.timeout)
    rates = FaultRates(slow_down=0.20, reset=0.02, truncate=0.01, seed=bench.args.seed)
    with FaultProxy(endpoint, rates=rates) as proxy:
        pngs = run_job(replace(cfg, s3_endpoint_url=proxy.endpoint_url), outcome, direct, rows_in,
                       bench.args.timeout)
    injected = ", ".join(f"{k} x{v}" for k, v in sorted(proxy.injected.items()))
    outcome.notes.append(f"{proxy.requests} S3 requests, faults injected: {injected}")
    return outcome, pngs


def scenario_node_loss(bench: Bench, rows_in: int) -> tuple[Outcome, dict]:
    import ray
    from ray.cluster_utils import Cluster

    from workers.storage import Storage

    node = {"node_ip_address": LOOPBACK, "include_dashboard": False}
    # shutdown_at_exit=False: the replacement node is added from the fault thread, where Ray may not
    # install its SIGTERM hook; the finally below shuts every node down instead.
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 1}, shutdown_at_exit=False)
    # 3 logical CPUs: the generator (1.5) and the job's 1-CPU read tasks both fit beside each other;
    # with 2, a read task fits on neither node and the run stalls.
    worker = cluster.add_node(**node, num_cpus=3)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        outcome, storage = Outcome("node-loss"), Storage()
        cfg = bench.config("node-loss", cpus_per_worker=1.5)

        def lose_node() -> str:
            cluster.remove_node(worker)
            time.sleep(10)
            cluster.add_node(**node, num_cpus=3)
            return "removed the worker node holding the generator, a new node joined 10 s later"

        strike_after_first_commit(storage, f"{cfg.output}/{cfg.run_id}", lose_node, outcome, bench.args.timeout)
        pngs = run_job(cfg, outcome, storage, rows_in, bench.args.timeout)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return outcome, pngs


# ----------------------------------------------------------------------------- main


def print_table(rows: list[Outcome]) -> None:
    head = (f"{'scenario':<15} {'rows in':>7} {'rows out':>8} {'errors':>6} {'lost':>5} {'duplicated':>10} "
            f"{'reused shards':>13} {'PNGs differing':>14} {'wall s':>7} {'extra s':>7}  status")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        diff = "-" if r.png_diff is None else str(r.png_diff)
        extra = "-" if r.extra is None else f"{r.extra:+.0f}"
        print(f"{r.scenario:<15} {r.rows_in:>7} {r.rows_out:>8} {r.errors:>6} {r.lost:>5} {r.duplicated:>10} "
              f"{r.reused:>13} {diff:>14} {r.wall:>7.0f} {extra:>7}  {r.status}")
    for r in rows:
        for note in r.notes:
            print(f"  {r.scenario}: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--rows-per-shard", type=int, default=20)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="default: the shapes demo model")
    parser.add_argument("--segmenter", default=None, help="default: the shapes segmenter")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one scenario may take at most")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")

    import logging

    import ray

    from jobs.common import configure_logging

    configure_logging()
    logging.getLogger("sgbatch").setLevel(logging.WARNING)  # the table is the output; progress lines are noise here
    bench = Bench(args, TMP / "in", TMP / "out")
    write_inputs(bench.input_dir, args.rows, args.rows_per_shard, args.seed)
    rows_in = args.rows
    results: dict[str, tuple[Outcome, dict]] = {}
    moto = None
    try:
        local = [s for s in chosen if s != "node-loss"]
        if local:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address=LOOPBACK)
            ray.data.DataContext.get_current().enable_progress_bars = False
        for name in local:
            print(f"running {name} ...", flush=True)
            if name == "driver-kill":
                results[name] = scenario_driver_kill(bench, rows_in)
            elif name.startswith("s3"):
                if moto is None:
                    moto, endpoint = start_s3(bench)
                results[name] = scenario_s3(bench, name, rows_in, endpoint)
            else:
                results[name] = scenario_local(bench, name, rows_in)
        if local:
            ray.shutdown()
        if "node-loss" in chosen:
            print("running node-loss ...", flush=True)
            results["node-loss"] = scenario_node_loss(bench, rows_in)
    finally:
        if moto is not None:
            moto.stop()

    base = results.get("baseline")
    rows = []
    for name in chosen:
        outcome, pngs = results[name]
        if base is not None:
            theirs = base[1]
            outcome.png_diff = sum(1 for k, v in theirs.items() if pngs.get(k) != v) + len(set(pngs) - set(theirs))
        ref = results.get("s3-baseline" if name == "s3-faults" else "baseline")
        if ref is not None and name not in ("baseline", "s3-baseline"):
            outcome.extra = outcome.wall - ref[0].wall
        rows.append(outcome)
    print(f"\n{rows_in} rows in {args.rows // args.rows_per_shard} shards, {args.steps} steps, batch size "
          f"{args.batch_size}, scoring on; faults strike once the first shard is committed")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    shutil.rmtree(TMP, ignore_errors=True)
    return 0 if all(r.lost == 0 and r.duplicated == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
