"""Distil the draft model for draft SBPC from a shapes scene-graph diffusion model.

    nohup python -m jobs.distill_draft > distill_draft.log 2>&1 &     # ~1 h 45 min on 2 idle CPU cores

Two phases: the teacher renders ``--pairs`` graphs of a held-apart shapes stream (``--processes``
spawned workers, one thread each; shards already in ``--pairs-dir`` are kept, so this resumes), then
the student trains on them (:mod:`sgmodel.shapes.draft_distill`). ``--skip-pairs`` and
``--skip-training`` leave a phase out. The result is a pipeline folder that ``sbpc --draft-model``
loads.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jobs.common import job_main
from jobs.config import require
from jobs.preflight import check_before_start

PAIR_STREAM = 7
"""Shapes stream of the teacher pairs: not the demo model's training stream (0) nor the benchmarks' graphs."""


@dataclass(kw_only=True)
class DistillDraftConfig:
    """Distil a few-step, guidance-free draft student from a scene-graph diffusion model."""

    teacher: str = "models/shapes-sg-diffusion"
    """The model whose full renders the drafts should predict (a pipeline folder)."""
    output: str = "models/shapes-sg-diffusion-draft"
    """Folder that receives the student pipeline."""
    pairs_dir: str = "distill-pairs"
    """Where teacher pairs are written and read (safetensors shards)."""
    pairs: int = 4096
    """Teacher renders to make (the last --val-count are held out)."""
    teacher_steps: int = 25
    """Teacher denoising steps (match the SBPC job's --steps)."""
    guidance: float = 3.0
    """Teacher guidance (match the SBPC job's --guidance); the student has it baked in."""
    draft_steps: int = 2
    """Student denoising steps."""
    train_steps: int = 600
    """Student optimizer steps."""
    batch_size: int = 64
    """Pairs per teacher batch and per student step."""
    lr: float = 2e-4
    """Peak learning rate (warmup, then cosine decay)."""
    val_count: int = 256
    """Held-out pairs; the saved student is the one with the lowest held-out loss."""
    processes: int = 2
    """Pair-making processes (one torch thread each)."""
    threads: int = 2
    """Torch threads for training."""
    seed: int = 0
    """Seed of the training order."""
    init_student: str | None = None
    """A student from an earlier run to continue training (its UNet) instead of starting from the teacher's."""
    skip_pairs: bool = False
    """Only train (on the shards already in --pairs-dir)."""
    skip_training: bool = False
    """Do not train the student (use the one in --output)."""

    def __post_init__(self) -> None:
        for name in ("pairs", "teacher_steps", "draft_steps", "train_steps", "batch_size", "processes", "threads"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        require(self.guidance >= 0, "guidance", self.guidance, "must be >= 0")
        require(0 < self.val_count < self.pairs, "val_count", self.val_count, f"must be in 1 … {self.pairs - 1}")


def _make_pairs(cfg: DistillDraftConfig, start: int, count: int) -> list[str]:
    """One worker's share of the teacher renders (runs in a spawned process)."""
    import torch

    from sgmodel.pipeline import SceneGraphDiffusionPipeline
    from sgmodel.shapes.draft_distill import write_teacher_pairs

    torch.set_num_threads(1)
    teacher = SceneGraphDiffusionPipeline.from_pretrained(cfg.teacher)
    teacher.set_progress_bar_config(disable=True)
    paths = write_teacher_pairs(
        teacher, cfg.pairs_dir, stream=PAIR_STREAM, start=start, count=count, batch_size=cfg.batch_size,
        steps=cfg.teacher_steps, guidance=cfg.guidance, log=lambda m: print(f"[{start}] {m}", flush=True),
    )
    return [str(p) for p in paths]


def make_pairs(cfg: DistillDraftConfig) -> list[Path]:
    # Split on batch boundaries so each process's shards are whole batches.
    batches = -(-cfg.pairs // cfg.batch_size)
    per = -(-batches // cfg.processes) * cfg.batch_size
    shares = [(s, min(per, cfg.pairs - s)) for s in range(0, cfg.pairs, per)]
    if len(shares) == 1:
        return [Path(p) for p in _make_pairs(cfg, *shares[0])]
    with multiprocessing.get_context("spawn").Pool(len(shares)) as pool:
        results = pool.starmap(_make_pairs, [(cfg, s, c) for s, c in shares])
    return [Path(p) for paths in results for p in paths]


def run(cfg: DistillDraftConfig) -> dict:
    import torch

    from sgmodel.shapes.draft_distill import train_draft_student

    check_before_start(cfg)
    started = time.perf_counter()
    if not cfg.skip_pairs:
        print(f"== teacher pairs -> {cfg.pairs_dir}", flush=True)
        paths = make_pairs(cfg)
    else:
        paths = sorted(Path(cfg.pairs_dir).glob(f"pairs-{PAIR_STREAM:08d}-*.safetensors"))
        require(bool(paths), "pairs_dir", cfg.pairs_dir, "has no pair shards (run without --skip-pairs)")
    summary: dict = {"pair_shards": len(paths)}
    if not cfg.skip_training:
        print(f"== student -> {cfg.output}", flush=True)
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        summary = train_draft_student(
            cfg.teacher, paths, cfg.output, draft_steps=cfg.draft_steps, train_steps=cfg.train_steps,
            batch_size=cfg.batch_size, lr=cfg.lr, val_count=cfg.val_count, seed=cfg.seed,
            init_from=cfg.init_student, eval_every=max(1, min(50, cfg.train_steps // 4)), log=lambda m: print(m, flush=True),
        )
    print(f"== done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(DistillDraftConfig, lambda cfg: (run(cfg), 0), argv, "python -m jobs.distill_draft")


if __name__ == "__main__":
    sys.exit(main())
