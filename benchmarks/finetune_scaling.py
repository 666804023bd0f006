"""Fine-tuning throughput with 1 vs 2 Ray Train workers, and per-rank memory under ZeRO stages 0-3 (DeepSpeed, gloo, CPU).

    python benchmarks/finetune_scaling.py [--steps 40] [--batch-size 16] [--rows 512] [--base models/shapes-sg-diffusion]
    python benchmarks/finetune_scaling.py --memory [--steps 2] [--batch-size 4] [--rows 64] [--precision fp32]

Runs the real job (``jobs.finetune.run``: Ray Data -> TorchTrainer -> deepspeed.initialize) twice on
one local Ray instance with the same per-worker micro-batch (weak scaling, as data parallelism is
used): once with 1 worker, once with 2. Each worker gets the machine's CPUs divided by the workers
as torch threads, so on a 2-core machine this compares one 2-thread worker with two 1-thread
workers that all-reduce gradients over gloo. Samples/s is the job's steady-state figure (every
logging window but the first, which holds start-up and the first data reads).

``--memory`` runs the same job with 2 workers once per ZeRO stage 0, 1, 2, 3 (and once more at
stage 3 with ``stage3_param_persistence_threshold`` 0, unless ``--no-unpersisted``) on a shapes table
made like ``python -m jobs.prepare shapes --count 64 --seed 1 --size 32``. Each worker's training
loop counts, at its first optimizer step, the bytes its DeepSpeed engine holds
(:mod:`workers.train_memory`: parameters incl. ZeRO-3 ``ds_tensor`` partitions, gradients, optimizer
state incl. fp32 master partitions) and its peak RSS so far; rank 0 writes every rank's numbers into
the first ``metrics.jsonl`` record, read here. The table shows the larger rank's numbers per stage
and the ratio of its model-state bytes to stage 0's.

The base defaults to the shapes demo model; without it, a fresh demo-flavour pipeline (same size,
untrained) stands in, which measures the same compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.defaults import DEMO_MODEL, resolve  # noqa: E402
from jobs.finetune import FinetuneConfig, run  # noqa: E402


def make_table(folder: Path, rows: int, seed: int, rows_per_shard: int | None = 128) -> None:
    from jobs.prepare import main as prepare

    shards = ["--rows-per-shard", str(rows_per_shard)] if rows_per_shard else []
    code = prepare(["shapes", "--count", str(rows), "--seed", str(seed), "--size", "32", "--output", str(folder),
                    *shards])
    if code != 0:
        raise SystemExit(f"prepare shapes failed with exit code {code}")


def scratch_inputs(args: argparse.Namespace, scratch: Path, rows: int, seed: int,
                   rows_per_shard: int | None = 128) -> tuple[str, str, str]:
    """The base model (and its label) and the training table: --base/--train, else made in ``scratch``."""
    base, base_label = base_model(args.base, scratch)
    train = args.train
    if train is None:
        train = str(scratch / "train")
        make_table(Path(train), rows, seed=seed, rows_per_shard=rows_per_shard)
    return base, base_label, train


def base_model(path: str | None, scratch: Path) -> tuple[str, str]:
    candidate = resolve(path or DEMO_MODEL)
    if (Path(candidate) / "model_index.json").is_file():
        return candidate, candidate
    from sgmodel.shapes.diffusion import VOCABULARY
    from sgmodel.shapes.flavours import build_pipeline

    fresh = scratch / "demo-flavour"
    build_pipeline("demo", VOCABULARY, seed=0, use_caption=False).save_pretrained(fresh)
    return str(fresh), "fresh demo-flavour pipeline (the demo model is not there yet)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", action="store_true",
                        help="per-rank model-state bytes and peak RSS under ZeRO stages 0-3 with 2 workers")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 40, --memory 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="micro-batch per worker (default: 16, --memory 4)")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows of the generated shapes training table (default: 512, --memory 64)")
    parser.add_argument("--base", default=None, help="model to fine-tune (default: the shapes demo model)")
    parser.add_argument("--train", default=None, help="training table (default: a generated shapes table)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--trainable", default="all", choices=["conditioning", "unet", "lora", "all"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--no-unpersisted", dest="unpersisted", action="store_false",
                        help="--memory: skip the extra stage-3 run with stage3_param_persistence_threshold 0")
    args = parser.parse_args(argv)
    if args.memory:
        return memory_main(args)
    args.steps = args.steps or 40
    args.batch_size = args.batch_size or 16
    args.rows = args.rows or 512

    import ray

    from jobs.common import configure_logging

    configure_logging()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        base, base_label, train = scratch_inputs(args, scratch, args.rows, seed=1234)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        results = {}
        try:
            for workers in (1, 2):
                started = time.perf_counter()
                summary, code = run(FinetuneConfig(
                    train=train, base=base, output=str(scratch / f"w{workers}"), workers=workers, steps=args.steps,
                    batch_size=args.batch_size, zero_stage=args.zero_stage, trainable=args.trainable,
                    precision=args.precision, lr=1e-5, log_every=args.log_every, checkpoint_every=args.steps,
                    report=False, shuffle_buffer=64,
                ))
                if code != 0:
                    print(f"the {workers}-worker run failed: {summary['error']}", file=sys.stderr)
                    return 1
                summary["wall_seconds"] = time.perf_counter() - started
                results[workers] = summary
        finally:
            ray.shutdown()

    one, two = results[1]["samples_per_s"], results[2]["samples_per_s"]
    print(f"\nfine-tuning throughput: {base_label}, ZeRO-{args.zero_stage}, {args.precision}, trainable={args.trainable}, "
          f"{args.steps} steps, micro-batch {args.batch_size}/worker, {cpus} CPUs")
    print(f"{'workers':>8} {'threads/worker':>15} {'global batch':>13} {'samples/s':>10} {'s/step':>8} {'job wall s':>11}")
    for workers, summary in results.items():
        rate = summary["samples_per_s"]
        batch = args.batch_size * workers
        print(f"{workers:>8} {max(1, cpus // workers):>15} {batch:>13} {rate:>10.2f} {batch / rate:>8.3f} "
              f"{summary['wall_seconds']:>11.1f}")
    print(f"ratio 2 workers / 1 worker: {two / one:.2f}x samples/s")
    return 0


# ----------------------------------------------------------------------------- --memory

MB = 2**20
UNPERSISTED = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
"""ZeRO-3 keeps every parameter under this many elements (default 1e5) gathered on every rank; the
demo model's tensors are all smaller, so by default stage 3 partitions none of them for good."""


