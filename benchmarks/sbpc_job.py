"""The sbpc job end to end, as a user runs it: `--candidates 8` against `--fast`, start-up included.

Prepares fresh shapes graphs (a stream no model was trained on), then runs each job in its own
process one after the other (`--rounds` times, alternating which goes first), timing the whole
command and reading the mean recall and precision from each run's summary.json:

    python benchmarks/sbpc_job.py --count 64

Targets: `--fast` >= 3.5x faster than `--candidates 8`, mean recall within 0.02.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEED_TARGET, RECALL_GAP = 3.5, 0.02


def run_job(name: str, flags: list[str], inputs: Path, output: Path, log: Path) -> dict:
    command = [sys.executable, "-m", "jobs.sbpc", "--input", str(inputs), "--output", str(output), "--run-id", name,
               "--no-report", *flags]
    began = time.perf_counter()
    with log.open("w") as fh:
        subprocess.run(command, cwd=ROOT, check=True, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - began
    summary = json.loads((output / name / "summary.json").read_text())
    return {"seconds": seconds, "recall": summary["recall"]["mean"], "precision": summary["precision"]["mean"],
            "command": " ".join(command[1:])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=64, help="graphs per job")
    parser.add_argument("--seed", type=int, default=4_000_037, help="shapes stream of the fresh graphs")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs (the order alternates)")
    parser.add_argument("--work", type=Path, default=None, help="folder for inputs, outputs and logs (default: temp)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="sbpc-job-"))
    inputs = work / "graphs"
    subprocess.run([sys.executable, "-m", "jobs.prepare", "shapes", "--count", str(args.count), "--seed",
                    str(args.seed), "--output", str(inputs)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    jobs = {"naive": ["--candidates", "8"], "fast": ["--fast"]}
    runs: dict[str, list[dict]] = {"naive": [], "fast": []}
    for k in range(args.rounds):
        order = ["naive", "fast"] if k % 2 == 0 else ["fast", "naive"]
        for name in order:
            res = run_job(f"{name}-{k}", jobs[name], inputs, work / "runs", work / f"{name}-{k}.log")
            runs[name].append(res)
            print(f"  {name} round {k}: {res['seconds']:.0f} s, recall {res['recall']:.3f}", file=sys.stderr, flush=True)
    naive_s = statistics.fmean(r["seconds"] for r in runs["naive"])
    fast_s = statistics.fmean(r["seconds"] for r in runs["fast"])
    naive_r = statistics.fmean(r["recall"] for r in runs["naive"])
    fast_r = statistics.fmean(r["recall"] for r in runs["fast"])
    naive_p = statistics.fmean(r["precision"] for r in runs["naive"])
    fast_p = statistics.fmean(r["precision"] for r in runs["fast"])
    speed = naive_s / fast_s
    print(f"\nsbpc job on {args.count} fresh shapes graphs (stream {args.seed}), whole command each, "
          f"{args.rounds} round(s)")
    print(f"{'':24} {'seconds':>8} {'mean recall':>12} {'mean precision':>15}")
    print(f"{'--candidates 8':24} {naive_s:8.0f} {naive_r:12.3f} {naive_p:15.3f}")
    print(f"{'--fast':24} {fast_s:8.0f} {fast_r:12.3f} {fast_p:15.3f}")
    speed_ok, recall_ok = speed >= SPEED_TARGET, fast_r >= naive_r - RECALL_GAP
    print(f"  {'PASS' if speed_ok else 'MISS'}  --fast >= {SPEED_TARGET}x faster than --candidates 8: {speed:.2f}x")
    print(f"  {'PASS' if recall_ok else 'MISS'}  --fast mean recall within {RECALL_GAP} of --candidates 8: "
          f"{fast_r:.3f} vs {naive_r:.3f} ({fast_r - naive_r:+.3f})")
    print(f"work folder: {work}")
    return {"runs": runs, "speedup": speed, "recall_diff": fast_r - naive_r}


if __name__ == "__main__":
    main()
