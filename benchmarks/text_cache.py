"""Text-encoder calls and time for a batch of 256 graphs over a 50-label vocabulary: cache vs no cache.

    python benchmarks/text_cache.py [--graphs 256] [--labels 50] [--flavour demo] [--repeats 3]

Without the cache every object, attribute and predicate string of every graph goes through the
text model; with it each distinct string of the batch is encoded once. Both run side by side in
one process and the script prints the ratios.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from sgmodel.graph import SceneGraph, SGObject, SGRelation
from sgmodel.shapes.flavours import build_pipeline
from sgmodel.text import TextEmbedder

PREDICATES = ["left of", "right of", "above", "below", "on", "near", "holding", "behind"]
ATTRIBUTES = ["red", "green", "blue", "small", "large", "wooden", "old", "shiny"]


def make_graphs(n: int, labels: list[str], rng: random.Random) -> list[SceneGraph]:
    graphs = []
    for i in range(n):
        k = rng.randint(3, 10)
        objects = tuple(SGObject(rng.choice(labels), tuple(rng.sample(ATTRIBUTES, rng.randint(0, 2)))) for _ in range(k))
        relations = tuple(
            SGRelation(s, rng.choice(PREDICATES), o) for s, o in (rng.sample(range(k), 2) for _ in range(k))
        )
        graphs.append(SceneGraph(id=f"g{i}", objects=objects, relations=relations))
    return graphs


def occurrences(graphs: list[SceneGraph]) -> list[str]:
    """Every string occurrence of a batch, as a naive encoder would embed them."""
    out = []
    for g in graphs:
        out += [o.label for o in g.objects] + [a for o in g.objects for a in o.attributes]
        out += [r.predicate for r in g.relations]
    return out


def naive_embed(text: TextEmbedder, strings: list[str], chunk: int = 256) -> torch.Tensor:
    """No cache, no de-duplication: one text-model call per chunk of occurrences."""
    return torch.cat([text._encode(strings[i : i + chunk])[0] for i in range(0, len(strings), chunk)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=256)
    parser.add_argument("--labels", type=int, default=50)
    parser.add_argument("--flavour", default="demo")
    parser.add_argument("--batches", type=int, default=3, help="consecutive batches (the cache stays warm)")
    args = parser.parse_args()
    rng = random.Random(0)
    labels = [f"thing{i}" for i in range(args.labels)]
    pipe = build_pipeline(args.flavour, labels + ATTRIBUTES + PREDICATES)
    batches = [occurrences(make_graphs(args.graphs, labels, rng)) for _ in range(args.batches)]
    naive = TextEmbedder(pipe.text_encoder, pipe.tokenizer, pooling="mean")
    cached = TextEmbedder(pipe.text_encoder, pipe.tokenizer, pooling="mean")
    results = {"no cache": [0.0, naive], "cache": [0.0, cached]}
    with torch.inference_mode():
        for strings in batches:
            start = time.perf_counter()
            a = naive_embed(naive, strings)
            results["no cache"][0] += time.perf_counter() - start
            start = time.perf_counter()
            b = cached.embed(strings)
            results["cache"][0] += time.perf_counter() - start
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # same embeddings either way
    n = sum(len(s) for s in batches)
    print(f"{args.batches} batches of {args.graphs} graphs over {args.labels} labels: {n} string occurrences")
    print(f"{'':10} {'time (s)':>9} {'encoder calls':>14} {'strings encoded':>16}")
    for name, (seconds, text) in results.items():
        print(f"{name:10} {seconds:9.3f} {text.encoder_calls:14d} {text.strings_encoded:16d}")
    (t_n, e_n), (t_c, e_c) = results["no cache"], results["cache"]
    print(
        f"ratio no-cache/cache: time {t_n / t_c:.1f}x, encoder calls {e_n.encoder_calls / e_c.encoder_calls:.1f}x, "
        f"strings encoded {e_n.strings_encoded / e_c.strings_encoded:.1f}x (identical embeddings)"
    )


if __name__ == "__main__":
    main()
