"""``sgbatch <job> …`` — the same as ``python -m jobs.<job> …``."""

from __future__ import annotations

import difflib
import importlib
import sys

from jobs.common import invoked_as

JOBS = {
    "prepare": "convert scene graphs (sg2im JSON, Visual Genome, COCO-Stuff, shapes world) to Parquet",
    "generate": "generate images from scene graphs on Ray, with segmentation recall",
    "sbpc": "sampling-based prompt compliance: best of N candidates per graph",
    "finetune": "fine-tune the scene-graph conditioning with Ray Train + DeepSpeed",
    "report": "build the HTML report of a run",
    "train_demo": "train the shapes demo diffusion model and segmenter from scratch",
    "distill_draft": "distil a few-step draft model for SBPC from a scene-graph model",
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("sgbatch")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def usage() -> str:
    width = max(map(len, JOBS))
    lines = "\n".join(f"  {name.ljust(width)}  {text}" for name, text in JOBS.items())
    return (f"usage: sgbatch <job> [options]\n       sgbatch --version\n\njobs:\n{lines}\n\n"
            "'sgbatch <job> --help' lists a job's options.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"sgbatch {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    job = argv[0]
    if job not in JOBS:
        close = difflib.get_close_matches(job, JOBS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; jobs: {', '.join(JOBS)}"
        print(f"sgbatch: error: unknown job {job!r}{hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"jobs.{job}")
    with invoked_as(f"sgbatch {job}"):
        return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
