"""Train a small CLIP on the shapes world: the image encoder the alignment losses need, made offline.

CLIP-guided scene-graph diffusion aligns the graph's global vector with a CLIP image embedding of
the training image. No CLIP can be downloaded here, so this trains one on shapes renders and their
captions (contrastive, symmetric InfoNCE, both towers from configs) and saves the image tower as a
``CLIPVisionModelWithProjection`` folder, which ``jobs.finetune --image-encoder`` loads like any
hub checkpoint.

    python -m sgmodel.shapes.clip --output /tmp/shapes-clip        # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sgmodel.losses import contrastive_alignment_loss
from sgmodel.optim import lr_factor
from sgmodel.shapes.diffusion import VOCABULARY
from sgmodel.shapes.tokenizer import build_word_tokenizer
from sgmodel.shapes.world import shapes_sample
from sgmodel.train import CLIP_MEAN, CLIP_STD

CLIP_STREAM = 11
"""Shapes stream of the CLIP training pairs (not the diffusion models' training stream 0)."""


def build_towers(image_size: int = 32, dim: int = 64, projection_dim: int = 64, vocab_size: int = 64):
    """A small CLIP image tower and text tower, from configs."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=image_size, patch_size=4, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=3,
        num_attention_heads=4, projection_dim=projection_dim,
    ))
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, projection_dim=projection_dim, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ))
    return vision, text


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> CLIP-normalised float [B, 3, H, W] (as the alignment loss feeds the encoder)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def train_clip(output_dir: str | Path, steps: int = 800, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
               image_size: int = 32, log_every: int = 50) -> dict[str, Any]:
    """Train both towers on fresh shapes pairs every step; save the image tower to ``output_dir``."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(VOCABULARY, model_max_length=64)
    vision, text = build_towers(image_size, vocab_size=len(tokenizer))
    params = list(vision.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    history, started, index = [], time.perf_counter(), 0
    for step in range(steps):
        images, captions = [], []
        for _ in range(batch_size):
            graph, render = shapes_sample(CLIP_STREAM, index, image_size)
            index += 1
            images.append(np.asarray(render.image))
            captions.append(graph.caption or "")
        tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, min(100, steps // 10), steps)
        image_emb = vision(pixel_values=pixel_values(np.stack(images))).image_embeds
        text_emb = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds
        loss = contrastive_alignment_loss(image_emb, text_emb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            with torch.no_grad():
                hits = (F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T).argmax(1)
                top1 = float((hits == torch.arange(len(hits))).float().mean())
            history.append({"step": step + 1, "loss": float(loss), "caption_top1": top1})
            print(f"step {step + 1}/{steps} loss {float(loss):.3f} image->caption top-1 {top1:.2f}", flush=True)
    out = Path(output_dir)
    vision.save_pretrained(out, safe_serialization=True)
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "stream": CLIP_STREAM,
               "image_size": image_size, "seconds": round(time.perf_counter() - started, 1), "history": history}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m sgmodel.shapes.clip", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder for the CLIPVisionModelWithProjection")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return train_clip(args.output, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)


if __name__ == "__main__":
    main()
