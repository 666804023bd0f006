"""What does the job cost on top of the model? The generate job on local Ray vs a bare pipeline loop, and its memory.

    python benchmarks/overhead.py                      # ~15 min on 2 cores
    python benchmarks/overhead.py --rows 48 --steps 2 --rows-per-shard 16 --memory-rows 32 --memory-factor 2  # plumbing
    python benchmarks/overhead.py --skip-memory        # or --skip-throughput
    python benchmarks/overhead.py --skip-memory --workers 2 --threads-per-worker 1 --cpus-per-worker 0.3  # CPU layout

Inputs are shapes graphs written by the project's own ``prepare shapes`` (Parquet shards of
``--rows-per-shard`` rows, a multiple of the batch size, so that job and bare loop see the same
batches). Model: the shapes demo model; segmenter: the shapes segmenter. Same rows, batch size,
steps, guidance, seeds (``sample_seed``) and image size (the model's) everywhere.

Throughput, steady state (model load, Ray and actor start-up excluded):

* bare loop: ``load_pipeline`` once in this process (after ``set_threads(None)`` and
  ``keep_freed_memory()``, as the generator actor does on the CPU), then
  ``pipe(graphs, num_inference_steps=S, seeds=…, output_type="np")`` batch by batch, each image
  PNG-encoded with the generator's own ``encode_png`` (PNG encoding is in both the loop and the
  job, whose generator encodes; the bare loop writes nothing). Steady images/s = images
  after the first batch / seconds from the end of the first batch to the end of the last. The
  pipe-only rate (no PNG) is printed too. The loop runs twice, before and after the job runs, and
  the ratios use the mean of the two: on this machine the same loop drifts by up to 30% from one
  minute to the next, and a single measurement before the jobs made the ratio swing with it.
* job: ``jobs.generate.run(GenerateConfig(...))`` in this process on a local ``ray.init(num_cpus=N)``
  started once beforehand (plus one discarded warm-up run), ``--workers 1`` (or ``--workers``,
  ``--threads-per-worker``, ``--cpus-per-worker`` as given), ``report=False``, PNG
  output to a temporary folder: Parquet read, validation, the generator actor, the scorer actor when
  scoring is on, the sink, markers, summary.json. Once with ``--segmenter none`` (scoring off), once
  with the shapes segmenter. Steady images/s is defined as for the bare loop, on the job's own
  output: every metadata row carries ``generated_at``, when its batch left the generator, so the
  rate is images after the first batch / seconds from the end of the first batch to the end of the
  last (with N actors, after the first N batches). Everything else the job runs meanwhile (reads,
  validation, the scorer, Ray Data's driver loop, Ray's daemons) competes for the same cores, so it
  is in that rate; what is not is before the first batch (start-up, model load) and after the last
  (the final sink call, summary.json), the per-run costs the bare loop's rate leaves out too.
  Printed next to it: the marginal rate (large - small) images / (wall of the large run - mean wall
  of a small run before and after it), which counts the whole run but, at these sizes, also the
  last sink call of the large run and the run-to-run spread of the ~15-20 s fixed cost; and the
  job's own ``images_per_second`` (summary.json; its clock starts before the actors, so it includes
  start-up and model load).

Target: job/bare >= 0.85 with scoring off.

With more than one generator actor or a thread count, the same layout is also run without Ray
(that many bare loops in spawned processes side by side, each on every Nth graph; rates summed),
so the job's own overhead stays visible when its layout differs from the single in-process loop.

A background thread samples every process under this one (psutil) during each job run; the extra
CPU seconds of the large run over the small ones, per extra second, are printed per role
(generator, scorer, sink, other Ray workers, Ray daemons, driver): whether the generator actor gets
both cores and what competes with it. The generator's torch thread count is read by a Ray task with
the generator's CPU reservation that calls the same ``set_threads`` the actor calls.

Memory: the same job (scoring on, 1 step by default) on R and on 10R rows (same rows per shard, so
10x the shards), each in a fresh child process (this script with ``--child-run``) that does
``ray.init`` + ``run(GenerateConfig(...))`` in-process. Driver: the child's own peak RSS (VmHWM; not
``ru_maxrss``, which inherits the parent's pre-exec peak). Workers: every ``ray::`` process under the
child, sampled every ``--sample-interval`` s (psutil RSS, shared pages counted in each process): the
peak of their sum at one instant and the largest single-process peak. Ray's daemons (raylet, GCS,
agents) are printed for information. Target: 10R/R <= 1.25 for each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.defaults import DEMO_MODEL, DEMO_SEGMENTER, resolve  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT_TARGET = 0.85
MEMORY_TARGET = 1.25


# ----------------------------------------------------------------------------- inputs


def make_table(folder: Path, rows: int, seed: int, per_shard: int) -> None:
    from jobs.prepare import main as prepare

    code = prepare(["shapes", "--count", str(rows), "--seed", str(seed), "--size", "32", "--output", str(folder),
                    "--rows-per-shard", str(per_shard)])
    if code != 0:
        raise SystemExit(f"prepare shapes failed with exit code {code}")


def read_graphs(folder: Path):
    """The input's graphs in file order, parsed exactly as the job's validation stage parses them."""
    import pyarrow.parquet as pq

    from sgmodel.graph import parse_graph
    from workers.validate import GRAPH_COLUMNS, graph_from_json, graph_to_json

    graphs = []
    for path in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(path)
        table = table.select([c for c in GRAPH_COLUMNS if c in table.column_names])
        graphs += [graph_from_json(graph_to_json(parse_graph(row))) for row in table.to_pylist()]
    return graphs


# ----------------------------------------------------------------------------- process sampling


def classify(cmdline: list[str]) -> str:
    """generator / scorer / sink / worker (other ray:: processes) / system (raylet, GCS, agents)."""
    text = " ".join(cmdline)
    if text.startswith("ray::") or "default_worker.py" in text:
        for role in ("Generator", "Scorer", "Sink"):
            if role in text:
                return role.lower()
        return "worker"
    return "system"


@dataclass
class ProcessTrace:
    role: str
    peak_rss: int = 0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (wall time, cpu seconds)


class Sampler(threading.Thread):
    """Samples RSS and CPU time of a process tree: the root (the driver) and each descendant, by role."""

    def __init__(self, root_pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(root_pid)
        self.interval = interval
        self.stop_event = threading.Event()
        self.procs: dict[int, ProcessTrace] = {}
        self.root_trace = ProcessTrace("driver")
        self.peak_sum: dict[str, int] = {"workers": 0, "system": 0}
        self.initial: set[int] | None = None

    @staticmethod
    def busy_seconds() -> float:
        import psutil

        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def run(self) -> None:
        self.started = (time.time(), self.busy_seconds())
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)
        self.sample()

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.stopped = (time.time(), self.busy_seconds())

    def foreign_cores(self) -> float:
        """Cores the rest of the machine (outside the sampled tree) kept busy meanwhile: other users' load."""
        wall = self.stopped[0] - self.started[0]
        return (self.stopped[1] - self.started[1] - sum(self.cpu_seconds().values())) / wall

    def _read(self, proc) -> tuple[int, float, list[str]] | None:
        import psutil

        try:
            with proc.oneshot():
                cpu = proc.cpu_times()
                return proc.memory_info().rss, cpu.user + cpu.system, proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None

    def sample(self) -> None:
        import psutil

        now = time.time()
        root = self._read(self.root)
        if root is not None:
            self.root_trace.peak_rss = max(self.root_trace.peak_rss, root[0])
            self.root_trace.samples.append((now, root[1]))
        try:
            children = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        sums = {"workers": 0, "system": 0}
        if self.initial is None:
            self.initial = {p.pid for p in children}
        for proc in children:
            got = self._read(proc)
            if got is None:
                continue
            rss, cpu, cmdline = got
            role = classify(cmdline)
            trace = self.procs.setdefault(proc.pid, ProcessTrace(role))
            if role not in ("worker", "system"):  # an idle worker may become an actor later: keep the specific role
                trace.role = role
            trace.peak_rss = max(trace.peak_rss, rss)
            trace.samples.append((now, cpu))
            sums["system" if role == "system" else "workers"] += rss
        for key, value in sums.items():
            self.peak_sum[key] = max(self.peak_sum[key], value)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds each role (and the driver) used while sampled; processes born meanwhile count from 0."""

        def used(trace: ProcessTrace, born: bool) -> float:
            if not trace.samples:
                return 0.0
            return trace.samples[-1][1] - (0.0 if born else trace.samples[0][1])

        out: dict[str, float] = {"driver": used(self.root_trace, False)}
        for pid, trace in self.procs.items():
            key = trace.role if trace.role in ("generator", "scorer", "sink", "system") else "other workers"
            out[key] = out.get(key, 0.0) + used(trace, pid not in self.initial)
        return out

    def peak(self, role: str) -> int:
        return max((t.peak_rss for t in self.procs.values() if t.role == role), default=0)

    def largest_worker(self) -> tuple[int, str]:
        workers = [t for t in self.procs.values() if t.role != "system"]
        best = max(workers, key=lambda t: t.peak_rss, default=None)
        return (best.peak_rss, best.role) if best else (0, "-")


# ----------------------------------------------------------------------------- throughput


@dataclass
class Measured:
    rate: float
    """Steady-state images/s."""
    fixed: float
    """Seconds not explained by the steady rate (model load, start-up, first batch, end of the run)."""
    wall: float
    """Wall seconds of the large run."""
    extra: dict = field(default_factory=dict)


def steady_rate(batches: list[tuple[float, int]], warm_up: int = 1) -> float:
    """Images per second after the first ``warm_up`` batches: (end time, images) of each batch, any order.

    The same definition for the bare loop and the job: images of the later batches / seconds from the
    end of the last warm-up batch to the end of the last batch.
    """
    batches = sorted(batches)
    if len(batches) <= warm_up:
        raise SystemExit(f"{len(batches)} batches: need more than {warm_up} for a steady rate; give more --rows")
    return sum(n for _, n in batches[warm_up:]) / (batches[-1][0] - batches[warm_up - 1][0])


def output_batches(run_dir: Path) -> list[tuple[float, int]]:
    """(end time, images) of each generator batch of a finished run, from its metadata's ``generated_at``."""
    import collections

    import pyarrow.parquet as pq

    done = pq.read_table(run_dir / "metadata", columns=["generated_at"]).column("generated_at").to_pylist()
    return [(t.timestamp(), n) for t, n in collections.Counter(done).items()]


