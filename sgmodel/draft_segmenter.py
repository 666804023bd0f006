"""A draft segmenter: reads a seed's draft as the final image that seed will become, for draft SBPC.

Draft SBPC keeps the draft with the best recall and renders only that seed in full. A segmenter
trained on finished images misreads blurry drafts, so the draft ranking picks seeds whose final
images are worse than the best of N. FG-DM scores its *generated segmentation map*, which is made
to predict the image; here the segmenter learns the same thing after the fact: it is fine-tuned
on (draft of a seed -> the final segmenter's class map of that seed's full render), the very
teacher pairs the draft model was distilled from (:mod:`sgmodel.draft_distill`). Its recall on a
draft is then an estimate of the final image's recall. Final images are still scored by the
ordinary segmenter.

The result is a plain segmentation model folder (``AutoModelForSemanticSegmentation`` loads it)
with ``draft_segmenter.json`` naming the draft model and steps it learnt to read.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sgmodel.draft_distill import load_draft_model, load_pairs, shapes_graphs
from sgmodel.pipeline import SceneGraphDiffusionPipeline
from sgmodel.recall import SegmentationScorer
from sgmodel.shapes_segmenter import _lr_at, load_segmenter, pixel_values_from_tensor

DRAFT_SEGMENTER_FILE = "draft_segmenter.json"
"""Written into a draft segmenter's folder: the draft model and steps whose drafts it reads."""


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """Pipeline images [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], rounded as the jobs round them."""
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def draft_training_data(
    draft_pipe: SceneGraphDiffusionPipeline,
    draft_steps: int,
    scorer: SegmentationScorer,
    pairs: dict[str, Any],
    *,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Drafts of the pairs' noise and the final segmenter's class maps of the pairs' full renders.

    ``draft_pipe`` draws the drafts as the SBPC job does (its own steps, no guidance) and decodes
    the teacher's latents too: the student kept the teacher's VAE (identity for a pixel-space model).
    Returns uint8 drafts [N, H, W, 3] and uint8 labels [N, H, W].
    """
    graphs = shapes_graphs(pairs["stream"], pairs["index"].tolist())
    drafts, labels = [], []
    for start in range(0, len(graphs), batch_size):
        rows = slice(start, start + batch_size)
        out = draft_pipe(graphs[rows], num_inference_steps=draft_steps, guidance_scale=1.0,
                         latents=pairs["noise"][rows], output_type="pt").images
        drafts.append(_to_uint8(out))
        finals = _to_uint8(draft_pipe.decode(pairs["target"][rows]))
        labels.extend(scorer.segment(list(finals)))
    return np.concatenate(drafts), np.stack(labels)


def _tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, torch.from_numpy(labels).long()


def train_draft_segmenter(
    segmenter_dir: str | Path,
    draft_model_dir: str | Path,
    pair_paths: Sequence[Path],
    output_dir: str | Path,
    *,
    train_steps: int = 800,
    batch_size: int = 32,
    lr: float = 5e-4,
    val_count: int = 256,
    eval_every: int = 100,
    seed: int = 0,
    log=print,
) -> dict:
    """Fine-tune ``segmenter_dir`` on the drafts of ``draft_model_dir``; save the best (held-out loss).

    The last ``val_count`` pairs are held out. Besides the loss, validation measures what SBPC
    needs: the mean absolute difference between a draft's recall (this segmenter) and its final
    image's recall (the original segmenter), before and after training. Returns the summary
    (also saved).
    """
    started = time.perf_counter()
    pairs = load_pairs(pair_paths)
    n = len(pairs["index"])
    if n <= val_count + batch_size:
        raise ValueError(f"{n} pairs: need more than val_count + batch_size = {val_count + batch_size}")
    draft_pipe, draft = load_draft_model(draft_model_dir)
    final_scorer = SegmentationScorer.from_pretrained(segmenter_dir, load_kwargs={"local_files_only": True})
    images, labels = draft_training_data(draft_pipe, int(draft["draft_steps"]), final_scorer, pairs)
    log(f"{n} drafts and final class maps in {time.perf_counter() - started:.0f} s")
    graphs = shapes_graphs(pairs["stream"], pairs["index"].tolist())
    train_n = n - val_count
    val_graphs = graphs[train_n:]
    final_recall = np.array([r.recall for r in final_scorer.score_class_maps(labels[train_n:], val_graphs)])

    torch.manual_seed(seed)
    model, processor = load_segmenter(segmenter_dir)
    x_train, y_train = _tensors(images[:train_n], labels[:train_n])
    x_val, y_val = _tensors(images[train_n:], labels[train_n:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(pixel_values=pixel_values_from_tensor(x, processor)).logits
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, y)

    def validate() -> dict:
        scorer = SegmentationScorer(model, processor, batch_size=64)  # puts the model in eval mode
        with torch.no_grad():
            loss = sum(loss_of(x, y).item() * len(x) for x, y in zip(x_val.split(64), y_val.split(64))) / val_count
        draft_recall = np.array([r.recall for r in scorer.score(list(images[train_n:]), val_graphs)])
        model.train()
        return {"val_loss": loss, "recall_mae": float(np.abs(draft_recall - final_recall).mean())}

    history = [{"step": 0, **validate()}]
    log(f"step 0: {history[0]}")
    best = (history[0]["val_loss"], 0, {k: v.clone() for k, v in model.state_dict().items()})
    warmup = min(50, train_steps // 10)
    order = torch.randperm(train_n, generator=generator)
    position = 0
    for step in range(1, train_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step - 1, train_steps, lr, warmup)
        if position + batch_size > train_n:
            order, position = torch.randperm(train_n, generator=generator), 0
        rows = order[position:position + batch_size]
        position += batch_size
        x, y = x_train[rows], y_train[rows]
        flip = torch.rand(len(rows), generator=generator) < 0.5  # mirrored drafts have mirrored finals
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        loss = loss_of(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == train_steps:
            history.append({"step": step, "train_loss": loss.item(), **validate()})
            log(f"step {step}/{train_steps}: {history[-1]}")
            if history[-1]["val_loss"] < best[0]:
                best = (history[-1]["val_loss"], step, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    model.eval()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    info = {"draft_model": str(draft_model_dir), "draft_steps": int(draft["draft_steps"]),
            "final_segmenter": str(segmenter_dir)}
    (out / DRAFT_SEGMENTER_FILE).write_text(json.dumps(info, indent=2) + "\n")
    summary = {**info, "pairs": n, "held_out": val_count, "train_steps": train_steps, "batch_size": batch_size,
               "lr": lr, "best_step": best[1], "final_recall_mean": statistics.fmean(final_recall.tolist()),
               "history": history, "seconds": round(time.perf_counter() - started, 1)}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def read_draft_segmenter_config(model_dir: str | Path) -> dict | None:
    """``draft_segmenter.json`` of a draft segmenter, or None for an ordinary segmenter folder."""
    path = Path(model_dir) / DRAFT_SEGMENTER_FILE
    return json.loads(path.read_text()) if path.exists() else None
