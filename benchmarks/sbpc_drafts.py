"""How well does a cheap draft predict the final image's recall? (Draft SBPC's recall target.)

    python benchmarks/sbpc_drafts.py [--count 32] [--start 0] [--candidates 8] [--final-steps 25] [--draft-steps 3]
        [--prefix-steps 3 4 6] [--small-drafts 32:6 32:10 16:6 16:10] [--skip-dpm] [--draft-model PATH]
        [--final-candidates 4] [--target-recall 1.0] [--final-strength 0.52 [--guided-finals 8]] [--json drafts.json]

Truth: every candidate of every held-out graph (the SBPC job's index-derived seeds) rendered at
``--final-steps`` with the model's own scheduler and scored by the segmenter. Each draft predictor
scores the same candidates cheaply; a graph's pick under the predictor (the job's draft rank:
recall, then expected recall, relation score, the lowest index) is looked up in the truth, so
"final recall" is what draft SBPC with that predictor outputs and naive best-of-N is its ceiling.
The job's ``--final-candidates M --target-recall R`` rule (render the best drafts' seeds in full,
in rank order, until a final image reaches R, at most M) is run on the same tables through
``run_sbpc`` itself: its recall against naive's and its full renders per graph, with standard
errors over graphs (on 256 graphs about ±0.005 and ±0.08). Predictors:

- ``ddim S``: the job's draft, S steps of the model's DDIM from the same noise;
- ``dpm S`` / ``dpm S thr``: DPM-Solver++ (2M) with S steps, plain and with x0 thresholded to
  [-1, 1] (as the model's DDIM clips);
- ``prefix m``: the x0-prediction after the first m steps of the final render itself; the winner
  would continue from there, so its final image is naive's and the first m steps are shared;
- ``ddim S @ P px``: the job's ``--draft-steps S --draft-size P`` (P at the model's size: more
  draft steps; smaller: the full-size noise average-pooled, as the job does);
- ``student K``: a distilled draft model (``--draft-model``, ``python -m jobs.distill_draft``): its
  own K steps from the same noise, without guidance (the job's ``--draft-model``).

With ``--draft-model`` and ``--final-strength S``: finals *finished from* the student's drafts
(the job's ``--final-strength``: image-to-image from the draft, the last ``int(S x F)`` steps).
Every candidate's draft is finished and scored as the second truth table, and the same rule runs
on it with up to ``--guided-finals`` finals per graph; its recall is compared with naive's
best-of-N rendered from noise, and its time speed-up counts the student's drafts plus each
finished final's measured seconds.

Cost per graph in UNet evaluations (guidance batched; a guidance-free student evaluation counts
half): naive N x F, draft N x S + F, prefix N x m + F - m, student N x K/2 + F; "step speed-up" = naive / that. "time speed-up" is measured: naive's seconds over
the predictor's seconds plus one final render per graph (a smaller draft costs fewer seconds, not
fewer evaluations). Also printed: how often the pick is naive's winner
and the correlation of draft recall with final recall over all candidates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sbpc import JOB_GUIDANCE, JOB_SEED, JOB_STEPS, fmt, text_table  # noqa: E402
from shapes_quality import HELD_OUT_SEED, held_out_graphs, write_json  # noqa: E402

from jobs.defaults import DEMO_MODEL, DEMO_SEGMENTER  # noqa: E402
from sgmodel.graph import SceneGraph  # noqa: E402
from sgmodel.pipeline import SceneGraphDiffusionPipeline  # noqa: E402
from sgmodel.sbpc import (  # noqa: E402
    Candidate,
    SBPCConfig,
    SBPCResult,
    candidate_seed,
    pick_winner,
    pipeline_generate_fn,
    rank_drafts,
    run_sbpc,
)
from sgmodel.scoring import RecallResult, SegmentationScorer  # noqa: E402

Render = Callable[[list[SceneGraph], list[int]], list[np.ndarray]]


class _Enough(Exception):
    """Ends the pipeline's denoising loop once the prefix has been run."""