def bare_loop(model: str, graphs, batch_size: int, steps: int, guidance: float, threads: int | None = None) -> Measured:
    import torch

    from workers.generator import encode_png, sample_seed
    from workers.runtime import keep_freed_memory, load_pipeline, set_threads

    sampler = Sampler(os.getpid(), interval=0.5)
    sampler.start()
    started = time.perf_counter()
    threads = set_threads(threads)  # what the generator actor does with its --threads-per-worker
    keep_freed_memory()  # and on the CPU
    pipe = load_pipeline(model, torch.device("cpu"), torch.float32)
    loaded = time.perf_counter()
    ends, pipe_seconds, png_seconds, sizes = [], [], [], []
    for i in range(0, len(graphs), batch_size):
        batch = graphs[i : i + batch_size]
        t0 = time.perf_counter()
        images = pipe(batch, num_inference_steps=steps, guidance_scale=guidance,
                      seeds=[sample_seed(g, 0, 0) for g in batch], output_type="np").images
        t1 = time.perf_counter()
        for img in images:
            encode_png((img * 255).round().clip(0, 255).astype("uint8"))
        ends.append(time.perf_counter())
        pipe_seconds.append(t1 - t0)
        png_seconds.append(ends[-1] - t1)
        sizes.append(len(batch))
    sampler.stop()
    steady = sum(sizes[1:])  # the first batch is warm-up, as the job's first batch is
    rate = steady_rate(list(zip(ends, sizes)))
    wall = ends[-1] - started
    del pipe
    return Measured(rate=rate, fixed=wall - sum(sizes) / rate, wall=wall, extra={
        "threads": threads, "load_seconds": loaded - started, "images": sum(sizes),
        "pipe_only_rate": steady / sum(pipe_seconds[1:]),
        "png_share": sum(png_seconds[1:]) / (sum(pipe_seconds[1:]) + sum(png_seconds[1:])),
        "pipe_seconds_per_image": sum(pipe_seconds[1:]) / steady, "foreign": sampler.foreign_cores(),
    })


