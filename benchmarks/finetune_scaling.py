"""Fine-tuning throughput with 1 vs 2 Ray Train workers (DeepSpeed ZeRO, gloo, CPU), side by side.

    python benchmarks/finetune_scaling.py [--steps 40] [--batch-size 16] [--rows 512] [--base models/shapes-sg-diffusion]

Runs the real job (``jobs.finetune.run``: Ray Data -> TorchTrainer -> deepspeed.initialize) twice on
one local Ray instance with the same per-worker micro-batch (weak scaling, as data parallelism is
used): once with 1 worker, once with 2. Each worker gets the machine's CPUs divided by the workers
as torch threads, so on a 2-core machine this compares one 2-thread worker with two 1-thread
workers that all-reduce gradients over gloo. Samples/s is the job's steady-state figure (every
logging window but the first, which holds start-up and the first data reads).

The base defaults to the shapes demo model; without it, a fresh demo-flavour pipeline (same size,
untrained) stands in, which measures the same compute.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.defaults import DEMO_MODEL, resolve  # noqa: E402
from jobs.finetune import FinetuneConfig, run  # noqa: E402


def make_table(folder: Path, rows: int, seed: int) -> None:
    from jobs.prepare import main as prepare

    code = prepare(["shapes", "--count", str(rows), "--seed", str(seed), "--size", "32", "--output", str(folder),
                    "--rows-per-shard", "128"])
    if code != 0:
        raise SystemExit(f"prepare shapes failed with exit code {code}")


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
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch per worker")
    parser.add_argument("--rows", type=int, default=512, help="rows of the generated shapes training table")
    parser.add_argument("--base", default=None, help="model to fine-tune (default: the shapes demo model)")
    parser.add_argument("--train", default=None, help="training table (default: a generated shapes table)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--trainable", default="all", choices=["conditioning", "unet", "lora", "all"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--log-every", type=int, default=5)
    args = parser.parse_args(argv)

    import ray

    from jobs.generate import configure_logging

    configure_logging()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        base, base_label = base_model(args.base, scratch)
        train = args.train
        if train is None:
            train = str(scratch / "train")
            make_table(Path(train), args.rows, seed=1234)
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


if __name__ == "__main__":
    sys.exit(main())
