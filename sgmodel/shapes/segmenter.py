"""The shapes-world segmenter: a small Segformer trained from scratch on rendered shapes.

Recall scoring needs a segmenter, no hub is reachable, and an untrained one makes recall
meaningless; so the project trains its own. Segformer predicts at 1/4 of its input, so the
image processor upsamples inputs to 128x128 and the 32x32 images of the demo diffusion model
get 32x32 logits. Training renders fresh graphs every batch (seeded) and augments them with
blur, noise, colour jitter and down/up-scaling so the segmenter also reads generated images.

The model is a plain ``SegformerForSemanticSegmentation`` folder (safetensors + configs), so
``AutoModelForSemanticSegmentation`` / ``AutoImageProcessor`` load it like any hub checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from transformers import SegformerConfig, SegformerForSemanticSegmentation
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

from sgmodel.optim import lr_factor
from sgmodel.shapes.world import CLASS_NAMES, object_class, shapes_sample

INPUT_SIZE = 128
"""Side the processor resizes every input to; logits come out at INPUT_SIZE / 4 = 32."""

EVAL_SEED = 1_000_003
"""Default seed of held-out evaluation renders; training seeds must differ (streams are keyed by seed)."""

DEFAULT_ARCH: dict[str, Any] = {
    "hidden_sizes": (32, 64, 96, 128),
    "depths": (1, 1, 1, 1),
    "num_attention_heads": (1, 2, 4, 8),
    "decoder_hidden_size": 64,
}
"""The committed checkpoint's size: ~0.8M parameters, ~3 MB in float32."""

TINY_ARCH: dict[str, Any] = {
    "hidden_sizes": (8, 16, 16, 32),
    "depths": (1, 1, 1, 1),
    "num_attention_heads": (1, 1, 2, 2),
    "decoder_hidden_size": 16,
}
"""A debug size for tests: the same code path, seconds to train."""


def segmenter_config(
    hidden_sizes: Sequence[int] = DEFAULT_ARCH["hidden_sizes"],
    depths: Sequence[int] = DEFAULT_ARCH["depths"],
    num_attention_heads: Sequence[int] = DEFAULT_ARCH["num_attention_heads"],
    decoder_hidden_size: int = DEFAULT_ARCH["decoder_hidden_size"],
) -> SegformerConfig:
    """A Segformer config for the shapes classes (id2label from :data:`CLASS_NAMES`), no dropout.

    Dropout and drop-path are off: training data is unlimited (fresh renders every batch).
    """
    if not (len(hidden_sizes) == len(depths) == len(num_attention_heads) == 4):
        raise ValueError(
            f"need 4 encoder stages, got hidden_sizes={hidden_sizes!r}, depths={depths!r}, "
            f"num_attention_heads={num_attention_heads!r}"
        )
    for h, n in zip(hidden_sizes, num_attention_heads):
        if h % n:
            raise ValueError(f"hidden size {h} is not divisible by its head count {n}")
    return SegformerConfig(
        num_labels=len(CLASS_NAMES),
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: i for i, name in enumerate(CLASS_NAMES)},
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        num_attention_heads=list(num_attention_heads),
        decoder_hidden_size=decoder_hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0,
        drop_path_rate=0.0,
    )


def build_processor(input_size: int = INPUT_SIZE) -> SegformerImageProcessorPil:
    """Resize to ``input_size`` (bilinear), rescale to [0, 1], ImageNet normalisation.

    The PIL backend is used directly (no torchvision here); its saved config names
    ``SegformerImageProcessor`` so ``AutoImageProcessor`` picks whichever backend is installed.
    """
    return SegformerImageProcessorPil(
        size={"height": input_size, "width": input_size}, do_reduce_labels=False, resample=Image.BILINEAR
    )