def prefix_render(pipe: SceneGraphDiffusionPipeline, steps: int, prefix: int, guidance: float) -> Render:
    """Images of the x0-prediction after ``prefix`` of the ``steps`` final steps (the pipeline's own loop)."""

    def render(graphs: list[SceneGraph], seeds: list[int]) -> list[np.ndarray]:
        scheduler, predictions = pipe.scheduler, []
        original = scheduler.step

        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            predictions.append(out.pred_original_sample)
            if len(predictions) == prefix:
                raise _Enough
            return out

        scheduler.step = step  # instance attribute: shadows the method for this call only
        try:
            pipe(graphs, num_inference_steps=steps, guidance_scale=guidance, seeds=seeds, output_type="np")
        except _Enough:
            pass
        finally:
            del scheduler.step
        images = pipe.to_output(pipe.decode(predictions[-1]), "np")
        return [(im * 255).round().clip(0, 255).astype(np.uint8) for im in images]

    return render


def scheduler_render(pipe: SceneGraphDiffusionPipeline, scheduler, steps: int, guidance: float,
                     size: int | None = None) -> Render:
    """Images of ``steps`` steps of a scheduler from the same initial noise (average-pooled when ``size`` is smaller)."""
    generate = pipeline_generate_fn(pipe, guidance)
    size = size or pipe.default_size

    def render(graphs: list[SceneGraph], seeds: list[int]) -> list[np.ndarray]:
        own, pipe.scheduler = pipe.scheduler, scheduler
        try:
            return generate(graphs, seeds, steps, size, size)
        finally:
            pipe.scheduler = own

    return render


def guided_render(pipe: SceneGraphDiffusionPipeline, drafts: Render, steps: int, strength: float,
                  guidance: float) -> tuple[Render, list[float]]:
    """Finals finished from ``drafts`` (image-to-image at ``strength``, as the job's ``--final-strength``);
    the list collects the seconds of the finishing alone (the drafts are timed as their predictor)."""
    generate, seconds = pipeline_generate_fn(pipe, guidance), []

    def render(graphs: list[SceneGraph], seeds: list[int]) -> list[np.ndarray]:
        start = drafts(graphs, seeds)
        began = time.perf_counter()
        images = generate(graphs, seeds, steps, pipe.default_size, pipe.default_size, start=start, strength=strength)
        seconds.append(time.perf_counter() - began)
        return images

    return render, seconds


def student_predictor(path: str) -> tuple[str, float, int, Render]:
    """The distilled draft model's own steps, guidance-free (its teacher's guidance is baked in)."""
    from sgmodel.draft import load_draft_model

    student, draft = load_draft_model(path)
    generate, k = pipeline_generate_fn(student, 1.0), int(draft["draft_steps"])
    size = student.default_size

    def render(graphs: list[SceneGraph], seeds: list[int]) -> list[np.ndarray]:
        return generate(graphs, seeds, k, size, size)

    return f"student {k}", k / 2, 0, render


def score_all(render: Render, scorer: SegmentationScorer, graphs: list[SceneGraph], n: int, seed: int,
              chunk: int) -> tuple[list[list[RecallResult]], float]:
    """Per graph, the RecallResult of candidates 0..n-1; and the seconds it took."""
    jobs = [(g, i) for g in range(len(graphs)) for i in range(n)]
    results: list[list[RecallResult]] = [[] for _ in graphs]
    started = time.perf_counter()
    for begin in range(0, len(jobs), chunk):
        part = jobs[begin:begin + chunk]
        batch = [graphs[g] for g, _ in part]
        images = render(batch, [candidate_seed(graphs[g], seed, i) for g, i in part])
        for (g, _), res in zip(part, scorer.score(images, batch)):
            results[g].append(res)
    return results, time.perf_counter() - started


def picks(results: list[list[RecallResult]]) -> list[int]:
    """Naive's winner per graph (the selection rule on final images)."""
    return [pick_winner([Candidate(i, 0, r) for i, r in enumerate(per)]).index for per in results]


def draft_picks(results: list[list[RecallResult]]) -> list[int]:
    """The best draft per graph by the job's draft rank (recall, then expected recall, ...)."""
    return [rank_drafts([Candidate(i, 0, r) for i, r in enumerate(per)])[0].index for per in results]


