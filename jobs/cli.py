"""``sgbatch <job> …`` — the same as ``python -m jobs.<job> …``."""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "prepare": "convert scene graphs (sg2im JSON, Visual Genome, COCO-Stuff, shapes world) to Parquet",
    "generate": "generate images from scene graphs on Ray, with segmentation recall",
    "sbpc": "sampling-based prompt compliance: best of N candidates per graph",
    "finetune": "fine-tune the scene-graph conditioning with Ray Train + DeepSpeed",
    "report": "build the HTML report of a run",
    "train_demo": "train the shapes demo diffusion model and segmenter from scratch",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in JOBS:
        width = max(map(len, JOBS))
        lines = "\n".join(f"  {name.ljust(width)}  {text}" for name, text in JOBS.items())
        print(f"usage: sgbatch <job> [options]\n\njobs:\n{lines}\n\n'sgbatch <job> --help' lists a job's options.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"jobs.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
