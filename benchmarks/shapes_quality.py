"""Measured quality of the shapes demo checkpoints on held-out graphs.

    python benchmarks/shapes_quality.py [--count 200] [--model models/shapes-sg-diffusion]
        [--segmenter models/shapes-segmenter] [--steps 25] [--guidance 3] [--grid docs/samples.png]

1. Segmenter on clean held-out renders: pixel accuracy and object recall against ground truth.
2. Demo model at N=1: each held-out graph generates one image, which the segmenter scores
   against its own graph (matched) and against the next row's graph (control: the same
   images, a different graph). An object is found when a region of its colour+shape class
   exists; relation accuracy counts satisfied / checked spatial relations.

Held-out means a shapes stream whose seed neither checkpoint was trained on (both trained on
seed 0). Prints a table; ``--json`` also writes the figures, ``--grid`` a PNG of samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sgmodel.graph import SceneGraph, derive_seed  # noqa: E402
from sgmodel.pipeline import SceneGraphDiffusionPipeline  # noqa: E402
from sgmodel.scoring import RecallResult, SegmentationScorer  # noqa: E402
from sgmodel.shapes.segmenter import evaluate_segmenter  # noqa: E402
from sgmodel.shapes.world import shapes_sample  # noqa: E402

HELD_OUT_SEED = 2_000_029
"""Shapes stream of the evaluation graphs; the checkpoints were trained on stream 0."""


def write_json(path: Path, figures: dict) -> None:
    """Every figure of a benchmark run, for docs/benchmarks.md and for comparing runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))


def held_out_graphs(count: int, seed: int, size: int) -> list[SceneGraph]:
    """Graphs as a user would give them: objects, boxes, relations; no caption, no image."""
    graphs = []
    for i in range(count):
        graph, _ = shapes_sample(seed, i, size)
        graphs.append(SceneGraph(id=graph.id, objects=graph.objects, relations=graph.relations))
    return graphs


def generate(pipe: SceneGraphDiffusionPipeline, graphs: list[SceneGraph], steps: int, guidance: float,
             batch_size: int, base_seed: int) -> list[np.ndarray]:
    images: list[np.ndarray] = []
    for begin in range(0, len(graphs), batch_size):
        chunk = graphs[begin:begin + batch_size]
        seeds = [derive_seed(base_seed, g.id, 0) for g in chunk]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, seeds=seeds, output_type="np")
        images.extend((np.clip(out.images, 0, 1) * 255).round().astype(np.uint8))
    return images


def summarise(results: list[RecallResult]) -> dict[str, float]:
    """Mean recall over images with a scorable object; relation accuracy over all checked relations."""
    scorable = [r for r in results if r.num_scorable]
    checked = sum(r.relations_checked for r in results)
    return {
        "mean_recall": round(float(np.mean([r.recall for r in scorable])) if scorable else 0.0, 4),
        "relation_accuracy": round(sum(r.relations_satisfied for r in results) / checked, 4) if checked else 0.0,
        "relations_checked": checked,
        "images_scored": len(scorable),
    }


def graph_text(graph: SceneGraph, width: int = 30) -> str:
    names = [" ".join((*o.attributes, o.label)) for o in graph.objects]
    lines = [", ".join(names)] + [f"{names[r.subject]} {r.predicate} {names[r.object]}" for r in graph.relations[:2]]
    return "\n".join(textwrap.fill(line, width) for line in lines)


def save_grid(path: Path, images: list[np.ndarray], graphs: list[SceneGraph], results: list[RecallResult],
              columns: int = 6, rows: int = 3) -> None:
    """Each cell: the generated image (nearest-neighbour upscaled), its recall, its graph below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell_w, cell_h, image_h = 2.0, 3.0, 1.8  # inches
    fig = plt.figure(figsize=(columns * cell_w, rows * cell_h))
    for k in range(min(len(images), columns * rows)):
        col, row = k % columns, k // columns
        left = (col * cell_w + (cell_w - image_h) / 2) / (columns * cell_w)
        bottom = 1 - (row * cell_h + 0.25 + image_h) / (rows * cell_h)
        ax = fig.add_axes((left, bottom, image_h / (columns * cell_w), image_h / (rows * cell_h)))
        ax.imshow(images[k], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"recall {results[k].recall:.2f}", fontsize=8, pad=3)
        ax.text(0.5, -0.04, graph_text(graphs[k]), transform=ax.transAxes, ha="center", va="top", fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/shapes-sg-diffusion"))
    parser.add_argument("--segmenter", default=str(ROOT / "models/shapes-segmenter"))
    parser.add_argument("--count", type=int, default=200, help="held-out graphs (200 for docs/benchmarks.md)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="held-out shapes stream")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-segmenter", action="store_true", help="only the demo model rows")
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG grid of samples with their graphs")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    figures: dict = {"count": args.count, "seed": args.seed, "model": args.model, "steps": args.steps,
                     "guidance": args.guidance}
    if not args.skip_segmenter:
        figures["segmenter"] = evaluate_segmenter(args.segmenter, count=args.count, seed=args.seed)

    pipe = SceneGraphDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    graphs = held_out_graphs(args.count, args.seed, pipe.default_size)
    start = time.perf_counter()
    images = generate(pipe, graphs, args.steps, args.guidance, args.batch_size, base_seed=args.seed)
    figures["generate_seconds_per_image"] = round((time.perf_counter() - start) / len(images), 4)
    scorer = SegmentationScorer.from_pretrained(args.segmenter, batch_size=args.batch_size)
    matched = scorer.score(images, graphs)
    control = scorer.score(images, graphs[1:] + graphs[:1])
    figures["matched"] = summarise(matched)
    figures["control"] = summarise(control)
    ratio = figures["matched"]["mean_recall"] / max(1e-9, figures["control"]["mean_recall"])
    figures["matched_over_control"] = round(ratio, 2)

    print(f"held-out shapes graphs: {args.count} (stream {args.seed}); model {args.model}; "
          f"{args.steps} steps, guidance {args.guidance}")
    print(f"{'':36s} {'recall':>8s} {'pixel acc / relations':>22s}")
    if "segmenter" in figures:
        seg = figures["segmenter"]
        print(f"{'segmenter on clean renders':36s} {seg['object_recall']:8.3f} {seg['pixel_accuracy']:22.3f}")
    for name in ("matched", "control"):
        row = figures[name]
        label = f"demo model N=1, {name} graph"
        print(f"{label:36s} {row['mean_recall']:8.3f} {row['relation_accuracy']:22.3f}")
    print(f"matched / control recall: {ratio:.2f}x; {figures['generate_seconds_per_image']:.3f} s per image")
    if args.grid:
        save_grid(args.grid, images, graphs, matched)
        print(f"sample grid: {args.grid}")
    if args.json:
        write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
