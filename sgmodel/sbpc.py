"""Sampling-based prompt compliance (FG-DM): N candidates per graph, scored by segmentation recall, best kept.

Three ways to spend the candidates:
- naive: every candidate at full quality; the best one is the output.
- draft: candidates with few steps (and optionally at a lower resolution); only the best draft's
  seed is rendered at full quality, and that final image is scored again. FG-DM's point — scoring
  cheap candidates — with the diffusion model's own few-step samples standing in for its
  segmentation factor. With a deterministic sampler (DDIM) the same seed gives the same layout at
  any step count, so the draft's recall predicts the final image's — roughly: drafts are ranked by
  recall, then by expected recall (the segmenter's class probabilities, which still see objects a
  blurry draft shows too faintly for the argmax), then precision, relation score and index. With
  ``final_candidates`` M > 1 the M best drafts' seeds are rendered in that order, in rounds, until
  a final image reaches the target recall, and the best final image (by the selection rule) wins:
  the drafts only decide the order, final images decide the winner. With ``final_strength`` S a final
  image is not rendered from noise but finished from its draft (image-to-image: the draft noised
  with the seed's own noise to the last S of the schedule, then only those steps), as FG-DM renders
  its image from the chosen segmentation: a final costs S of a full render and keeps the draft's
  layout, so the drafts' rank matters less and more of them can be finished. The drafts can come from a distilled
  draft model instead (``generate_draft``; :mod:`sgmodel.draft`), trained so that a seed's draft looks like
  that seed's full render.
- adaptive: candidates are drawn in rounds and a graph stops as soon as one reaches the target
  recall (and, if set, the target precision) (up to N); combinable with draft, where the target stops the drafts (one final render)
  or, with ``final_candidates`` > 1, the final renders (then every graph drafts all N).

The selection logic is pure: ``generate`` and ``score`` are callables, so it runs in-process
(benchmarks) and inside a Ray generator actor whose scoring goes to scorer actors (the job).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sgmodel.graph import SceneGraph, derive_seed
from sgmodel.scoring import RecallResult

GenerateFn = Callable[..., list[np.ndarray]]
"""(graphs, seeds, steps, height, width) -> images as uint8 arrays [H, W, 3], one per (graph, seed).
Draft-guided finals also pass ``start=`` (one draft image per seed) and ``strength=`` (image-to-image)."""
ScoreFn = Callable[[list[np.ndarray], list[SceneGraph]], list[RecallResult]]
"""(images, graphs) -> one RecallResult per image."""


@dataclass(frozen=True, kw_only=True)
class SBPCConfig:
    candidates: int
    """N: the most candidates drawn per graph."""
    final_steps: int
    """Steps of the output image."""
    height: int
    width: int
    draft_steps: int | None = None
    """Draft mode when set: candidates use this many steps and the winner is re-rendered."""
    draft_size: int | None = None
    """Draft side length in pixels (drafts only); the draft noise is the full-size noise, average-pooled."""
    target_recall: float | None = None
    """Adaptive mode when set: a graph stops drawing once a candidate reaches this recall."""
    target_precision: float | None = None
    """Adaptive mode: the stopping candidate must also reach this precision (1.0: nothing the graph does
    not name), as the selection rule ranks precision right after recall."""
    round_size: int = 1
    """Candidates per graph per round in adaptive mode."""
    final_candidates: int = 1
    """Draft mode: the most drafts rendered at full quality, best first (M)."""
    final_strength: float | None = None
    """Draft mode: finish each final image from its draft (image-to-image at this strength: the last
    ``int(final_steps * S)`` steps) instead of rendering it from noise."""
    base_seed: int = 0

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.final_steps < 1:
            raise ValueError(f"candidates and final_steps must be >= 1, got {self.candidates!r}, {self.final_steps!r}")
        if self.draft_steps is not None and self.draft_steps < 1:
            raise ValueError(f"draft_steps must be >= 1, got {self.draft_steps!r}")
        if self.draft_size is not None:
            if self.draft_steps is None:
                raise ValueError("draft_size needs draft_steps (drafts are what gets shrunk)")
            if not (8 <= self.draft_size <= min(self.height, self.width)) or self.height % self.draft_size:
                raise ValueError(f"draft_size must divide the image size and be >= 8, got {self.draft_size!r}")
        if self.target_recall is not None and not 0.0 <= self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in [0, 1], got {self.target_recall!r}")
        if self.target_precision is not None and (self.target_recall is None
                                                  or not 0.0 <= self.target_precision <= 1.0):
            raise ValueError(f"target_precision must be in [0, 1] and needs target_recall, got {self.target_precision!r}")
        if self.round_size < 1:
            raise ValueError(f"round_size must be >= 1, got {self.round_size!r}")
        if not 1 <= self.final_candidates <= self.candidates:
            raise ValueError(f"final_candidates must be in 1 … candidates ({self.candidates}), "
                             f"got {self.final_candidates!r}")
        if self.final_candidates > 1 and self.draft_steps is None:
            raise ValueError("final_candidates > 1 needs draft mode (draft_steps): naive candidates are final already")
        if self.final_strength is not None:
            if self.draft_steps is None:
                raise ValueError("final_strength needs draft mode (draft_steps): finals are finished from drafts")
            if not 0 < self.final_strength <= 1 or int(self.final_steps * self.final_strength) < 1:
                raise ValueError(f"final_strength must be in (0, 1] and run at least one of the {self.final_steps} "
                                 f"final steps, got {self.final_strength!r}")

    @property
    def mode(self) -> str:
        base = "naive" if self.draft_steps is None else "draft" if self.final_candidates == 1 else "draft-finals"
        return f"adaptive-{base}" if self.target_recall is not None else base

    @property
    def adaptive_drafts(self) -> bool:
        """Does the target recall stop the drawing of candidates (rather than of final renders)?"""
        return self.target_recall is not None and self.final_candidates == 1

    def reached(self, result: RecallResult) -> bool:
        """Does this image stop the search (adaptive mode)?"""
        if self.target_recall is None or result.recall < self.target_recall:
            return False
        return self.target_precision is None or result.precision >= self.target_precision

    @property
    def candidate_steps(self) -> int:
        return self.draft_steps if self.draft_steps is not None else self.final_steps

    @property
    def candidate_size(self) -> tuple[int, int]:
        if self.draft_size is None:
            return self.height, self.width
        return self.draft_size, self.draft_size * self.width // self.height


@dataclass
class Candidate:
    index: int
    seed: int
    result: RecallResult
    image: np.ndarray | None = None

    @property
    def key(self) -> tuple[float, float, float, int]:
        """Sort key of the selection rule: recall (everything asked for is there), then precision
        (nothing else is), then relation score (it is where the graph says), then the lowest index."""
        rel = self.result.relation_score
        return (self.result.recall, self.result.precision, -1.0 if rel is None else rel, -self.index)

    @property
    def draft_key(self) -> tuple[float, float, float, float, int]:
        """Rank of a draft: recall, then expected recall (breaks the many ties of few-object graphs), then as ``key``."""
        expected = self.result.expected_recall
        return (self.result.recall, -1.0 if expected is None else expected, *self.key[1:])


@dataclass
class SBPCResult:
    graph: SceneGraph
    candidates: list[Candidate]
    winner: Candidate
    """The candidate whose seed is the output."""
    final: Candidate
    """The output: the winner itself (naive) or its full-quality re-render, scored again (draft)."""
    finals: list[Candidate] = field(default_factory=list)
    """Draft mode: every full-quality render, in the order they were made (the drafts' rank)."""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def drawn(self) -> int:
        return len(self.candidates)


def candidate_seed(graph: SceneGraph, base_seed: int, index: int) -> int:
    """Same rule as the generate job: a row's own seed (+ index), else derived from (base, id, index)."""
    if graph.seed is not None:
        return (graph.seed + index) % 2**63
    return derive_seed(base_seed, graph.id, index)


def pick_winner(candidates: Sequence[Candidate]) -> Candidate:
    if not candidates:
        raise ValueError("no candidates to choose from")
    return max(candidates, key=lambda c: c.key)


def rank_drafts(drafts: Sequence[Candidate]) -> list[Candidate]:
    """Drafts best first (:attr:`Candidate.draft_key`): the order their seeds are rendered in full."""
    return sorted(drafts, key=lambda c: c.draft_key, reverse=True)


def draft_noise(full_noise: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The full-size noise [B, C, H, W] average-pooled to ``size``, rescaled to unit variance.

    A draft then starts from a coarse version of the very noise the final render will use, so its
    layout predicts the final image's.
    """
    h, w = full_noise.shape[-2:]
    factor = h // size[0]
    if factor == 1:
        return full_noise
    return F.avg_pool2d(full_noise, kernel_size=factor) * factor


def run_sbpc(
    graphs: Sequence[SceneGraph], config: SBPCConfig, generate: GenerateFn, score: ScoreFn, keep_images: bool = False,
    generate_draft: GenerateFn | None = None,
) -> list[SBPCResult]:
    """Best-of-N for a batch of graphs; candidates of all active graphs share each generate/score call.

    Draft mode only: ``generate_draft`` draws the candidates (e.g. on a distilled draft model); the
    final renders always use ``generate``.
    """
    if generate_draft is not None and config.draft_steps is None:
        raise ValueError("generate_draft needs draft mode (config.draft_steps)")
    started = time.perf_counter()
    graphs = list(graphs)
    pools: list[list[Candidate]] = [[] for _ in graphs]
    active = list(range(len(graphs)))
    per_round = config.round_size if config.adaptive_drafts else config.candidates
    steps = config.candidate_steps
    height, width = config.candidate_size
    while active:
        # 1. Draw the next round of candidates for every graph still searching.
        jobs = [(g, pools[g].__len__() + k) for g in active
                for k in range(min(per_round, config.candidates - len(pools[g])))]
        batch_graphs = [graphs[g] for g, _ in jobs]
        seeds = [candidate_seed(graphs[g], config.base_seed, i) for g, i in jobs]
        images = (generate_draft or generate)(batch_graphs, seeds, steps, height, width)
        # 2. Score them all at once.
        results = score(images, batch_graphs)
        for (g, i), seed, image, result in zip(jobs, seeds, images, results):
            kept = keep_images or config.draft_steps is None or config.final_strength is not None
            pools[g].append(Candidate(i, seed, result, image if kept else None))
        # 3. Adaptive stop; otherwise everyone has drawn N.
        still = []
        for g in active:
            done = len(pools[g]) >= config.candidates
            if config.adaptive_drafts and config.reached(pick_winner(pools[g]).result):
                done = True
            if not done:
                still.append(g)
        active = still
    if config.draft_steps is None:
        winners = [pick_winner(pool) for pool in pools]
        finals, rendered = winners, [[] for _ in graphs]
    else:
        winners, finals, rendered = _render_finals(graphs, pools, config, generate, score)
    seconds = (time.perf_counter() - started) / max(1, len(graphs))
    return [SBPCResult(g, pool, w, f, finals=r, seconds=seconds)
            for g, pool, w, f, r in zip(graphs, pools, winners, finals, rendered)]


def _render_finals(graphs: list[SceneGraph], pools: list[list[Candidate]], config: SBPCConfig, generate: GenerateFn,
                   score: ScoreFn) -> tuple[list[Candidate], list[Candidate], list[list[Candidate]]]:
    """Draft mode: render the best drafts' seeds at full quality, one per graph per round, until a
    graph has rendered ``final_candidates`` or (adaptive) a final image reaches the target.

    Returns per graph the winning draft, its final image and every final image made.
    """
    ranked = [rank_drafts(pool) for pool in pools]
    rendered: list[list[Candidate]] = [[] for _ in graphs]
    active = list(range(len(graphs)))
    while active:
        drafts = [ranked[g][len(rendered[g])] for g in active]
        guided = {} if config.final_strength is None else {"start": [d.image for d in drafts],
                                                            "strength": config.final_strength}
        images = generate([graphs[g] for g in active], [d.seed for d in drafts], config.final_steps,
                          config.height, config.width, **guided)
        results = score(images, [graphs[g] for g in active])
        still = []
        for g, d, image, result in zip(active, drafts, images, results):
            rendered[g].append(Candidate(d.index, d.seed, result, image))
            reached = config.reached(result)
            if len(rendered[g]) < min(config.final_candidates, len(ranked[g])) and not reached:
                still.append(g)
        active = still
    finals = [pick_winner(r) for r in rendered]
    winners = [next(c for c in pool if c.index == f.index) for pool, f in zip(pools, finals)]
    return winners, finals, rendered


TABLE3_THRESHOLDS = ("0.5", "0.75", "0.9")
"""Recall thresholds of FG-DM's Table 3 ("how many of the N candidates reach t")."""


def table3_statistics(recalls_per_graph: Sequence[Sequence[float | None]]) -> dict[str, Any]:
    """FG-DM Table 3 over graphs, and the best-of-n curve.

    ``recalls_per_graph``: each graph's candidates in draw order, None for a candidate that was not
    scored. Recall statistics average over graphs with at least one scored candidate; "candidates
    drawn" averages over every graph, scored or not (what the selection spent). ``best_of_n`` is
    [(n, mean over graphs of the best recall among their first n candidates)]: a graph that stopped
    early (adaptive) keeps the best of what it drew, which is what a budget of n would have given it.
    """
    drawn = [len(r) for r in recalls_per_graph]
    scored = [[float(v) for v in r if v is not None and math.isfinite(v)] for r in recalls_per_graph]
    scored = [r for r in scored if r]
    if not scored:
        return {"graphs": 0}
    longest = max(len(r) for r in scored)
    return {
        "graphs": len(scored),
        "avg_min_recall": statistics.fmean(min(r) for r in scored),
        "avg_median_recall": statistics.fmean(statistics.median(r) for r in scored),
        "avg_max_recall": statistics.fmean(max(r) for r in scored),
        "avg_count_at_least": {t: statistics.fmean(sum(v >= float(t) for v in r) for r in scored)
                               for t in TABLE3_THRESHOLDS},
        "avg_candidates_drawn": statistics.fmean(drawn),
        "best_of_n": [(n, statistics.fmean(max(r[:n]) for r in scored)) for n in range(1, longest + 1)],
    }


def pipeline_generate_fn(pipe, guidance_scale: float) -> GenerateFn:
    """A GenerateFn over a SceneGraphDiffusionPipeline; drafts smaller than the model's size pool its full noise;
    ``start`` images (drafts, resized to the asked size) are finished image-to-image at ``strength``."""
    full_h = full_w = pipe.default_size

    def generate(graphs: list[SceneGraph], seeds: list[int], steps: int, height: int, width: int,
                 start: list[np.ndarray] | None = None, strength: float = 1.0) -> list[np.ndarray]:
        latents = None
        if start is None and (height, width) != (full_h, full_w) and height < full_h:
            latents = draft_noise(pipe.initial_noise(seeds, full_h, full_w), (height, width))
        images = pipe(graphs, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                      seeds=seeds, output_type="np", latents=latents, image=start, strength=strength).images
        return [(im * 255).round().clip(0, 255).astype(np.uint8) for im in images]

    return generate