def mean_of(before: Measured, after: Measured) -> Measured:
    """The bare loop measured before and after the jobs, averaged (rates and seconds alike)."""
    extra = {**before.extra, **{k: statistics.fmean((before.extra[k], after.extra[k]))
                                for k in ("load_seconds", "pipe_only_rate", "png_share", "pipe_seconds_per_image",
                                          "foreign")}}
    return Measured(rate=statistics.fmean((before.rate, after.rate)), fixed=statistics.fmean((before.fixed, after.fixed)),
                    wall=statistics.fmean((before.wall, after.wall)), extra=extra)


def bare_processes(args, graphs, processes: int) -> Measured:
    """The job's CPU layout without Ray: ``processes`` bare loops side by side, each on every Nth graph.

    Steady rate = the sum of the loops' steady rates (they run the same number of batches at once).
    """
    import multiprocessing

    parts = [graphs[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.starmap(bare_loop, [(args.model, part, args.batch_size, args.steps, args.guidance,
                                            args.threads_per_worker) for part in parts])
    rate = sum(r.rate for r in results)
    wall = max(r.wall for r in results)
    return Measured(rate=rate, fixed=wall - len(graphs) / rate, wall=wall, extra={
        "threads": results[0].extra["threads"], "images": len(graphs),
        "pipe_seconds_per_image": statistics.fmean(r.extra["pipe_seconds_per_image"] for r in results),
    })


def sink_calls(run_dir: Path) -> int:
    """How many sink calls wrote the run: metadata files written within 50 ms of each other are one call."""
    times = sorted(p.stat().st_mtime for p in (run_dir / "metadata").glob("*.parquet"))
    return sum(1 for i, t in enumerate(times) if i == 0 or t - times[i - 1] >= 0.05)


def job_config(args, input_dir: Path, output: Path, run_id: str, segmenter: str, steps: int):
    from jobs.generate import GenerateConfig

    layout = {"cpus_per_worker": args.cpus_per_worker} if args.cpus_per_worker is not None else {}
    return GenerateConfig(input=str(input_dir), output=str(output), run_id=run_id, model=args.model,
                          segmenter=segmenter, steps=steps, guidance=args.guidance, batch_size=args.batch_size,
                          workers=args.workers, threads_per_worker=args.threads_per_worker, report=False,
                          log_every=args.log_every, **layout)


def job_once(args, input_dir: Path, output: Path, run_id: str, segmenter: str) -> dict:
    """One ``run()`` on the already started Ray instance: its wall seconds, CPU seconds by role, sink calls."""
    from jobs.generate import run

    sampler = Sampler(os.getpid(), interval=args.cpu_interval)
    sampler.start()
    started = time.perf_counter()
    try:
        summary, code = run(job_config(args, input_dir, output, run_id, segmenter, args.steps))
    finally:
        wall = time.perf_counter() - started
        sampler.stop()
    if code != 0:
        raise SystemExit(f"job {run_id} failed (exit {code}): {json.dumps(summary)[:2000]}")
    return {"wall": wall, "images": summary["images"], "cpu": sampler.cpu_seconds(),
            "run_dir": output / run_id,
            "sink_calls": sink_calls(output / run_id), "summary_rate": summary["images_per_second"],
            "gen_seconds_per_image": summary["seconds_per_image"]["generate"], "foreign": sampler.foreign_cores()}


def actors(args) -> int:
    return int(args.workers.split(",")[-1])


def job_measured(args, small_dir: Path, large_dir: Path, output: Path, label: str, segmenter: str) -> Measured:
    """Steady rate of the large run (from its output's batch end times), and its marginal rate.

    Marginal rate = extra images / extra seconds of the large run over a small one, which goes before
    and after the large one; their mean is the baseline.
    """
    before = job_once(args, small_dir, output, f"{label}-small-1", segmenter)
    large = job_once(args, large_dir, output, f"{label}-large", segmenter)
    after = job_once(args, small_dir, output, f"{label}-small-2", segmenter)
    small_wall = (before["wall"] + after["wall"]) / 2
    seconds = large["wall"] - small_wall
    marginal = (large["images"] - before["images"]) / seconds
    cores = {k: (large["cpu"].get(k, 0.0) - (before["cpu"].get(k, 0.0) + after["cpu"].get(k, 0.0)) / 2) / seconds
             for k in large["cpu"]}
    rate = steady_rate(output_batches(large["run_dir"]), warm_up=actors(args))
    return Measured(rate=rate, fixed=large["wall"] - large["images"] / rate, wall=large["wall"], extra={
        "small": [before, after], "large": large, "cores": cores, "images": large["images"], "marginal": marginal})


def actor_threads(cfg) -> dict:
    """Torch threads in a Ray worker with the generator's CPU reservation, before and after ``set_threads``."""
    import ray

    @ray.remote(num_cpus=cfg.cpus_per_worker)
    def probe(threads):
        import torch

        from workers.runtime import set_threads

        before = torch.get_num_threads()
        return {"omp": os.environ.get("OMP_NUM_THREADS"), "before": before, "after": set_threads(threads)}

    return {"num_cpus": cfg.cpus_per_worker, **ray.get(probe.remote(cfg.threads_per_worker))}


def start_ray(cpus: int) -> None:
    """A local instance started once; each job's ``init_ray`` then joins it and sets its Ray Data options."""
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)


def throughput(args, scratch: Path, cpus: int) -> bool:
    import ray

    from jobs.generate import configure_logging

    small_rows = args.small_rows or 2 * args.batch_size
    large_dir, small_dir = scratch / "throughput-input", scratch / "throughput-input-small"
    make_table(large_dir, args.rows, seed=11, per_shard=args.rows_per_shard)
    make_table(small_dir, small_rows, seed=11, per_shard=args.rows_per_shard)  # the first rows of the large table
    shards = len(list(large_dir.glob("part-*.parquet")))
    graphs = read_graphs(large_dir)

    print(f"bare loop: {len(graphs)} graphs ...", flush=True)
    bare_before = bare_loop(args.model, graphs, args.batch_size, args.steps, args.guidance)
    processes = actors(args)
    same_layout = None
    if processes > 1 or args.threads_per_worker:
        print(f"bare loops in the job's layout: {processes} processes x {args.threads_per_worker} threads ...",
              flush=True)
        same_layout = bare_processes(args, graphs, processes)

    configure_logging()
    start_ray(cpus)
    try:
        threads = actor_threads(job_config(args, large_dir, scratch, "probe", "none", args.steps))
        out = scratch / "throughput-out"
        print("job warm-up run (discarded) ...", flush=True)
        job_once(args, small_dir, out, "warm-up", args.segmenter)
        runs = {}
        for label, segmenter in (("job, scoring off", "none"), ("job, scoring on", args.segmenter)):
            print(f"{label}: {small_rows} then {args.rows} rows ...", flush=True)
            runs[label] = job_measured(args, small_dir, large_dir, out, label.replace(", ", "-").replace(" ", "-"),
                                       segmenter)
    finally:
        ray.shutdown()
    print(f"bare loop again: {len(graphs)} graphs ...", flush=True)
    bare_after = bare_loop(args.model, graphs, args.batch_size, args.steps, args.guidance)
    bare = mean_of(bare_before, bare_after)

    print(f"\nthroughput: {args.model}, {len(graphs)} rows in {shards} shards of {args.rows_per_shard}, batch "
          f"{args.batch_size}, {args.steps} steps, guidance {args.guidance}, {cpus} CPUs, --workers {args.workers}"
          f"{f' x {args.threads_per_worker} threads' if args.threads_per_worker else ''}, PNG encoding "
          "included in both")
    print("steady images/s: images after the first batch / seconds from the end of the first batch to the end of the "
          "last (bare: the loop's clock; job: generated_at of its output), Ray started beforehand; marginal images/s: "
          f"({args.rows} - {small_rows}) images / (wall of the {args.rows}-row run - wall of the {small_rows}-row run)")
    print(f"{'run':18} {'images':>6} {'images/s':>9} {'vs bare':>8} {'marginal':>9} {'vs bare':>8} {'fixed s':>8} "
          f"{'wall s':>7} {'summary img/s':>14} {'gen s/img':>10} {'sink calls':>11}")
    for label, m in (("bare loop, before", bare_before), ("bare loop, after", bare_after), ("bare loop, mean", bare)):
        print(f"{label:18} {m.extra['images']:>6} {m.rate:>9.3f} {m.rate / bare.rate:>8.2f} {'-':>9} {'-':>8} "
              f"{m.fixed:>8.1f} {m.wall:>7.1f} {'-':>14} {m.extra['pipe_seconds_per_image']:>10.3f} {'-':>11}")
    if same_layout is not None:
        label = f"bare {processes}x{same_layout.extra['threads']} proc."
        print(f"{label:18} {same_layout.extra['images']:>6} {same_layout.rate:>9.3f} {same_layout.rate / bare.rate:>8.2f} "
              f"{'-':>9} {'-':>8} {same_layout.fixed:>8.1f} {same_layout.wall:>7.1f} {'-':>14} "
              f"{same_layout.extra['pipe_seconds_per_image']:>10.3f} {'-':>11}")
    for label, m in runs.items():
        large = m.extra["large"]
        gen = large["gen_seconds_per_image"]
        marginal = m.extra["marginal"]
        print(f"{label:18} {m.extra['images']:>6} {m.rate:>9.3f} {m.rate / bare.rate:>8.2f} {marginal:>9.3f} "
              f"{marginal / bare.rate:>8.2f} {m.fixed:>8.1f} {m.wall:>7.1f} {large['summary_rate']:>14.3f} "
              f"{gen if gen is not None else float('nan'):>10.3f} {large['sink_calls']:>11}")
    print("fixed s: wall - images / steady rate (model load, actor start-up, first batch, last sink call, summary); "
          "summary img/s: the job's own images_per_second (start-up included); gen s/img: seconds per image of the "
          "pipe call (bare) / of the generator's render, PNG included (job)")
    print(f"bare loop: pipe only (no PNG) {bare.extra['pipe_only_rate']:.3f} images/s, PNG encoding "
          f"{100 * bare.extra['png_share']:.1f}% of the loop, model load {bare.extra['load_seconds']:.1f} s")
    for label, m in runs.items():
        before, after = m.extra["small"]
        print(f"{label}: small runs {before['images']} images in {before['wall']:.1f} s and {after['wall']:.1f} s "
              f"(gen s/img {before['gen_seconds_per_image']:.3f}, {after['gen_seconds_per_image']:.3f}), "
              f"large run {m.extra['large']['images']} images in {m.wall:.1f} s")
    print(f"torch threads: bare loop {bare.extra['threads']}; a Ray worker with the generator's num_cpus="
          f"{threads['num_cpus']}: OMP_NUM_THREADS={threads['omp']}, torch {threads['before']} before set_threads, "
          f"{threads['after']} after (what the generator actor runs with)")
    foreign = [f"bare loop {bare.extra['foreign']:.2f}"]
    for label, m in runs.items():
        small = ", ".join(f"{r['foreign']:.2f}" for r in m.extra["small"])
        foreign.append(f"{label} {m.extra['large']['foreign']:.2f} (small runs {small})")
    print(f"other load on the machine (cores busy outside this benchmark's processes): {'; '.join(foreign)}")
    for label, m in runs.items():
        cores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(m.extra["cores"].items(), key=lambda kv: -kv[1]))
        print(f"CPU cores per extra image-second, {label}: {cores}")

    ratio = runs["job, scoring off"].rate / bare.rate
    on = runs["job, scoring on"].rate / bare.rate
    print(f"\nratio job/bare, scoring off: {ratio:.2f}  (target >= {THROUGHPUT_TARGET}: "
          f"{'PASS' if ratio >= THROUGHPUT_TARGET else 'FAIL'})")
    print(f"ratio job/bare, scoring on:  {on:.2f}  (no target)")
    print("marginal ratios (whole runs, last sink call included): scoring off "
          f"{runs['job, scoring off'].extra['marginal'] / bare.rate:.2f}, scoring on "
          f"{runs['job, scoring on'].extra['marginal'] / bare.rate:.2f}")
    if same_layout is not None:
        print(f"ratio job/bare loops in the job's layout ({processes} processes x {same_layout.extra['threads']} "
              f"threads, no Ray), scoring off: {runs['job, scoring off'].rate / same_layout.rate:.2f}  (the job's own "
              "overhead; the target compares with the single in-process loop above)")
    return ratio >= THROUGHPUT_TARGET


