"""Quality of the shapes models on held-out graphs: objects, nothing extra, relations.

    python benchmarks/shapes_quality.py [--count 200] [--model models/shapes-sg-diffusion]
        [--tokens-model DIR] [--caption-model DIR] [--alignment-model DIR] [--sbpc 8]
        [--segmenter models/shapes-segmenter] [--steps 25] [--guidance 3] [--grid docs/samples.png] [--json F]

Every row renders one image per held-out graph (N=1, the graph's derived seed) and scores it with
the shapes segmenter against its own graph: recall (graph objects found / scorable), precision
(found / instances the segmenter sees: an instance the graph does not account for is an extra
object), relation accuracy (satisfied / checked spatial relations, pooled over images, read off the
segmented regions) and control recall (the same images scored against the next graph: what
recall a model that ignores its graph gets). Graphs are given as users give them: objects and
relations, no boxes, no caption, unless the row says otherwise.

Rows: the segmenter on clean renders (its own ceiling); ``--tokens-model`` (a model conditioned
through cross-attention tokens only); the layout-grounded ``--model`` with its layout drawn from
the layout distribution ("sample") and from its mean ("mean"), and with the true boxes given (an
upper bound); ``--caption-model`` given the graph written as a caption ("red circle left of blue
square, ..."), the text-prompt baseline; ``--alignment-model`` (layout-grounded, trained with the
CLIP-contrastive + MMD alignment losses). Then ``--sbpc N``: naive best-of-N on ``--model`` by
the job's selection rule (recall, precision, relation score), its winners' figures.

Held out: shapes stream 2000029, which no model trained on.
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

from sgmodel.graph import SceneGraph  # noqa: E402
from sgmodel.pipeline import SceneGraphDiffusionPipeline  # noqa: E402
from sgmodel.sbpc import SBPCConfig, pipeline_generate_fn, run_sbpc  # noqa: E402
from sgmodel.scoring import RecallResult, SegmentationScorer  # noqa: E402
from sgmodel.shapes.quality import (  # noqa: E402
    HELD_OUT_SEED,
    generate,
    held_out_graphs,
    score_row,
    summarise,
)
from sgmodel.shapes.segmenter import evaluate_segmenter  # noqa: E402


def write_json(path: Path, figures: dict) -> None:
    """Every figure of a benchmark run, for docs/benchmarks.md and for comparing runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))


def graph_text(graph: SceneGraph, width: int = 30) -> str:
    names = [" ".join((*o.attributes, o.label)) for o in graph.objects]
    lines = [", ".join(names)] + [f"{names[r.subject]} {r.predicate} {names[r.object]}" for r in graph.relations[:2]]
    return "\n".join(textwrap.fill(line, width) for line in lines)


