"""SBPC selection logic on hand-made scores: ties, adaptive stop, draft re-render with the winning seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgmodel.graph import SceneGraph, SGObject
from sgmodel.sbpc import (
    Candidate,
    SBPCConfig,
    candidate_seed,
    draft_noise,
    pick_winner,
    rank_drafts,
    run_sbpc,
    table3_statistics,
)
from sgmodel.scoring import RecallResult

G = [SceneGraph(id=f"g{i}", objects=(SGObject("circle"),)) for i in range(3)]


def result(recall: float, relation: float | None = None, expected: float | None = None) -> RecallResult:
    return RecallResult(graph_id="g", recall=recall, found=[], missing=[], unscorable=[], relation_score=relation,
                        relations_checked=0 if relation is None else 1, relations_satisfied=0,
                        expected_recall=expected)


def cand(index: int, recall: float, relation: float | None = None) -> Candidate:
    return Candidate(index=index, seed=100 + index, result=result(recall, relation))


def test_winner_is_recall_then_relation_then_lowest_index():
    assert pick_winner([cand(0, 0.5), cand(1, 0.9), cand(2, 0.7)]).index == 1
    assert pick_winner([cand(0, 0.9, 0.0), cand(1, 0.9, 1.0), cand(2, 0.9, 0.5)]).index == 1
    assert pick_winner([cand(0, 0.9, 0.5), cand(1, 0.9, 0.5), cand(2, 0.9, 0.5)]).index == 0
    assert pick_winner([cand(0, 0.9), cand(1, 0.9, 0.0)]).index == 1  # a checked relation beats none
    assert pick_winner([cand(3, 1.0), cand(1, 1.0)]).index == 1
    with pytest.raises(ValueError):
        pick_winner([])


class Scripted:
    """generate() records its calls and returns images that carry their seed; score() looks recall up by seed."""

    def __init__(self, recall_of: dict[tuple[str, int], float]):
        self.recall_of = recall_of  # (graph id, candidate index) -> recall at draft quality
        self.calls: list[tuple[list[str], list[int], int, int]] = []

    def seed_index(self, graph: SceneGraph, seed: int) -> int:
        return next(i for i in range(100) if candidate_seed(graph, 0, i) == seed)

    def generate(self, graphs, seeds, steps, height, width):
        self.calls.append(([g.id for g in graphs], seeds, steps, height))
        return [np.full((height, width, 3), steps, dtype=np.uint8) + 0 * s for s in seeds]

    def score(self, images, graphs):
        out = []
        for image, graph, seed in zip(images, graphs, self.calls[-1][1]):
            base = self.recall_of[(graph.id, self.seed_index(graph, seed))]
            final = int(image[0, 0, 0]) >= 20  # full-quality renders score a little higher
            out.append(result(min(1.0, base + (0.05 if final else 0.0))))
        return out


def test_naive_draws_n_and_keeps_the_best():
    recall = {(g.id, i): v for g in G for i, v in enumerate([0.2, 0.6, 0.4, 0.6])}
    s = Scripted(recall)
    out = run_sbpc(G, SBPCConfig(candidates=4, final_steps=20, height=16, width=16), s.generate, s.score)
    assert len(s.calls) == 1 and len(s.calls[0][0]) == 12  # one batched call for all candidates of all graphs
    for r in out:
        assert r.drawn == 4 and r.winner.index == 1 and r.final is r.winner
        assert r.final.image is not None and r.final.result.recall == pytest.approx(0.65)
        assert [c.seed for c in r.candidates] == [candidate_seed(r.graph, 0, i) for i in range(4)]


def test_draft_rerenders_the_winning_seed_at_full_quality_and_rescores():
    recall = {(g.id, i): v for g in G for i, v in enumerate([0.1, 0.3, 0.9 if g.id == "g1" else 0.2, 0.4])}
    s = Scripted(recall)
    cfg = SBPCConfig(candidates=4, final_steps=20, draft_steps=3, draft_size=8, height=16, width=16)
    out = run_sbpc(G, cfg, s.generate, s.score)
    (draft_ids, _, draft_steps, draft_h), (final_ids, final_seeds, final_steps, final_h) = s.calls
    assert (draft_steps, draft_h, len(draft_ids)) == (3, 8, 12)
    assert (final_steps, final_h, final_ids) == (20, 16, ["g0", "g1", "g2"])
    assert final_seeds == [r.winner.seed for r in out]
    assert [r.winner.index for r in out] == [3, 2, 3]
    assert out[1].final.seed == candidate_seed(G[1], 0, 2) and out[1].final.result.recall == pytest.approx(0.95)
    assert all(c.image is None for r in out for c in r.candidates)  # drafts are not kept unless asked


def test_a_draft_model_draws_the_candidates_and_the_model_renders_the_winner():
    recall = {(g.id, i): v for g in G for i, v in enumerate([0.1, 0.7, 0.2])}
    model, draft = Scripted(recall), Scripted(recall)
    draft.calls = model.calls  # one call log, so score() sees whichever generated last
    drafted = []

    def generate_draft(graphs, seeds, steps, height, width):
        drafted.append(len(seeds))
        return draft.generate(graphs, seeds, steps, height, width)

    cfg = SBPCConfig(candidates=3, final_steps=20, draft_steps=2, height=16, width=16)
    out = run_sbpc(G, cfg, model.generate, model.score, generate_draft=generate_draft)
    assert drafted == [9]  # all candidates on the draft model, in one call
    assert [(steps, len(ids)) for ids, _, steps, _ in model.calls] == [(2, 9), (20, 3)]
    assert [r.winner.index for r in out] == [1, 1, 1] and [r.final.seed for r in out] == [r.winner.seed for r in out]
    with pytest.raises(ValueError, match="draft mode"):
        run_sbpc(G, SBPCConfig(candidates=3, final_steps=20, height=16, width=16), model.generate, model.score,
                 generate_draft=generate_draft)


def test_drafts_rank_by_recall_then_expected_recall_then_the_selection_rule():
    def d(index, recall, expected=None, relation=None):
        return Candidate(index=index, seed=index, result=result(recall, relation, expected))

    ranked = rank_drafts([d(0, 0.5, 0.9), d(1, 1.0, 0.2), d(2, 0.5, 0.95), d(3, 1.0, 0.6), d(4, 0.5, 0.9, 1.0)])
    assert [c.index for c in ranked] == [3, 1, 2, 4, 0]
    assert [c.index for c in rank_drafts([d(2, 0.5), d(0, 0.5), d(1, 0.5, None, 0.0)])] == [1, 0, 2]


class Finals(Scripted):
    """Drafts score ``draft_of``; full renders (steps >= 20) score ``final_of``, by (graph, candidate index)."""

    def __init__(self, draft_of, final_of):
        super().__init__(draft_of)
        self.final_of = final_of

    def score(self, images, graphs):
        out = []
        for image, graph, seed in zip(images, graphs, self.calls[-1][1]):
            i = self.seed_index(graph, seed)
            if int(image[0, 0, 0]) >= 20:
                out.append(result(self.final_of[(graph.id, i)]))
            else:
                out.append(result(self.recall_of[(graph.id, i)], expected=0.1 * i))
        return out


def test_final_candidates_render_the_best_drafts_in_rounds_and_keep_the_best_final():
    draft = {(g.id, i): v for g in G for i, v in enumerate([0.5, 0.5, 0.5, 0.5])}  # ties: expected recall 0.1 * i
    final = {**{("g0", i): v for i, v in enumerate([0.1, 0.2, 0.9, 0.4])},
             **{("g1", i): v for i, v in enumerate([0.1, 0.2, 0.3, 1.0])},
             **{("g2", i): v for i, v in enumerate([0.8, 0.2, 0.3, 0.4])}}
    s = Finals(draft, final)
    cfg = SBPCConfig(candidates=4, final_steps=20, draft_steps=2, height=16, width=16, final_candidates=3,
                     target_recall=1.0)
    out = run_sbpc(G, cfg, s.generate, s.score)
    # all 4 drafts per graph (the target stops finals, not drafts), then finals best draft first: 3, 2, 1
    assert [(len(ids), steps) for ids, _, steps, _ in s.calls] == [(12, 2), (3, 20), (2, 20), (2, 20)]
    assert [r.drawn for r in out] == [4, 4, 4]
    assert [[c.index for c in r.finals] for r in out] == [[3, 2, 1], [3], [3, 2, 1]]  # g1 reached 1.0 at once
    assert [r.final.index for r in out] == [2, 3, 3]  # the best *final* wins
    assert [r.final.result.recall for r in out] == [0.9, 1.0, 0.4]
    assert all(r.winner.index == r.final.index and r.winner.seed == r.final.seed for r in out)
    # without a target every graph renders exactly final_candidates finals
    s = Finals(draft, final)
    out = run_sbpc(G, SBPCConfig(candidates=4, final_steps=20, draft_steps=2, height=16, width=16,
                                 final_candidates=2), s.generate, s.score)
    assert [len(r.finals) for r in out] == [2, 2, 2] and [r.final.index for r in out] == [2, 3, 3]
    with pytest.raises(ValueError, match="needs draft mode"):
        SBPCConfig(candidates=4, final_steps=20, height=16, width=16, final_candidates=2)
    with pytest.raises(ValueError, match="final_candidates must be in 1 … candidates"):
        SBPCConfig(candidates=4, final_steps=20, draft_steps=2, height=16, width=16, final_candidates=5)


def test_draft_guided_finals_start_from_the_drafts_of_the_seeds_they_render():
    draft = {(g.id, i): v for g in G for i, v in enumerate([0.5, 0.5, 0.5, 0.5])}  # ranked 3, 2, 1, 0
    final = {(g.id, i): v for g in G for i, v in enumerate([0.1, 1.0, 0.2, 0.3])}
    s = Finals(draft, final)
    starts = []

    def generate(graphs, seeds, steps, height, width, start=None, strength=1.0):
        starts.append((start, strength))
        images = s.generate(graphs, seeds, steps, height, width)
        # a draft's image carries its candidate index, so the start images name the drafts they came from
        return images if start is not None else [im + s.seed_index(g, seed) for im, g, seed in zip(images, graphs, seeds)]

    cfg = SBPCConfig(candidates=4, final_steps=20, draft_steps=2, height=16, width=16, final_candidates=4,
                     target_recall=1.0, final_strength=0.4)
    out = run_sbpc(G, cfg, generate, s.score)
    assert [[c.index for c in r.finals] for r in out] == [[3, 2, 1]] * 3  # stops at candidate 1's 1.0
    assert starts[0] == (None, 1.0)  # drafts come from noise
    for (start, strength), ranked in zip(starts[1:], (3, 2, 1)):
        assert strength == 0.4 and [int(im[0, 0, 0]) - 2 for im in start] == [ranked] * 3
    assert all(c.image is not None for r in out for c in r.candidates)  # drafts kept: finals start from them
    with pytest.raises(ValueError, match="needs draft mode"):
        SBPCConfig(candidates=4, final_steps=20, height=16, width=16, final_strength=0.5)
    with pytest.raises(ValueError, match="got 0.01"):
        SBPCConfig(candidates=4, final_steps=20, draft_steps=2, height=16, width=16, final_strength=0.01)


def test_adaptive_stops_each_graph_at_the_target():
    # g0 reaches 1.0 at candidate 1, g1 never, g2 at candidate 0.
    table = {"g0": [0.5, 1.0, 1.0, 1.0, 1.0], "g1": [0.1, 0.2, 0.3, 0.4, 0.5], "g2": [1.0] * 5}
    s = Scripted({(g, i): v for g, vs in table.items() for i, v in enumerate(vs)})
    cfg = SBPCConfig(candidates=5, final_steps=20, height=16, width=16, target_recall=1.0)
    out = run_sbpc(G, cfg, s.generate, s.score)
    assert [r.drawn for r in out] == [2, 5, 1]
    assert [len(ids) for ids, *_ in s.calls] == [3, 2, 1, 1, 1]  # the active set shrinks round by round
    assert [r.winner.index for r in out] == [1, 4, 0]


def test_adaptive_with_target_precision_stops_only_at_an_image_without_extra_objects():
    # every candidate of g0 finds the circle; candidates 0 and 1 also show an object the graph does not name
    recall = {(g.id, i): 1.0 for g in G for i in range(4)}
    s = Scripted(recall)
    extra = {0: 0.5, 1: 0.5}

    def score(images, graphs):
        seeds = s.calls[-1][1]
        return [RecallResult(**{**vars(r), "precision": extra.get(s.seed_index(g, seed), 1.0)})
                for r, g, seed in zip(Scripted.score(s, images, graphs), graphs, seeds)]

    cfg = SBPCConfig(candidates=4, final_steps=20, height=16, width=16, target_recall=1.0, target_precision=1.0)
    out = run_sbpc(G[:1], cfg, s.generate, score)
    assert out[0].drawn == 3 and out[0].winner.index == 2
    recall_only = run_sbpc(G[:1], SBPCConfig(candidates=4, final_steps=20, height=16, width=16, target_recall=1.0),
                           s.generate, score)
    assert recall_only[0].drawn == 1
    with pytest.raises(ValueError, match="needs target_recall"):
        SBPCConfig(candidates=4, final_steps=20, height=16, width=16, target_precision=1.0)


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="0"):
        SBPCConfig(candidates=0, final_steps=10, height=32, width=32)
    with pytest.raises(ValueError, match="12"):
        SBPCConfig(candidates=2, final_steps=10, height=32, width=32, draft_steps=2, draft_size=12)
    with pytest.raises(ValueError, match="1.5"):
        SBPCConfig(candidates=2, final_steps=10, height=32, width=32, target_recall=1.5)
    assert SBPCConfig(candidates=2, final_steps=9, draft_steps=2, target_recall=0.9, height=32, width=32).mode == "adaptive-draft"
    assert SBPCConfig(candidates=4, final_steps=9, draft_steps=2, final_candidates=2, target_recall=1.0, height=32,
                      width=32).mode == "adaptive-draft-finals"


def test_draft_noise_is_the_pooled_full_noise_with_unit_variance():
    full = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small = draft_noise(full, (16, 16))
    assert small.shape == (64, 3, 16, 16)
    assert small.std().item() == pytest.approx(1.0, abs=0.03)
    torch.testing.assert_close(small[0, 0, 0, 0], full[0, 0, :2, :2].mean() * 2)


def test_table3_statistics():
    stats = table3_statistics([[0.0, 0.5, 1.0], [0.8, 0.9]])
    assert stats["avg_min_recall"] == pytest.approx(0.4)
    assert stats["avg_max_recall"] == pytest.approx(0.95)
    assert stats["avg_median_recall"] == pytest.approx((0.5 + 0.85) / 2)
    assert stats["avg_count_at_least"] == {"0.5": pytest.approx(2.0), "0.75": pytest.approx(1.5), "0.9": pytest.approx(1.0)}
    assert stats["avg_candidates_drawn"] == pytest.approx(2.5)