# ----------------------------------------------------------------------------- memory


def own_peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM, the high-water mark of its own address space.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the pre-exec high-water mark over exec,
    and subprocess forks with vfork, so a child started by a big parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_run(args) -> int:
    """One job run in this (fresh) process: the driver. Writes its peak RSS and the summary to --child-result."""
    from jobs.generate import configure_logging, run

    configure_logging()
    start_ray(args.cpus or os.cpu_count() or 1)
    try:
        started = time.perf_counter()
        summary, code = run(job_config(args, Path(args.child_input), Path(args.child_output), "run",
                                       args.segmenter if not args.memory_no_score else "none", args.memory_steps))
        seconds = time.perf_counter() - started
        peak = own_peak_rss()
    finally:
        import ray

        ray.shutdown()
    Path(args.child_result).write_text(json.dumps({"code": code, "driver_peak_rss": peak, "seconds": seconds,
                                                   "images": summary["images"], "rows": summary["rows_in"]}))
    return code


def memory_run(args, scratch: Path, rows: int, label: str) -> dict:
    input_dir = scratch / f"memory-input-{label}"
    make_table(input_dir, rows, seed=13, per_shard=args.rows_per_shard)
    result, log = scratch / f"memory-{label}.json", scratch / f"memory-{label}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-run", "--child-input", str(input_dir),
           "--child-output", str(scratch / f"memory-out-{label}"), "--child-result", str(result),
           "--model", args.model, "--segmenter", args.segmenter, "--batch-size", str(args.batch_size),
           "--guidance", str(args.guidance), "--memory-steps", str(args.memory_steps), "--log-every", str(args.log_every)]
    if args.memory_no_score:
        cmd.append("--memory-no-score")
    if args.cpus:
        cmd += ["--cpus", str(args.cpus)]
    print(f"memory run {label}: {rows} rows ...", flush=True)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid, interval=args.sample_interval)
        sampler.start()
        code = proc.wait()
        sampler.stop()
    if code != 0 or not result.exists():
        raise SystemExit(f"memory run {label} failed ({code}):\n{log.read_text()[-3000:]}")
    data = json.loads(result.read_text())
    largest, role = sampler.largest_worker()
    return {**data, "wall": time.perf_counter() - started, "driver_sampled": sampler.root_trace.peak_rss,
            "workers_sum": sampler.peak_sum["workers"], "largest_worker": largest, "largest_role": role,
            "system_sum": sampler.peak_sum["system"], "generator": sampler.peak("generator"),
            "scorer": sampler.peak("scorer"), "sink": sampler.peak("sink")}