def save_grid(path: Path, images: list[np.ndarray], graphs: list[SceneGraph], results: list[RecallResult],
              columns: int = 6, rows: int = 3) -> None:
    """Each cell: the generated image (nearest-neighbour upscaled), its scores, its graph below."""
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
        rel = results[k].relation_score
        ax.set_title(f"recall {results[k].recall:.2f}" + (f", relations {rel:.2f}" if rel is not None else ""),
                     fontsize=7, pad=3)
        ax.text(0.5, -0.04, graph_text(graphs[k]), transform=ax.transAxes, ha="center", va="top", fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load(path: str) -> SceneGraphDiffusionPipeline:
    pipe = SceneGraphDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sbpc_row(pipe: SceneGraphDiffusionPipeline, scorer: SegmentationScorer, graphs: list[SceneGraph], n: int,
             args: argparse.Namespace) -> dict:
    """Naive best-of-n by the job's selection rule; the winners' figures."""
    size = pipe.default_size
    config = SBPCConfig(candidates=n, final_steps=args.steps, height=size, width=size, base_seed=args.seed)
    generate_fn = pipeline_generate_fn(pipe, args.guidance)
    winners = []
    for begin in range(0, len(graphs), max(1, args.batch_size // n)):
        chunk = graphs[begin:begin + max(1, args.batch_size // n)]
        winners += [r.final.result for r in run_sbpc(chunk, config, generate_fn, scorer.score)]
    return {**summarise(winners), "candidates": n}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models/shapes-sg-diffusion"), help="the layout-grounded model")
    parser.add_argument("--tokens-model", default=None, help="a tokens-conditioned model to compare with")
    parser.add_argument("--caption-model", default=None, help="a caption-conditioned baseline (given captions)")
    parser.add_argument("--alignment-model", default=None, help="layout-grounded, trained with the alignment losses")
    parser.add_argument("--segmenter", default=str(ROOT / "models/shapes-segmenter"))
    parser.add_argument("--count", type=int, default=200, help="held-out graphs (200 for docs/benchmarks.md)")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="held-out shapes stream")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sbpc", type=int, default=8, help="candidates of the SBPC row (0: no SBPC row)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-segmenter", action="store_true", help="no segmenter-on-clean-renders row")
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG grid of --model's samples")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    figures: dict = {"count": args.count, "stream": args.seed, "model": args.model, "steps": args.steps,
                     "guidance": args.guidance, "rows": {}}
    rows = figures["rows"]
    if not args.skip_segmenter:
        figures["segmenter"] = evaluate_segmenter(args.segmenter, count=args.count, seed=args.seed)
    scorer = SegmentationScorer.from_pretrained(args.segmenter, batch_size=args.batch_size)
    pipe = load(args.model)
    size = pipe.default_size
    bare = held_out_graphs(args.count, args.seed, size)

    def row(name: str, model: SceneGraphDiffusionPipeline, graphs: list[SceneGraph], layout: str = "sample") -> None:
        t0 = time.perf_counter()
        images = generate(model, graphs, args.steps, args.guidance, args.batch_size, args.seed, layout)
        rows[name] = {**score_row(scorer, images, bare), "seconds_per_image": round((time.perf_counter() - t0) /
                                                                                     len(images), 4)}
        print(f"  {name}: {rows[name]}", file=sys.stderr, flush=True)
        if name == "layout-grounded, no boxes (layout drawn)" and args.grid:
            save_grid(args.grid, images, bare, scorer.score(images, bare))

    if args.tokens_model:
        row("tokens model", load(args.tokens_model), bare)
    row("layout-grounded, no boxes (layout drawn)", pipe, bare, "sample")
    row("layout-grounded, no boxes (mean layout)", pipe, bare, "mean")
    row("layout-grounded, true boxes given", pipe, held_out_graphs(args.count, args.seed, size, boxes=True))
    if args.caption_model:
        row("caption-only baseline", load(args.caption_model), held_out_graphs(args.count, args.seed, size,
                                                                               captions=True))
    if args.alignment_model:
        row("layout-grounded + alignment losses, no boxes", load(args.alignment_model), bare)
    if args.sbpc:
        rows[f"SBPC best-of-{args.sbpc}, no boxes"] = sbpc_row(pipe, scorer, bare, args.sbpc, args)

    print(f"\n{args.count} held-out shapes graphs (stream {args.seed}), N=1 unless noted, {args.steps} steps, "
          f"guidance {args.guidance}; {time.perf_counter() - started:.0f} s")
    header = "| row | recall | precision | relation accuracy (checked) | control recall |\n|---|---:|---:|---:|---:|"
    print(header)
    if "segmenter" in figures:
        seg = figures["segmenter"]
        print(f"| segmenter on clean renders | {seg['object_recall']:.3f} | | | |")
    for name, r in rows.items():
        control = f"{r['control_recall']:.3f}" if "control_recall" in r else ""
        print(f"| {name} | {r['recall']:.3f} | {r['precision']:.3f} | {r['relation_accuracy']:.3f} "
              f"({r['relations_checked']}) | {control} |")
    if args.json:
        write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
