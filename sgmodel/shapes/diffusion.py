"""Train the shapes-world scene-graph diffusion model (the project's offline demo default).

The model is the ``demo`` flavour of :mod:`sgmodel.shapes.flavours` (pixel space, 32x32, ``tokens``
conditioning), trained from scratch with :mod:`sgmodel.train` on shapes rendered on the fly:
every step sees fresh graphs, so the model cannot memorise a finite set. Graph-only conditioning:
the shapes captions are dropped so the model has to read the scene graph.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgmodel.graph import SceneGraph
from sgmodel.optim import EMA, trainable_named
from sgmodel.shapes.flavours import build_pipeline
from sgmodel.shapes.world import COLOURS, PREDICATES, SHAPES, SIZES, shapes_sample
from sgmodel.train import DiffusionTrainingModule, StepLog, TrainConfig, fit

VOCABULARY = [*SHAPES, *COLOURS, *SIZES, *PREDICATES, "inside", "surrounding", "background", "a", "and"]
"""Words the demo tokenizer knows; anything else becomes [UNK]."""


def shapes_batches(seed: int, batch_size: int, size: int, start_index: int = 0) -> Iterator[tuple[list[SceneGraph], torch.Tensor]]:
    """(graphs without captions, images [B, 3, size, size] in [-1, 1]) from shapes stream ``seed``, forever."""
    index = start_index
    while True:
        graphs, images = [], []
        for _ in range(batch_size):
            graph, out = shapes_sample(seed, index, size)
            index += 1
            graphs.append(replace(graph, caption=None))
            images.append(np.asarray(out.image, dtype=np.float32))
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
        yield graphs, pixels


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Render the next batches in a thread while the current step trains (PIL releases the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)

    def work() -> None:
        for item in iterator:
            q.put(item)

    threading.Thread(target=work, daemon=True).start()
    while True:
        yield q.get()


def train_diffusion(
    output_dir: str | Path,
    steps: int = 2500,
    batch_size: int = 64,
    seed: int = 0,
    lr: float = 1e-3,
    warmup_steps: int = 100,
    ema_decay: float | None = 0.999,
    flavour: str = "demo",
    image_size: int | None = None,
    log_every: int = 25,
    save_every: int = 500,
    num_threads: int = 2,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Train from scratch and save a SceneGraphDiffusionPipeline (EMA weights) to ``output_dir``.

    Seeded: weights from ``seed``, batch k is records k*batch_size… of shapes stream ``seed``.
    ``precision="bf16"`` trains under CPU/GPU autocast (weights stay fp32).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps!r}, {batch_size!r}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    torch.set_num_threads(max(1, num_threads))
    output_dir = Path(output_dir)
    pipe = build_pipeline(flavour, VOCABULARY, conditioning="tokens", seed=seed, use_caption=False)
    size = image_size or pipe.default_size
    config = TrainConfig(trainable="all", cond_dropout=0.1)
    module = DiffusionTrainingModule(pipe, config)
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    print(f"training {flavour} scene-graph diffusion: {n_params / 1e6:.2f}M trainable parameters, "
          f"{steps} steps x {batch_size} at {size}px, seed {seed}", flush=True)
    started = time.perf_counter()
    history: list[dict[str, Any]] = []

    def log(entry: StepLog) -> None:
        elapsed = time.perf_counter() - started
        history.append({"step": entry.step, **entry.losses, "lr": entry.lr, "samples_per_s": entry.samples_per_s})
        print(f"step {entry.step}/{steps} loss {entry.losses['loss_total']:.4f} lr {entry.lr:.2e} "
              f"{entry.samples_per_s:.1f} samples/s elapsed {elapsed / 60:.1f} min", flush=True)

    batches = prefetch(shapes_batches(seed, batch_size, size))
    autocast = torch.autocast(pipe.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    optimizer, ema = None, None
    done = 0
    while done < steps:  # in chunks, so a long run leaves usable checkpoints behind
        chunk_end = min(steps, done + save_every)
        with autocast:
            optimizer, ema = fit(
                module, batches, steps=chunk_end, lr=lr, warmup_steps=warmup_steps, seed=seed, ema_decay=ema_decay,
                log_every=log_every, on_log=log, start_step=done, optimizer=optimizer, ema=ema, total_steps=steps,
            )
        done = chunk_end
        _save(pipe, module, ema, output_dir)
        print(f"saved {output_dir} at step {done}", flush=True)
    summary = {
        "steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "ema_decay": ema_decay, "flavour": flavour,
        "image_size": size, "precision": precision, "trainable_parameters": n_params,
        "minutes": round((time.perf_counter() - started) / 60, 1), "history": history,
    }
    (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _save(pipe, module: DiffusionTrainingModule, ema: EMA | None, output_dir: Path) -> None:
    """Save with the EMA weights swapped in; the raw weights come back to keep training."""
    with ema.applied(trainable_named(module)) if ema is not None else contextlib.nullcontext():
        pipe.save_pretrained(output_dir)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m sgmodel.shapes.diffusion", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder for the pipeline")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--flavour", default="demo", help="model size from sgmodel.shapes.flavours (debug for smoke runs)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    return train_diffusion(
        args.output, steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr, flavour=args.flavour,
        precision=args.precision, log_every=args.log_every, save_every=args.save_every, num_threads=args.threads,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
