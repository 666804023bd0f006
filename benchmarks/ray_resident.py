"""What does a running Ray instance cost a render on its machine? The same pipe loop four ways, interleaved.

    python benchmarks/ray_resident.py                 # 3 rounds, ~17 min on 2 cores
    python benchmarks/ray_resident.py --rounds 1 --rows 24 --steps 2   # plumbing

Companion of ``overhead.py`` (whose job/bare ratio compares the job with a loop on a machine
without Ray). Per round, on the same graphs, batch size, steps and seeds, each measured with the
steady rate of ``overhead.py`` (images after the first batch / seconds between batch ends):

* no Ray: ``overhead.bare_loop`` in a spawned process, no Ray instance on the machine;
* Ray up, plain process: the same, while a local Ray instance runs (after one discarded job run,
  so Ray Data's helper actors and idle workers are there, as during a job);
* Ray task: the same loop as a Ray task with the generator actor's ``num_cpus``;
* the job: ``jobs.generate.run`` with scoring off; its rate from the output's ``generated_at``.

If the job is about as fast as the Ray task, its own stages (read, validation, sink, the driver's
Ray Data loop) cost nothing beyond being a Ray worker; the gap from "Ray up" to "no Ray" is what
Ray's resident processes (raylet, GCS, agents, log monitor, idle and helper workers) take.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import bare_loop, job_config, make_table, output_batches, read_graphs, start_ray, steady_rate  # noqa: E402

from jobs.defaults import DEMO_MODEL, resolve  # noqa: E402

MODES = ("no Ray", "Ray up, plain process", "Ray task", "job")


def in_process(args, graphs) -> float:
    """The loop in a fresh spawned process (its own torch threads, nothing inherited from this driver)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(bare_loop, (args.model, graphs, args.batch_size, args.steps, args.guidance)).rate


def in_ray_task(args, graphs, num_cpus: float) -> float:
    import ray

    here = str(Path(__file__).resolve().parent)

    @ray.remote(num_cpus=num_cpus)
    def loop(model, graphs, batch_size, steps, guidance):
        sys.path[:0] = [str(Path(here).parent), here]
        from overhead import bare_loop as remote_loop

        return remote_loop(model, graphs, batch_size, steps, guidance).rate

    return ray.get(loop.remote(args.model, graphs, args.batch_size, args.steps, args.guidance))


def job_rate(args, input_dir: Path, out: Path, run_id: str) -> float:
    from jobs.generate import run

    _, code = run(job_config(args, input_dir, out, run_id, "none", args.steps))
    if code != 0:
        raise SystemExit(f"job {run_id} failed (exit {code})")
    return steady_rate(output_batches(out / run_id))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shapes demo model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--rows-per-shard", type=int, default=32)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5, help="the generator's num_cpus (job default)")
    args = parser.parse_args(argv)
    args.model = resolve(args.model or DEMO_MODEL)
    # what job_config reads besides the above: the default single-actor layout, no progress lines
    args.workers, args.threads_per_worker, args.log_every = "1", None, 1000.0

    import ray

    from jobs.generate import configure_logging

    scratch = Path(tempfile.mkdtemp(prefix="sgbatch-bench-resident-"))
    try:
        input_dir = scratch / "input"
        make_table(input_dir, args.rows, seed=11, per_shard=args.rows_per_shard)
        graphs = read_graphs(input_dir)
        configure_logging()
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            print(f"round {r + 1}: no Ray ...", flush=True)
            rates["no Ray"].append(in_process(args, graphs))
            start_ray(multiprocessing.cpu_count())
            try:
                job_rate(args, input_dir, scratch / "out", f"warm-up-{r}")  # helper actors and workers as in a job
                print(f"round {r + 1}: Ray up ...", flush=True)
                rates["Ray up, plain process"].append(in_process(args, graphs))
                rates["Ray task"].append(in_ray_task(args, graphs, args.cpus_per_worker))
                rates["job"].append(job_rate(args, input_dir, scratch / "out", f"job-{r}"))
            finally:
                ray.shutdown()
            print("  " + ", ".join(f"{m} {v[-1]:.3f}" for m, v in rates.items()), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = statistics.fmean(rates["no Ray"])
    print(f"\n{len(graphs)} graphs, batch {args.batch_size}, {args.steps} steps, {args.rounds} rounds interleaved; "
          "steady images/s (images after the first batch / seconds between batch ends)")
    print(f"{'mode':24} {'mean':>7} {'vs no Ray':>10} {'vs Ray up':>10}  runs")
    up = statistics.fmean(rates["Ray up, plain process"])
    for mode, values in rates.items():
        mean = statistics.fmean(values)
        print(f"{mode:24} {mean:>7.3f} {mean / base:>10.2f} {mean / up:>10.2f}  "
              + ", ".join(f"{v:.3f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