def finals_rule(graphs: list[SceneGraph], truth: list[list[RecallResult]], drafts: list[list[RecallResult]],
                config: SBPCConfig) -> list[SBPCResult]:
    """The job's own ``run_sbpc`` in draft mode with ``final_candidates`` > 1, on already-scored images:
    its generate callables hand out (graph, candidate) tokens and its score callables look them up
    in ``drafts`` and ``truth``, so the rule decides exactly as in the job without rendering again."""
    where = {(g.id, candidate_seed(g, config.base_seed, i)): (k, i)
             for k, g in enumerate(graphs) for i in range(config.candidates)}

    def tokens(table):  # a token stands for the image: which table scores it, and its (graph, candidate)
        return lambda batch, seeds, *_, **_guided: [(table, *where[(g.id, s)]) for g, s in zip(batch, seeds)]

    def lookup(tokens, _graphs):
        return [table[k][i] for table, k, i in tokens]

    return run_sbpc(graphs, config, tokens(truth), lookup, generate_draft=tokens(drafts))


def rule_outcome(results: list[SBPCResult], best: list[float]) -> tuple[dict, float]:
    """The rule's recall minus naive's and its finals per graph, each with the standard error over
    graphs; and the finals made in all."""
    gaps = np.array([r.final.result.recall - b for r, b in zip(results, best)])
    finals = np.array([len(r.finals) for r in results], dtype=float)
    return {"rule_recall": statistics.fmean(r.final.result.recall for r in results),
            "rule_gap": float(gaps.mean()), "rule_gap_se": float(gaps.std(ddof=1) / np.sqrt(len(gaps))),
            "rule_finals": float(finals.mean()), "rule_finals_se": float(finals.std(ddof=1) / np.sqrt(len(finals)))
            }, float(finals.sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=32, help="held-out shapes graphs")
    parser.add_argument("--start", type=int, default=0,
                        help="first held-out graph (benchmarks/sbpc.py uses 0 … --count - 1; start past them to "
                             "measure on graphs it never sees)")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--final-steps", type=int, default=JOB_STEPS)
    parser.add_argument("--draft-steps", type=int, default=3)
    parser.add_argument("--skip-dpm", action="store_true", help="leave out the two DPM-Solver++ predictors")
    parser.add_argument("--final-candidates", type=int, default=4,
                        help="M of the job's --final-candidates rule, simulated for every predictor")
    parser.add_argument("--target-recall", type=float, default=1.0, help="the rule's stop")
    parser.add_argument("--prefix-steps", type=int, nargs="*", default=[3, 4, 6])
    parser.add_argument("--small-drafts", nargs="*", default=["32:6", "32:10", "16:6", "16:10"], metavar="PX:STEPS",
                        help="DDIM drafts of STEPS steps at PX pixels (below the model's size: the job's --draft-size, "
                             "from the pooled full-size noise)")
    parser.add_argument("--draft-model", default=None,
                        help="a distilled draft model folder (jobs.distill_draft): adds its drafts as a predictor")
    parser.add_argument("--final-strength", type=float, default=None,
                        help="with --draft-model: also finish every draft into a final (image-to-image at this "
                             "strength) and run the rule on those finals")
    parser.add_argument("--guided-finals", type=int, default=None,
                        help="the rule's M for finals finished from drafts (default: --candidates)")
    parser.add_argument("--guidance", type=float, default=JOB_GUIDANCE)
    parser.add_argument("--seed", type=int, default=JOB_SEED)
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--segmenter", default=str(DEMO_SEGMENTER))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=64, help="images per generate call")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import DPMSolverMultistepScheduler

    pipe = SceneGraphDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    scorer = SegmentationScorer.from_pretrained(args.segmenter, batch_size=args.chunk)
    graphs = held_out_graphs(args.start + args.count, HELD_OUT_SEED, pipe.default_size)[args.start:]
    n, f, s = args.candidates, args.final_steps, args.draft_steps
    base = pipe.scheduler.config

    truth, truth_seconds = score_all(scheduler_render(pipe, pipe.scheduler, f, args.guidance), scorer, graphs, n,
                                     args.seed, args.chunk)
    naive = picks(truth)
    predictors: list[tuple[str, float, int, Render]] = [  # name, evals per candidate, evals shared with the final
        (f"ddim {s}", s, 0, scheduler_render(pipe, pipe.scheduler, s, args.guidance)),
        *([] if args.skip_dpm else [
            (f"dpm {s}", s, 0, scheduler_render(pipe, DPMSolverMultistepScheduler.from_config(base), s,
                                                args.guidance)),
            (f"dpm {s} thr", s, 0, scheduler_render(
                pipe, DPMSolverMultistepScheduler.from_config(base, thresholding=True, sample_max_value=1.0), s,
                args.guidance))]),
        *((f"prefix {m}", m, m, prefix_render(pipe, f, m, args.guidance)) for m in args.prefix_steps),
        *((f"ddim {st} @ {px} px", int(st), 0, scheduler_render(pipe, pipe.scheduler, int(st), args.guidance, int(px)))
          for px, st in (d.split(":") for d in args.small_drafts)),
    ]
    if args.draft_model:
        predictors.append(student_predictor(args.draft_model))

    def final_of(chosen: list[int]) -> float:
        """Mean final-step recall of each graph's chosen candidate: what draft SBPC would output."""
        return statistics.fmean(truth[g][i].recall for g, i in enumerate(chosen))

    rule = SBPCConfig(candidates=n, final_steps=f, height=pipe.default_size, width=pipe.default_size,
                      draft_steps=s, final_candidates=args.final_candidates, target_recall=args.target_recall,
                      base_seed=args.seed)
    best = [truth[g][i].recall for g, i in enumerate(naive)]

    def rule_figures(drafts: list[list[RecallResult]], draft_seconds: float, shared: int) -> dict:
        """The ≤M-finals rule ordered by these drafts: recall and full renders per graph with standard
        errors over graphs, and its time speed-up (each final render costs a naive candidate's share of
        the truth's seconds, minus any steps it shares with its draft)."""
        outcome, renders = rule_outcome(finals_rule(graphs, truth, drafts, rule), best)
        final_seconds = renders * truth_seconds / (n * len(graphs)) * (f - shared) / f
        return {**outcome, "rule_time_speedup": truth_seconds / (draft_seconds + final_seconds)}

    rows = [{"predictor": f"naive (truth, {f} steps)", "evals": f, "step_speedup": 1.0, "time_speedup": 1.0,
             "final_recall": final_of(naive),
             "same_winner": len(graphs), "corr": 1.0, "seconds": truth_seconds}]
    rows.append({"predictor": "N=1", "evals": f, "step_speedup": float(n), "time_speedup": float(n),
                 "final_recall": final_of([0] * len(graphs)),
                 "same_winner": sum(w == 0 for w in naive), "corr": None, "seconds": truth_seconds / n})
    flat_truth = [r.recall for per in truth for r in per]
    for name, evals, shared, render in predictors:
        drafts, seconds = score_all(render, scorer, graphs, n, args.seed, args.chunk)
        chosen = draft_picks(drafts)
        flat = [r.recall for per in drafts for r in per]
        corr = float(np.corrcoef(flat, flat_truth)[0, 1]) if np.std(flat) and np.std(flat_truth) else None
        final_seconds = truth_seconds / n * (f - shared) / f  # the winner's render, minus any shared steps
        rows.append({"predictor": name, "evals": evals, "step_speedup": n * f / (n * evals + f - shared),
                     "time_speedup": truth_seconds / (seconds + final_seconds),
                     "final_recall": final_of(chosen), "same_winner": sum(a == b for a, b in zip(chosen, naive)),
                     "corr": corr, "seconds": seconds, **rule_figures(drafts, seconds, shared)})
        print(f"  {name}: {seconds:.0f} s", file=sys.stderr, flush=True)

    m = args.final_candidates
    header = ["predictor", "evals / cand.", "step speed-up", "time speed-up", "final recall", "same winner as naive",
              "corr. with final", f"≤{m} finals: recall - naive", "full renders / graph", "time speed-up"]

    def rule_cells(r: dict) -> list[str]:
        if "rule_gap" not in r:
            return ["–"] * 3
        return [f"{r['rule_gap']:+.4f} ± {r['rule_gap_se']:.4f}", f"{r['rule_finals']:.2f} ± {r['rule_finals_se']:.2f}",
                f"{r['rule_time_speedup']:.2f}x"]

    cells = [[r["predictor"], f"{r['evals']:g}", f"{r['step_speedup']:.2f}x",
              f"{r['time_speedup']:.2f}x", fmt(r["final_recall"]),
              f"{r['same_winner']}/{len(graphs)}", fmt(r["corr"]), *rule_cells(r)] for r in rows]
    print(f"\nDraft predictors on {len(graphs)} held-out shapes graphs ({args.start} … {args.start + len(graphs) - 1}) "
          f"x {n} candidates, demo model, {f} final steps, guidance {args.guidance}; ≤{m} finals: the job's "
          f"--final-candidates {m} --target-recall {args.target_recall:g} ordered by each predictor's drafts "
          "(± standard error over graphs)")
    print(text_table(header, cells))
    figures = {"count": len(graphs), "candidates": n, "final_steps": f, "guidance": args.guidance, "rows": rows}
    if args.draft_model and args.final_strength:
        figures["guided"] = guided_finals(args, pipe, scorer, graphs, best, predictors[-1], rows[-1]["seconds"],
                                          truth_seconds)
    if args.json:
        write_json(args.json, figures)
    return figures


