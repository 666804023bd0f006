"""Distil a few-step draft model from a scene-graph diffusion model, for draft SBPC.

Draft SBPC scores cheap candidates and renders only the winning seed in full. A truncated run of the
full model (few DDIM steps) ranks seeds poorly, because its images are not the images those seeds
give at full steps. This module trains a *student* that maps a seed's noise to the teacher's own
full render of that seed (Luhman & Luhman 2021, "Knowledge distillation in iterative generative
models"), in ``draft_steps`` steps and without classifier-free guidance (the teacher's guidance is
baked in), so the draft of a seed looks like that seed's final image.

- :func:`write_teacher_pairs`: (graph index, noise, teacher's denoised latents) shards, safetensors.
- :func:`train_draft_student`: the student starts from the teacher's UNet, predicts the clean
  sample (``prediction_type="sample"``: at t=T an epsilon model cannot say much about x0) and is
  trained through its own ``draft_steps``-step DDIM chain, each step's x0 against the target.
  The result is a normal pipeline folder (``from_pretrained``) with ``draft.json`` saying how to
  call it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sgmodel.draft import DRAFT_FILE, read_draft_config
from sgmodel.fingerprint import model_fingerprint
from sgmodel.graph import SceneGraph
from sgmodel.optim import lr_factor
from sgmodel.pipeline import SceneGraphDiffusionPipeline
from sgmodel.shapes.world import shapes_sample


def shapes_graphs(stream: int, indices: Sequence[int]) -> list[SceneGraph]:
    """Graphs of shapes stream ``stream`` as users give them: no boxes, no caption (a layout-grounded
    teacher draws each pair's layout from the pair's seed, and the student, with the same conditioner,
    draws the same one)."""
    size = 32  # the graph does not depend on the render size
    graphs = [shapes_sample(stream, int(i), size)[0] for i in indices]
    return [replace(g, caption=None, objects=tuple(replace(o, box=None) for o in g.objects)) for g in graphs]


def pair_seed(stream: int, index: int) -> int:
    """Noise seed of pair ``index``: disjoint from the SBPC jobs' derived seeds only by chance, like any seed."""
    return (stream * 1_000_003 + index) % 2**63


def write_teacher_pairs(
    teacher: SceneGraphDiffusionPipeline,
    output_dir: str | Path,
    *,
    stream: int,
    start: int,
    count: int,
    batch_size: int = 64,
    steps: int = 25,
    guidance: float = 3.0,
    log=print,
) -> list[Path]:
    """Render graphs ``start … start+count-1`` of shapes stream ``stream`` with the teacher and save
    ``{output_dir}/pairs-{stream:08d}-{first:08d}.safetensors`` per batch (index, noise, target).

    Existing shards are kept (a rerun only fills what is missing).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    height = width = teacher.default_size
    written: list[Path] = []
    started, rendered = time.perf_counter(), 0
    for first in range(start, start + count, batch_size):
        indices = list(range(first, min(first + batch_size, start + count)))
        path = out / f"pairs-{stream:08d}-{first:08d}.safetensors"
        written.append(path)
        if path.exists():
            continue
        seeds = [pair_seed(stream, i) for i in indices]
        noise = teacher.initial_noise(seeds, height, width)
        target = teacher(shapes_graphs(stream, indices), num_inference_steps=steps, guidance_scale=guidance,
                         seeds=seeds, latents=noise, output_type="latent").images
        tmp = path.with_suffix(".tmp")
        save_file({"index": torch.tensor(indices), "noise": noise.contiguous(), "target": target.contiguous()},
                  str(tmp), metadata={"stream": str(stream), "steps": str(steps), "guidance": str(guidance)})
        tmp.rename(path)  # a killed run never leaves a half-written shard under the final name
        rendered += len(indices)
        log(f"pairs {indices[-1] + 1 - start}/{count} ({(time.perf_counter() - started) / rendered:.2f} s/pair)")
    return written


def load_pairs(paths: Sequence[Path]) -> dict[str, Any]:
    """Concatenate pair shards; all must come from one stream, step count and guidance."""
    parts = [load_file(str(p)) for p in paths]
    metas = set()
    for p in paths:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata()
        metas.add((meta["stream"], meta["steps"], meta["guidance"]))
    if len(metas) != 1:
        raise ValueError(f"pair shards mix streams/steps/guidance: {sorted(metas)}")
    stream, steps, guidance = metas.pop()
    return {
        "index": torch.cat([p["index"] for p in parts]),
        "noise": torch.cat([p["noise"] for p in parts]),
        "target": torch.cat([p["target"] for p in parts]),
        "stream": int(stream), "steps": int(steps), "guidance": float(guidance),
    }


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def _draft_chain(pipe: SceneGraphDiffusionPipeline, noise: torch.Tensor, unet_kwargs: dict,
                 draft_steps: int, canvas: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The student's own DDIM chain from ``noise``, as the pipeline runs it.

    Returns each step's clean-sample prediction (raw: the training targets them, with gradients
    through the whole chain, so step 2 learns on the inputs step 1 really gives it) and the chain's
    output (x0 clipped and re-noised to the last timestep: what the pipeline returns).
    """
    scheduler = pipe.scheduler
    scheduler.set_timesteps(draft_steps)
    x = noise * scheduler.init_noise_sigma
    predictions = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        if canvas is not None:
            model_input = torch.cat([model_input, canvas], dim=1)
        x0 = pipe.unet(model_input, t, **unet_kwargs).sample
        predictions.append(x0)
        x = scheduler.step(x0, t, x).prev_sample
    return predictions, x