def pixel_values_from_tensor(images: torch.Tensor, processor: SegformerImageProcessorPil) -> torch.Tensor:
    """The processor's transform as batched torch ops (for training speed).

    images: float [B, 3, H, W] in [0, 1] -> pixel_values float [B, 3, S, S] (S = processor size).
    Matches the processor up to bilinear-resampling rounding (checked in the tests).
    """
    size = (processor.size["height"], processor.size["width"])
    x = F.interpolate(images, size=size, mode="bilinear", align_corners=False) if images.shape[-2:] != size else images
    mean = torch.tensor(processor.image_mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def load_segmenter(model_dir: str | Path) -> tuple[SegformerForSemanticSegmentation, SegformerImageProcessorPil]:
    """Model (eval mode) and processor from a local folder; never touches a hub."""
    model = SegformerForSemanticSegmentation.from_pretrained(str(model_dir), local_files_only=True)
    model.eval()
    processor = SegformerImageProcessorPil.from_pretrained(str(model_dir), local_files_only=True)
    return model, processor


@torch.no_grad()
def segment(
    model: SegformerForSemanticSegmentation,
    processor: SegformerImageProcessorPil,
    images: Sequence[Image.Image | np.ndarray],
) -> np.ndarray:
    """Class maps for same-sized RGB images: uint8 [B, H, W] (logits upsampled to the image size)."""
    if not images:
        raise ValueError("segment() needs at least one image")
    arrays = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(arrays[0].shape) != 3 or arrays[0].shape[2] != 3:
        raise ValueError(f"segment() needs same-sized RGB images [H, W, 3], got shapes {sorted(shapes)}")
    height, width = arrays[0].shape[:2]
    inputs = processor(images=arrays, return_tensors="pt")
    logits = model(pixel_values=inputs["pixel_values"]).logits  # [B, C, S/4, S/4]
    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- training data


def render_batch(seed: int, start: int, batch_size: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Records ``start .. start+batch_size`` of the shapes stream ``seed``.

    Returns images float [B, 3, H, W] in [0, 1] and class maps long [B, H, W].
    """
    images, maps = [], []
    for i in range(start, start + batch_size):
        _, out = shapes_sample(seed, i, image_size)
        images.append(np.asarray(out.image))
        maps.append(out.class_map)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.from_numpy(np.stack(maps)).long()


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one image [3, H, W] with reflect padding."""
    k = _gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    y = F.pad(x[None], (r, r, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    y = F.pad(y, (0, 0, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    return y[0]


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Degrade renders towards what a small diffusion model makes; labels are unchanged.

    images: float [B, 3, H, W] in [0, 1] -> same shape. Per image, independently: colour
    jitter (brightness, contrast, saturation, per-channel gain; p=0.8), down-then-up scaling
    to 50-80% (p=0.2), Gaussian blur with sigma up to 1 px (p=0.5), Gaussian noise with std up
    to 0.1 (p=0.5). About 1 in 8 images stays clean.
    """

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    out = []
    _, _, h, w = images.shape
    for x in images:
        if u(0, 1) < 0.8:
            x = x * u(0.8, 1.2)
            mean = x.mean()
            x = (x - mean) * u(0.75, 1.25) + mean
            grey = x.mean(dim=0, keepdim=True)
            x = (x - grey) * u(0.7, 1.3) + grey
            gain = 1 + 0.08 * (2 * torch.rand(3, 1, 1, generator=generator) - 1)
            x = x * gain
        if u(0, 1) < 0.2:
            f = u(0.5, 0.8)
            small_size = (max(4, round(h * f)), max(4, round(w * f)))
            small = F.interpolate(x[None], size=small_size, mode="bilinear", antialias=True, align_corners=False)
            x = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
        if u(0, 1) < 0.5:
            x = _blur(x, u(0.3, 1.0) * h / 32)
        if u(0, 1) < 0.5:
            x = x + torch.randn(x.shape, generator=generator) * u(0.0, 0.1)
        out.append(x.clamp(0, 1))
    return torch.stack(out)


# ----------------------------------------------------------------------------- training


def train_segmenter(
    output_dir: str | Path,
    steps: int = 2000,
    batch_size: int = 32,
    seed: int = 0,
    image_size: int = 32,
    lr: float = 2e-3,
    log_every: int = 50,
    weight_decay: float = 0.01,
    warmup_steps: int | None = None,
    input_size: int = INPUT_SIZE,
    arch: dict[str, Any] | None = None,
    augmentation: bool = True,
    num_threads: int = 2,
    eval_count: int = 0,
    eval_seed: int = EVAL_SEED,
) -> dict[str, Any]:
    """Train a shapes segmenter from scratch and save it (safetensors + processor) in ``output_dir``.

    Seeded and reproducible on one machine: weights from ``torch.manual_seed(seed)``, batch
    ``k`` is records ``k*batch_size ...`` of shapes stream ``seed``, augmentation from a torch
    generator seeded with ``seed``. Logs ``step/loss/pixel_acc/lr/seconds`` lines to stdout.
    With ``eval_count > 0`` the saved model is evaluated on held-out renders of ``eval_seed``.
    Returns a summary (also written to ``output_dir/training_summary.json``).
    """
    if steps < 1 or batch_size < 1 or log_every < 1:
        raise ValueError(f"steps, batch_size and log_every must be >= 1, got {steps!r}, {batch_size!r}, {log_every!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if image_size < 8 or input_size % 4:
        raise ValueError(f"need image_size >= 8 and input_size divisible by 4, got {image_size!r}, {input_size!r}")
    if eval_count and eval_seed == seed:
        raise ValueError(f"eval_seed must differ from the training seed ({seed!r}) to be held out")
    torch.set_num_threads(max(1, min(num_threads, torch.get_num_threads())))
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    arch = {**DEFAULT_ARCH, **(arch or {})}
    model = SegformerForSemanticSegmentation(segmenter_config(**arch))
    processor = build_processor(input_size)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    warmup = warmup_steps if warmup_steps is not None else min(200, max(1, steps // 10))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"segmenter: {n_params} parameters, arch={arch}, steps={steps}, batch_size={batch_size}, "
        f"seed={seed}, image_size={image_size}, input_size={input_size}, lr={lr}",
        flush=True,
    )
    start = time.perf_counter()
    window_loss, window_correct, window_pixels, window_n = 0.0, 0, 0, 0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, steps, min_ratio=0.05)
        images, labels = render_batch(seed, step * batch_size, batch_size, image_size)
        if augmentation:
            images = augment(images, generator)
        logits = model(pixel_values=pixel_values_from_tensor(images, processor)).logits  # [B, C, S/4, S/4]
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window_loss += loss.item()
        window_n += 1
        window_correct += int((logits.argmax(1) == labels).sum())
        window_pixels += labels.numel()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(
                f"step {step + 1}/{steps} loss {window_loss / window_n:.4f} "
                f"pixel_acc {window_correct / window_pixels:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"elapsed {time.perf_counter() - start:.1f}s",
                flush=True,
            )
            window_loss, window_correct, window_pixels, window_n = 0.0, 0, 0, 0
    train_seconds = time.perf_counter() - start
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    summary: dict[str, Any] = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "image_size": image_size,
        "input_size": input_size,
        "lr": lr,
        "arch": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in arch.items()},
        "augmentation": augmentation,
        "parameters": n_params,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "train_seconds": round(train_seconds, 1),
    }
    if eval_count:
        summary["eval"] = evaluate_segmenter(out, count=eval_count, seed=eval_seed, size=image_size)
        print(f"held-out eval: {json.dumps(summary['eval'])}", flush=True)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved to {out} after {train_seconds:.1f}s", flush=True)
    return summary


# ----------------------------------------------------------------------------- evaluation


def evaluate_segmenter(
    model_dir: str | Path,
    count: int = 200,
    seed: int = EVAL_SEED,
    size: int = 32,
    min_coverage: float = 0.5,
    batch_size: int = 50,
    degraded: bool = False,
) -> dict[str, Any]:
    """Pixel accuracy and object recall on clean renders of shapes stream ``seed`` (held out from training).

    ``degraded=True`` first passes the renders through the training augmentation (seeded by
    ``seed``): a proxy for how the segmenter reads blurry, noisy generated images.

    An object counts as found when the predicted pixels of its class (colour + shape) cover at
    least ``min_coverage`` of its ground-truth pixels; those pixels necessarily belong to the
    class's connected components that touch the object, so this is "the component covering
    the object overlaps it enough". ``mean_object_iou`` is the IoU of the object with the union
    of those components. ``spurious_per_image`` counts predicted components (>= 1% of the image)
    that touch no ground-truth object of their class: hallucinated objects.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count!r}")
    model, processor = load_segmenter(model_dir)
    generator = torch.Generator().manual_seed(seed)
    correct = pixels = fg_correct = fg_pixels = found = objects = spurious = 0
    ious: list[float] = []
    min_area = max(1, round(0.01 * size * size))
    for begin in range(0, count, batch_size):
        samples = [shapes_sample(seed, i, size) for i in range(begin, min(count, begin + batch_size))]
        images: list[Any] = [out.image for _, out in samples]
        if degraded:
            x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
            x = augment(x, generator)
            images = list((x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        preds = segment(model, processor, images)
        for (graph, out), pred in zip(samples, preds):
            gt = out.class_map
            correct += int((pred == gt).sum())
            pixels += gt.size
            fg = gt > 0
            fg_correct += int((pred[fg] == gt[fg]).sum())
            fg_pixels += int(fg.sum())
            for idx, obj in enumerate(graph.objects):
                region = out.instance_map == idx + 1
                cls = object_class(obj)
                objects += 1
                if not region.any():  # pragma: no cover - objects are >= 6 px wide
                    continue
                hit = (pred == cls) & region
                found += int(hit.sum() >= min_coverage * region.sum())
                components, _ = ndimage.label(pred == cls)
                touching = np.setdiff1d(np.unique(components[hit]), [0])
                covered = np.isin(components, touching)
                ious.append(float((covered & region).sum() / max(1, (covered | region).sum())))
            for cls in np.setdiff1d(np.unique(pred), [0]):
                components, n = ndimage.label(pred == cls)
                for c in range(1, n + 1):
                    comp = components == c
                    if comp.sum() >= min_area and not (gt[comp] == cls).any():
                        spurious += 1
    return {
        "images": count,
        "objects": objects,
        "seed": seed,
        "size": size,
        "pixel_accuracy": round(correct / pixels, 4),
        "foreground_pixel_accuracy": round(fg_correct / max(1, fg_pixels), 4),
        "object_recall": round(found / max(1, objects), 4),
        "mean_object_iou": round(float(np.mean(ious)) if ious else 0.0, 4),
        "spurious_per_image": round(spurious / count, 4),
        "min_coverage": min_coverage,
        "degraded": degraded,
    }


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m sgmodel.shapes.segmenter --output DIR --steps N``: train, save, evaluate."""
    parser = argparse.ArgumentParser(prog="python -m sgmodel.shapes.segmenter", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder to save the model and processor in")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="renders per step")
    parser.add_argument("--seed", type=int, default=0, help="training seed (weights, graphs, augmentation)")
    parser.add_argument("--image-size", type=int, default=32, help="render side in pixels")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (at most)")
    parser.add_argument("--eval-count", type=int, default=200, help="held-out renders to evaluate on (0: skip)")
    parser.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="seed of the held-out renders")
    parser.add_argument("--tiny", action="store_true", help="debug-size model (tests, smoke runs)")
    args = parser.parse_args(argv)
    summary = train_segmenter(
        args.output,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        image_size=args.image_size,
        lr=args.lr,
        log_every=args.log_every,
        num_threads=args.threads,
        eval_count=args.eval_count,
        eval_seed=args.eval_seed,
        arch=TINY_ARCH if args.tiny else None,
    )
    summary["command"] = " ".join(["python -m sgmodel.shapes.segmenter", *(argv if argv is not None else sys.argv[1:])])
    (Path(args.output) / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