def guided_finals(args, pipe, scorer, graphs, best: list[float], student, student_seconds: float,
                  truth_seconds: float) -> dict:
    """The rule on finals finished from the student's drafts: every draft finished and scored, then
    ``run_sbpc`` decides on those tables (drafts order the finals, as in the job)."""
    n, f, m = args.candidates, args.final_steps, args.guided_finals or args.candidates
    name, _, _, student_render = student
    kept: dict[tuple[str, int], np.ndarray] = {}

    def draft_render(batch: list[SceneGraph], seeds: list[int]) -> list[np.ndarray]:
        """The student's drafts, each made once: scored here, then finished from the same image."""
        missing = [(g, s) for g, s in zip(batch, seeds) if (g.id, s) not in kept]
        if missing:
            made = student_render([g for g, _ in missing], [s for _, s in missing])
            kept.update({(g.id, s): im for (g, s), im in zip(missing, made)})
        return [kept[(g.id, s)] for g, s in zip(batch, seeds)]

    drafts, _ = score_all(draft_render, scorer, graphs, n, args.seed, args.chunk)
    render, finishing = guided_render(pipe, draft_render, f, args.final_strength, args.guidance)
    guided, _ = score_all(render, scorer, graphs, n, args.seed, args.chunk)
    rule = SBPCConfig(candidates=n, final_steps=f, height=pipe.default_size, width=pipe.default_size, draft_steps=1,
                      final_candidates=m, target_recall=args.target_recall, final_strength=args.final_strength,
                      base_seed=args.seed)
    outcome, finals = rule_outcome(finals_rule(graphs, guided, drafts, rule), best)
    per_final = sum(finishing) / (n * len(graphs))
    out = {"strength": args.final_strength, "steps_each": int(f * args.final_strength), "finals_max": m,
           "candidate_recall": statistics.fmean(r.recall for per in guided for r in per),
           "best_of_n": statistics.fmean(max(r.recall for r in per) for per in guided),
           **outcome, "seconds_per_final": per_final, "seconds_per_naive_candidate": truth_seconds / (n * len(graphs)),
           "rule_time_speedup": truth_seconds / (student_seconds + finals * per_final)}
    print(f"\nFinals finished from the {name} drafts ({out['steps_each']} of {f} steps each, strength "
          f"{args.final_strength:g}): candidate recall {out['candidate_recall']:.3f}, best-of-{n} {out['best_of_n']:.3f} "
          f"(from noise: {statistics.fmean(best):.3f}); ≤{m} finals "
          f"(≥{args.target_recall:g}): recall - naive {out['rule_gap']:+.4f} ± {out['rule_gap_se']:.4f}, "
          f"{out['rule_finals']:.2f} ± {out['rule_finals_se']:.2f} finals / graph at {per_final:.3f} s each "
          f"(a naive candidate {out['seconds_per_naive_candidate']:.3f} s), time speed-up {out['rule_time_speedup']:.2f}x")
    return out


if __name__ == "__main__":
    main()