def memory(args, scratch: Path) -> bool:
    small_rows = args.memory_rows
    large_rows = args.memory_rows * args.memory_factor
    small = memory_run(args, scratch, small_rows, "R")
    large = memory_run(args, scratch, large_rows, f"{args.memory_factor}R")

    mb = 1 / 2**20
    shards = (-(-small_rows // args.rows_per_shard), -(-large_rows // args.rows_per_shard))
    print(f"\nmemory: {args.memory_steps} step(s), batch {args.batch_size}, scoring "
          f"{'off' if args.memory_no_score else 'on'}, R = {small_rows} rows ({shards[0]} shards) vs "
          f"{args.memory_factor}R = {large_rows} rows ({shards[1]} shards); peak RSS in MB")
    print(f"{'':34} {'R':>9} {f'{args.memory_factor}R':>9} {'ratio':>7}  target")
    rows = [
        ("driver (VmHWM of its process)", "driver_peak_rss", True),
        ("workers: peak of the sum", "workers_sum", True),
        ("workers: largest single process", "largest_worker", True),
        ("  generator actor", "generator", False),
        ("  scorer actor", "scorer", False),
        ("  sink actor", "sink", False),
        ("Ray daemons: peak of the sum", "system_sum", False),
        ("driver (sampled, cross-check)", "driver_sampled", False),
    ]
    ok = True
    for name, key, target in rows:
        a, b = small[key], large[key]
        ratio = b / a if a else float("nan")
        verdict = ""
        if target:
            passed = ratio <= MEMORY_TARGET
            ok &= passed
            verdict = f"<= {MEMORY_TARGET}: {'PASS' if passed else 'FAIL'}"
        print(f"{name:34} {a * mb:>9.0f} {b * mb:>9.0f} {ratio:>7.2f}  {verdict}")
    print(f"largest worker: {small['largest_role']} (R), {large['largest_role']} ({args.memory_factor}R)")
    for label, r in (("R", small), (f"{args.memory_factor}R", large)):
        print(f"run {label}: {r['rows']} rows -> {r['images']} images, job {r['seconds']:.1f} s, "
              f"process wall {r['wall']:.1f} s")
    return ok


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shapes demo model)")
    parser.add_argument("--segmenter", default=None, help="segmenter for the scoring-on runs (default: shapes segmenter)")
    parser.add_argument("--rows", type=int, default=128, help="rows of the throughput runs")
    parser.add_argument("--small-rows", type=int, default=None,
                        help="rows of the small job run the large one is compared with (default: 2 batches)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps of the throughput runs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--rows-per-shard", type=int, default=32, help="Parquet shard size of every input table")
    parser.add_argument("--workers", default="1", help="the job's --workers (generator actors)")
    parser.add_argument("--threads-per-worker", type=int, default=None, help="the job's --threads-per-worker")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="the job's --cpus-per-worker")
    parser.add_argument("--memory-rows", type=int, default=128, help="R, rows of the small memory run")
    parser.add_argument("--memory-factor", type=int, default=10, help="the large memory run has this many times R")
    parser.add_argument("--memory-steps", type=int, default=1)
    parser.add_argument("--memory-no-score", action="store_true", help="memory runs with scoring off")
    parser.add_argument("--sample-interval", type=float, default=0.2, help="seconds between RSS samples (memory)")
    parser.add_argument("--cpu-interval", type=float, default=0.5, help="seconds between CPU samples (throughput)")
    parser.add_argument("--cpus", type=int, default=None, help="num_cpus of the local Ray instance (default: all)")
    parser.add_argument("--log-every", type=float, default=10.0)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the inputs and outputs (printed at the end)")
    parser.add_argument("--child-run", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--child-input", "--child-output", "--child-result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = resolve(args.model or DEMO_MODEL)
    args.segmenter = resolve(args.segmenter or DEMO_SEGMENTER)
    if args.batch_size < 1 or args.rows_per_shard % args.batch_size:
        parser.error("--rows-per-shard must be a multiple of --batch-size")
    if args.rows < (args.small_rows or 2 * args.batch_size) + args.batch_size:
        parser.error("--rows must exceed --small-rows (default: 2 batches) by at least one batch")
    if args.child_run:
        return child_run(args)

    cpus = args.cpus or os.cpu_count() or 1
    scratch = Path(tempfile.mkdtemp(prefix="sgbatch-bench-overhead-"))
    started = time.perf_counter()
    ok = True
    try:
        if not args.skip_throughput:
            ok &= throughput(args, scratch, cpus)
        if not args.skip_memory:
            ok &= memory(args, scratch)
    finally:
        if args.keep:
            print(f"\nfiles kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nbenchmark wall time: {time.perf_counter() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