def first_model_state(output: Path) -> list[dict]:
    """Every rank's model-state counts from the first metrics.jsonl record that has them."""
    for line in (output / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("model_state"):
            return sorted(record["model_state"], key=lambda r: r["rank"])
    raise RuntimeError(f"{output}/metrics.jsonl has no model_state record")


def memory_main(args: argparse.Namespace) -> int:
    import ray

    from jobs.common import configure_logging

    configure_logging()
    steps, batch, rows = args.steps or 2, args.batch_size or 4, args.rows or 64
    cpus = os.cpu_count() or 1
    runs = [(str(stage), stage, None) for stage in (0, 1, 2, 3)]
    if args.unpersisted:
        runs.append(("3, persistence 0", 3, UNPERSISTED))
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        base, base_label, train = scratch_inputs(args, scratch, rows, seed=1, rows_per_shard=None)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            for label, stage, overrides in runs:
                output = scratch / f"zero{len(results)}"
                summary, code = run(FinetuneConfig(
                    train=train, base=base, output=str(output), workers=2, steps=steps, batch_size=batch,
                    zero_stage=stage, trainable=args.trainable, precision=args.precision, lr=1e-5, log_every=1,
                    checkpoint_every=steps, report=False, shuffle_buffer=16,
                    deepspeed_overrides=json.dumps(overrides) if overrides else None,
                ))
                if code != 0:
                    print(f"the ZeRO-{label} run failed: {summary['error']}", file=sys.stderr)
                    return 1
                results[label] = first_model_state(output)
        finally:
            ray.shutdown()
    print_memory_table(results, base_label, args.precision, args.trainable, steps, batch)
    return 0


def print_memory_table(results: dict[str, list[dict]], base_label: str, precision: str, trainable: str,
                       steps: int, batch: int) -> None:
    def largest(ranks: list[dict], key: str) -> int:
        return max(r[key] for r in ranks)

    baseline = largest(results["0"], "model_state_bytes")
    print(f"\nper-rank model state under ZeRO: {base_label}, 2 workers, {precision}, trainable={trainable}, "
          f"{steps} steps, micro-batch {batch}/worker; counted at the first optimizer step (MiB, larger rank)")
    header = (f"{'stage':>16} {'params':>8} {'grads':>8} {'optim':>8} {'model state':>12} {'per rank r0/r1':>16} "
              f"{'vs stage 0':>10} {'peak RSS':>9} {'buckets':>9}")
    print(header)
    for label, ranks in results.items():
        state = largest(ranks, "model_state_bytes")
        per_rank = "/".join(f"{r['model_state_bytes'] / MB:.2f}" for r in ranks)
        print(f"{label:>16} {largest(ranks, 'param_bytes') / MB:>8.2f} {largest(ranks, 'grad_bytes') / MB:>8.2f} "
              f"{largest(ranks, 'optimizer_bytes') / MB:>8.2f} {state / MB:>12.2f} {per_rank:>16} "
              f"{state / baseline:>9.3f}x {largest(ranks, 'peak_rss_bytes') / MB:>9.0f} "
              f"{largest(ranks, 'other_bytes') / MB:>9.0f}")
    print("params: module weights (ZeRO-3: ds_tensor partitions plus any still-gathered full copies); grads: after the "
          "step's last backward; optim: Adam moments and step, plus fp32 master partitions (ZeRO 1-3); buckets: "
          "reduce-bucket buffers (allocated at reduce_bucket_size, mostly never touched; not model state)")
    ratio = largest(results["3"], "model_state_bytes") / baseline
    print(f"stage 3 per-rank model-state bytes <= 0.6x of stage 0: {'MET' if ratio <= 0.6 else 'NOT MET'} ({ratio:.3f}x)")
    if "3, persistence 0" in results:
        ratio = largest(results["3, persistence 0"], "model_state_bytes") / baseline
        print(f"  with stage3_param_persistence_threshold 0: {'MET' if ratio <= 0.6 else 'NOT MET'} ({ratio:.3f}x)")


if __name__ == "__main__":
    sys.exit(main())
