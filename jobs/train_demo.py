"""Train the offline demo checkpoints from scratch: the shapes segmenter, then the shapes diffusion model.

    nohup python -m jobs.train_demo --output out/demo-base > train_demo.log 2>&1 &     # ~1 h 45 min on 2 idle CPU cores

Seeded and reproducible (same seed, same thread counts). Writes ``{output}/shapes-segmenter`` and
``{output}/shapes-sg-diffusion``, a tokens-conditioned model: the base that ``jobs.finetune
--conditioning gated`` turns into the layout-grounded demo model (recipe in docs/benchmarks.md). The
log shows progress lines for both. ``--tiny`` runs the same code on debug-size models (CI smoke test).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from jobs.common import job_main
from jobs.config import require
from jobs.preflight import check_before_start


@dataclass(kw_only=True)
class TrainDemoConfig:
    """Train the shapes segmenter and the shapes scene-graph diffusion model from scratch."""

    output: str = "out/demo-base"
    """Folder that receives shapes-segmenter/ and shapes-sg-diffusion/."""
    seed: int = 0
    """Seed of both trainings (weights, data stream, augmentation)."""
    segmenter_steps: int = 2000
    """Segmenter optimizer steps (batch 32)."""
    segmenter_threads: int = 1
    """Torch threads for the segmenter (the committed checkpoint used 1)."""
    diffusion_steps: int = 2400
    """Diffusion optimizer steps (batch 64)."""
    diffusion_batch_size: int = 64
    """Diffusion batch size."""
    diffusion_threads: int = 2
    """Torch threads for the diffusion model."""
    tiny: bool = False
    """Debug-size models (for smoke tests): same code, seconds instead of hours."""
    skip_segmenter: bool = False
    """Train only the diffusion model."""
    skip_diffusion: bool = False
    """Train only the segmenter."""

    def __post_init__(self) -> None:
        for name in ("segmenter_steps", "diffusion_steps", "diffusion_batch_size", "segmenter_threads",
                     "diffusion_threads"):
            require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")


def run(cfg: TrainDemoConfig) -> dict:
    from sgmodel.shapes.diffusion import train_diffusion
    from sgmodel.shapes.segmenter import TINY_ARCH, train_segmenter

    check_before_start(cfg)
    out = Path(cfg.output)
    results = {}
    started = time.perf_counter()
    if not cfg.skip_segmenter:
        print(f"== segmenter -> {out / 'shapes-segmenter'}", flush=True)
        results["segmenter"] = train_segmenter(
            out / "shapes-segmenter", steps=cfg.segmenter_steps, seed=cfg.seed, num_threads=cfg.segmenter_threads,
            arch=TINY_ARCH if cfg.tiny else None, eval_count=16 if cfg.tiny else 300,
            log_every=1 if cfg.tiny else 50,
        )
    if not cfg.skip_diffusion:
        print(f"== diffusion -> {out / 'shapes-sg-diffusion'}", flush=True)
        results["diffusion"] = train_diffusion(
            out / "shapes-sg-diffusion", steps=cfg.diffusion_steps, seed=cfg.seed,
            batch_size=min(cfg.diffusion_batch_size, 4) if cfg.tiny else cfg.diffusion_batch_size,
            flavour="debug" if cfg.tiny else "demo", num_threads=cfg.diffusion_threads,
            log_every=1 if cfg.tiny else 25, save_every=cfg.diffusion_steps if cfg.tiny else 400,
        )
    print(f"== done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(TrainDemoConfig, lambda cfg: (run(cfg), 0), argv, "python -m jobs.train_demo")


if __name__ == "__main__":
    sys.exit(main())
