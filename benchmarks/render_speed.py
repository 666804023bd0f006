"""How fast does the pipeline render, against what this machine can do? Settings side by side.

    python benchmarks/render_speed.py [--model models/shapes-sg-diffusion] [--batch-size 16] [--batches 4]
        [--steps 25] [--threads 2] [--skip-compile] [--against DIR]

The bare pipeline loop (what a generator actor runs: ``pipe(graphs, num_inference_steps=S,
guidance_scale=3, seeds=..., output_type="np")``) on held-out shapes graphs, batch after batch,
once per setting, settings interleaved round by round so background load hits them alike:

- ``default``: the pipeline's defaults: fp32, eager, contiguous weights, the model's attention
  processor, inference mode, one batched UNet call for both guidance halves;
- ``channels_last``: the UNet in channels-last memory format (the job's ``--memory-format channels_last``);
- ``compile``: ``torch.compile`` of the UNet (inductor; its compile time is reported, not timed);
- ``compile + channels_last``: both;
- ``compile, frozen``: ``torch.compile`` with inductor's ``freezing``: weights folded in as constants,
  convolution and linear weights prepacked for oneDNN (inference only; the job's ``--compile`` on CPU);
- ``compile, frozen + channels_last + separate CFG``: the frozen compile with the other two exact settings;
- ``bf16``: CPU autocast to bfloat16 (only where the CPU has native bf16 support);
- ``no SDPA``: diffusers' classic attention processor instead of PyTorch's scaled_dot_product_attention;
- ``separate CFG``: conditional and unconditional passes as two UNet calls instead of one batch
  (the pipeline's ``separate_guidance_passes``; the job's ``--guidance-passes``);
- ``separate CFG + compile + channels_last``: all three;
- with ``--against DIR``, another pipeline folder, eager and frozen-compiled, on the same graphs and
  seeds: the same model reshaped and fine-tuned (e.g. ``jobs.finetune --attention-heads 1``) renders
  other images, so its pixel difference is not reported; compare its quality with
  ``benchmarks/shapes_quality.py --model DIR``.

Prints images/s per setting and its ratio to ``default``, the largest pixel difference from the
default's images (0-255; a setting is usable as a default only within ``--tolerance``), the model's
FLOPs per image counted by ``torch.utils.flop_counter`` over one whole call (attention's share
among them), the ops that take the most time (``torch.profiler``), and the fraction of the
machine's measured peak (a large fp32 matmul, best of a few) the pipeline reaches.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sgmodel.graph import derive_seed  # noqa: E402
from sgmodel.pipeline import SceneGraphDiffusionPipeline  # noqa: E402
from sgmodel.shapes.quality import HELD_OUT_SEED, held_out_graphs  # noqa: E402


def peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul rate of this process's threads: the roof the pipeline is measured against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def bf16_supported() -> bool:
    """Native bf16 on this CPU (AVX512-BF16 / AMX): elsewhere autocast emulates it, slower than fp32."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def flops_per_image(pipe: SceneGraphDiffusionPipeline, graphs, steps: int) -> tuple[float, float]:
    """Model FLOPs per image and the attention's share of them. Counted with the math attention
    backend: torch.utils.flop_counter has no formula for the CPU flash kernel, whose FLOPs it would
    leave out; the math backend's batched matmuls are the same products."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        pipe(graphs, num_inference_steps=steps, seeds=list(range(len(graphs))), output_type="np")
    total = counter.get_total_flops()
    attention = sum(v for k, v in counter.get_flop_counts()["Global"].items() if str(k) == "aten.bmm")
    return total / len(graphs), attention / total


def time_shares(pipe: SceneGraphDiffusionPipeline, graphs, steps: int, top: int = 5) -> list[tuple[str, float]]:
    """The ops taking the most self CPU time in one default call (torch.profiler), as shares of it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        render(pipe, graphs, steps)
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events)
    return [(key, t / total) for key, t in sorted(events, key=lambda e: -e[1])[:top]]


def settings(pipe: SceneGraphDiffusionPipeline, args) -> dict[str, tuple[Callable[[], None], Callable[[], None], object]]:
    """name -> (apply, undo, context manager factory) for every setting measured."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = pipe.unet
    out: dict = {"default": (lambda: None, lambda: None, nullcontext)}

    def channels_last():
        unet.to(memory_format=torch.channels_last)

    def contiguous():
        unet.to(memory_format=torch.contiguous_format)

    out["channels_last"] = (channels_last, contiguous, nullcontext)
    if bf16_supported():
        out["bf16"] = (lambda: None, lambda: None, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    out["no SDPA"] = (lambda: unet.set_attn_processor(AttnProcessor()),
                      lambda: unet.set_attn_processor(AttnProcessor2_0()), nullcontext)

    def separate():
        pipe.separate_guidance_passes = True

    def fused():
        pipe.separate_guidance_passes = False
        pipe.unet = unet

    out["separate CFG"] = (separate, fused, nullcontext)
    if not args.skip_compile:
        compiled = torch.compile(unet)  # compiles on its first call: inside the unmeasured first batch

        def use_compiled():
            pipe.unet = compiled

        out["compile"] = (use_compiled, fused, nullcontext)

        def use_compiled_channels_last():
            channels_last()
            pipe.unet = compiled

        def undo_compiled_channels_last():
            pipe.unet = unet
            contiguous()

        # the compiled UNet guards on strides, so channels-last weights get their own graph
        out["compile + channels_last"] = (use_compiled_channels_last, undo_compiled_channels_last, nullcontext)

        def use_all():
            use_compiled_channels_last()
            separate()

        def undo_all():
            fused()
            contiguous()

        out["separate CFG + compile + channels_last"] = (use_all, undo_all, nullcontext)
        frozen = torch.compile(unet, options={"freezing": True})

        def use_frozen():
            pipe.unet = frozen

        out["compile, frozen"] = (use_frozen, fused, nullcontext)

        def use_frozen_all():
            channels_last()
            separate()
            pipe.unet = frozen

        out["compile, frozen + channels_last + separate CFG"] = (use_frozen_all, undo_all, nullcontext)
    return out


COMPONENTS = ("unet", "conditioner", "graph_encoder", "text_encoder", "tokenizer", "scheduler")


def other_model_settings(pipe: SceneGraphDiffusionPipeline, args) -> dict:
    """The ``--against`` pipeline's components swapped into ``pipe`` (eager, and frozen-compiled)."""
    other = SceneGraphDiffusionPipeline.from_pretrained(args.against)
    own = {name: getattr(pipe, name) for name in COMPONENTS}

    def use(components, unet=None):
        for name in COMPONENTS:
            setattr(pipe, name, components[name])
        if unet is not None:
            pipe.unet = unet

    def use_own():
        use(own)

    name = Path(args.against).name
    out = {name: (lambda: use(other.components), use_own, nullcontext)}
    if not args.skip_compile:
        frozen = torch.compile(other.unet, options={"freezing": True})
        out[f"{name}, compile, frozen"] = (lambda: use(other.components, frozen), use_own, nullcontext)
    return out


