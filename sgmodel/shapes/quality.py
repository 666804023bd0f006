"""Held-out evaluation in the shapes world: graphs as users give them, images at N=1, their scores.

Shared by ``benchmarks/shapes_quality.py`` and the tests of the committed models.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from sgmodel.graph import SceneGraph, derive_seed
from sgmodel.pipeline import SceneGraphDiffusionPipeline
from sgmodel.scoring import RecallResult, SegmentationScorer
from sgmodel.shapes.world import caption_for, shapes_sample

HELD_OUT_SEED = 2_000_029
"""Shapes stream of the evaluation graphs; no checkpoint trained on it."""


def held_out_graphs(count: int, seed: int, size: int, boxes: bool = False, captions: bool = False) -> list[SceneGraph]:
    """Graphs as a user gives them: objects and relations; boxes and the caption only when asked."""
    graphs = []
    for i in range(count):
        graph, _ = shapes_sample(seed, i, size)
        objects = graph.objects if boxes else tuple(replace(o, box=None) for o in graph.objects)
        caption = caption_for(graph.objects, graph.relations) if captions else None
        graphs.append(SceneGraph(id=graph.id, objects=objects, relations=graph.relations, caption=caption))
    return graphs


def generate(pipe: SceneGraphDiffusionPipeline, graphs: list[SceneGraph], steps: int, guidance: float,
             batch_size: int, base_seed: int, layout: str = "sample") -> list[np.ndarray]:
    images: list[np.ndarray] = []
    for begin in range(0, len(graphs), batch_size):
        chunk = graphs[begin:begin + batch_size]
        seeds = [derive_seed(base_seed, g.id, 0) for g in chunk]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, seeds=seeds, output_type="np",
                   layout=layout)
        images.extend((np.clip(out.images, 0, 1) * 255).round().astype(np.uint8))
    return images


def summarise(results: list[RecallResult]) -> dict[str, float]:
    """Mean recall and precision over images with a scorable object; relation accuracy pooled over relations."""
    scorable = [r for r in results if r.num_scorable]
    checked = sum(r.relations_checked for r in results)
    return {
        "recall": round(float(np.mean([r.recall for r in scorable])) if scorable else 0.0, 4),
        "precision": round(float(np.mean([r.precision for r in scorable])) if scorable else 0.0, 4),
        "relation_accuracy": round(sum(r.relations_satisfied for r in results) / checked, 4) if checked else 0.0,
        "relations_checked": checked,
        "images_with_extras": sum(bool(r.extra_objects) for r in results),
        "images": len(results),
    }


def score_row(scorer: SegmentationScorer, images: list[np.ndarray], graphs: list[SceneGraph]) -> dict:
    """The row's figures against its own graphs, and control recall against the next graph."""
    figures = summarise(scorer.score(images, graphs))
    figures["control_recall"] = summarise(scorer.score(images, graphs[1:] + graphs[:1]))["recall"]
    return figures