def draft_student(teacher_dir: str | Path) -> SceneGraphDiffusionPipeline:
    """The teacher pipeline with a clean-sample-predicting DDIM scheduler: the student before training."""
    pipe = SceneGraphDiffusionPipeline.from_pretrained(str(teacher_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    return pipe


def train_draft_student(
    teacher_dir: str | Path,
    pair_paths: Sequence[Path],
    output_dir: str | Path,
    *,
    draft_steps: int = 2,
    train_steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-4,
    warmup_steps: int = 30,
    val_count: int = 256,
    eval_every: int = 50,
    seed: int = 0,
    init_from: str | Path | None = None,
    log=print,
) -> dict:
    """Train the student on teacher pairs and save the best (lowest held-out loss) as a pipeline folder.

    Only the UNet learns; graph encoder, conditioner and text model stay the teacher's, so a graph's
    condition is the same in draft and final. ``init_from``: a student saved by this function to
    continue from (its UNet; same draft steps) instead of the teacher's UNet. Returns the training
    summary (also saved).
    """
    pairs = load_pairs(pair_paths)
    n = len(pairs["index"])
    if n <= val_count + batch_size:
        raise ValueError(f"{n} pairs: need more than val_count + batch_size = {val_count + batch_size}")
    graphs = shapes_graphs(pairs["stream"], pairs["index"].tolist())
    pipe = draft_student(teacher_dir)
    earlier_steps = 0
    if init_from is not None:
        earlier_steps = _continue_from(pipe, init_from, draft_steps)
    for module in (pipe.text_encoder, pipe.graph_encoder, pipe.conditioner):
        module.requires_grad_(False).eval()
    unet = pipe.unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, train_steps))
    generator = torch.Generator().manual_seed(seed)
    train_n = n - val_count  # the last val_count pairs are held out

    seeds = [pair_seed(pairs["stream"], int(i)) for i in pairs["index"].tolist()]

    def loss_on(rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        chosen = rows.tolist()
        with torch.no_grad():  # the teacher's condition and layout for each pair's graph and seed
            batch = [graphs[i] for i in chosen]
            cond = pipe.conditioner.draw_layouts(pipe.encode(batch), batch, list(range(len(batch))),
                                                 [seeds[i] for i in chosen])
            size = pairs["noise"].shape[-2:]
            canvas = cond.canvas(*size)
        predictions, output = _draft_chain(pipe, pairs["noise"][rows], cond.unet_kwargs(), draft_steps, canvas)
        target = pairs["target"][rows]
        loss = sum(torch.nn.functional.mse_loss(x0, target) for x0 in predictions) / len(predictions)
        return loss, torch.nn.functional.mse_loss(output, target).item()

    def validate() -> float:
        unet.eval()
        with torch.no_grad():
            rows = torch.arange(train_n, n)
            errors = [loss_on(chunk)[1] * len(chunk) for chunk in rows.split(batch_size)]
        unet.train()
        return sum(errors) / val_count

    history = [{"step": 0, "val_mse": validate()}]
    log(f"step 0: held-out draft MSE {history[0]['val_mse']:.4f}")
    best = (history[0]["val_mse"], 0, {k: v.clone() for k, v in unet.state_dict().items()})
    started = time.perf_counter()
    batches = _batches(train_n, batch_size, generator)
    for step in range(1, train_steps + 1):
        loss, _ = loss_on(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == train_steps:
            val = validate()
            history.append({"step": step, "train_loss": loss.item(), "val_mse": val})
            log(f"step {step}/{train_steps}: train {loss.item():.4f}, held-out draft MSE {val:.4f} "
                f"({(time.perf_counter() - started) / step:.2f} s/step)")
            if val < best[0]:
                best = (val, step, {k: v.clone() for k, v in unet.state_dict().items()})
    unet.load_state_dict(best[2])
    unet.eval()
    out = Path(output_dir)
    pipe.save_pretrained(str(out), safe_serialization=True)
    draft = {"teacher": str(teacher_dir), "teacher_fingerprint": model_fingerprint(str(teacher_dir)),
             "teacher_steps": pairs["steps"], "guidance": pairs["guidance"], "draft_steps": draft_steps}
    (out / DRAFT_FILE).write_text(json.dumps(draft, indent=2) + "\n")
    summary = {**draft, "pairs": n, "held_out": val_count, "train_steps": train_steps, "batch_size": batch_size,
               "lr": lr, "init_from": str(init_from) if init_from is not None else None,
               "total_train_steps": earlier_steps + train_steps, "best_step": best[1], "best_val_mse": best[0], "history": history,
               "seconds": round(time.perf_counter() - started, 1)}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _continue_from(pipe: SceneGraphDiffusionPipeline, student_dir: str | Path, draft_steps: int) -> int:
    """Load an earlier student's UNet into ``pipe``; returns the optimizer steps it had already had."""
    from diffusers import UNet2DConditionModel

    config = read_draft_config(student_dir)
    if config is None or config["draft_steps"] != draft_steps:
        raise ValueError(f"{student_dir}: not a {draft_steps}-step draft student (draft.json: {config})")
    unet = UNet2DConditionModel.from_pretrained(str(Path(student_dir) / "unet"), use_safetensors=True)
    pipe.unet.load_state_dict(unet.state_dict())
    summary = Path(student_dir) / "training_summary.json"
    earlier = json.loads(summary.read_text()) if summary.exists() else {}
    return int(earlier.get("total_train_steps", earlier.get("train_steps", 0)))