def render(pipe, graphs, steps: int) -> np.ndarray:
    seeds = [derive_seed(HELD_OUT_SEED, g.id, 0) for g in graphs]
    images = pipe(graphs, num_inference_steps=steps, guidance_scale=3.0, seeds=seeds, output_type="np").images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/shapes-sg-diffusion"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4, help="measured batches per setting (after one warm-up)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=int, default=2, help="largest pixel difference a default may make")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--against", help="another pipeline folder to time on the same graphs (its images differ)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = SceneGraphDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    graphs = held_out_graphs(args.batch_size * (args.batches + 1), HELD_OUT_SEED, pipe.default_size)
    batches = [graphs[i:i + args.batch_size] for i in range(0, len(graphs), args.batch_size)]
    peak = peak_gflops()
    flops, attention_share = flops_per_image(pipe, batches[0][:2], args.steps)
    shares = time_shares(pipe, batches[0], args.steps)
    others = other_model_settings(pipe, args) if args.against else {}  # other images: no pixel difference
    variants = {**settings(pipe, args), **others}
    seconds = {name: 0.0 for name in variants}
    images: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    warmup: dict[str, float] = {}
    for k, batch in enumerate(batches):
        for name, (apply, undo, context) in variants.items():
            apply()
            with context():
                start = time.perf_counter()
                out = render(pipe, batch, args.steps)
                elapsed = time.perf_counter() - start
            undo()
            if k == 0:
                warmup[name] = elapsed  # first batch: compile, caches and allocations, not measured
                continue
            seconds[name] += elapsed
            images[name].append(out)
        print(f"  batch {k + 1}/{len(batches)} done", file=sys.stderr, flush=True)

    measured = args.batch_size * args.batches
    base_rate = measured / seconds["default"]
    reference = np.concatenate(images["default"]).astype(np.int16)
    print(f"\n{measured} images per setting ({args.batches} batches of {args.batch_size}), {args.steps} steps with "
          f"guidance, {pipe.default_size} px, {args.threads} threads; machine peak {peak:.0f} GFLOP/s "
          f"(fp32 matmul); model {flops / 1e9:.1f} GFLOP per image, {attention_share:.0%} of it attention")
    print("self CPU time of the default loop: " + ", ".join(f"{k} {v:.0%}" for k, v in shares))
    print(f"| setting | images/s | vs default | GFLOP/s | of peak | max pixel diff | images within {args.tolerance} "
          "| first batch s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    figures = {"peak_gflops": peak, "gflop_per_image": flops / 1e9, "attention_flop_share": attention_share,
               "time_shares": dict(shares), "settings": {}}
    for name in variants:
        rate = measured / seconds[name]
        achieved = rate * flops / 1e9
        figures["settings"][name] = {"images_per_s": rate, "ratio": rate / base_rate, "gflops": achieved,
                                     "fraction_of_peak": achieved / peak, "first_batch_s": warmup[name]}
        if name in others:  # another model's images: its quality is shapes_quality's to measure
            diff_cells = "other model | - "
        else:
            per_image = np.abs(np.concatenate(images[name]).astype(np.int16) - reference).reshape(measured, -1).max(1)
            diff, within = int(per_image.max()), float((per_image <= args.tolerance).mean())
            figures["settings"][name].update(max_pixel_diff=diff, images_within=within)
            diff_cells = f"{diff} | {within:.0%}"
        print(f"| {name} | {rate:.2f} | {rate / base_rate:.2f}x | {achieved:.0f} | {achieved / peak:.0%} | {diff_cells} "
              f"| {warmup[name]:.1f} |")
    if "bf16" not in variants:
        print("bf16: skipped, this CPU has no native bf16 (autocast would emulate it)")
    usable = [n for n, f in figures["settings"].items() if n not in others and f["max_pixel_diff"] <= args.tolerance]
    best = max(usable, key=lambda n: figures["settings"][n]["images_per_s"])
    print(f"fastest within {args.tolerance} of the default's pixels: {best}")
    return figures


if __name__ == "__main__":
    main()
