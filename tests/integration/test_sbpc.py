"""The SBPC job on a local Ray instance: candidates table, winners, Table 3 statistics, adaptive stop."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.sbpc import SBPCJobConfig, run
from sgmodel.graph import SceneGraph, SGObject
from sgmodel.sbpc import candidate_seed
from tests.integration.jobdata import shapes_rows, write_shards

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def read(run_dir: Path, folder: str):
    return pq.ParquetDataset(sorted((run_dir / folder).glob("*.parquet"))).read().to_pylist()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sbpc-in") / "graphs"
    write_shards(folder, shapes_rows(5, seed=11), per_shard=3)
    return folder


def config(model, segmenter, inputs, out, run_id, **kw) -> SBPCJobConfig:
    kw.setdefault("report", False)
    return SBPCJobConfig(input=str(inputs), output=str(out), model=model, segmenter=segmenter, run_id=run_id,
                         steps=4, batch_size=3, log_every=1000, **kw)


def test_draft_sbpc_candidates_winners_and_statistics(local_ray, tiny_model_dir, segmenter_dir, inputs, tmp_path):
    summary, code = run(config(tiny_model_dir, segmenter_dir, inputs, tmp_path, "d", candidates=3, draft_steps=2,
                               final_candidates=2, keep_candidates=True, report=True))
    assert code == 0
    run_dir = tmp_path / "d"
    cands, meta = read(run_dir, "candidates"), read(run_dir, "metadata")
    assert len(meta) == 5 and summary["images"] == 5 and summary["rows_lost"] == 0
    assert len(cands) == 15
    by_id: dict[str, list[dict]] = {}
    for c in cands:
        by_id.setdefault(c["id"], []).append(c)
    for row in meta:
        pool = sorted(by_id[row["id"]], key=lambda c: c["candidate_index"])
        graph = SceneGraph(id=row["id"], objects=(SGObject("x"),))
        assert [c["candidate_index"] for c in pool] == [0, 1, 2]
        assert [c["seed"] for c in pool] == [candidate_seed(graph, 0, i) for i in range(3)]
        assert all(c["stage"] == "draft" and c["steps"] == 2 and c["expected_recall"] is not None for c in pool)
        # drafts rank by recall, expected recall, relation score, lowest index; the 2 best are rendered in full
        ranked = sorted(pool, key=lambda c: (c["recall"], c["expected_recall"],
                                             -1 if c["relation_score"] is None else c["relation_score"],
                                             -c["candidate_index"]), reverse=True)
        assert [c["final_recall"] is not None for c in ranked] == [True, True, False]
        assert row["finals_rendered"] == 2
        # ... and the best final image wins
        winner = next(c for c in pool if c["won"])
        assert [c["won"] for c in pool].count(True) == 1 and winner in ranked[:2]
        assert row["recall"] == winner["final_recall"] == max(c["final_recall"] for c in ranked[:2])
        assert row["winner_candidate"] == winner["candidate_index"] and row["seed"] == winner["seed"]
        assert row["steps"] == 4 and row["candidates_drawn"] == 3
        assert all((run_dir / c["image_key"]).is_file() for c in pool)
    recalls = [[c["recall"] for c in pool] for pool in by_id.values()]
    s = summary["sbpc"]
    assert s["mode"] == "draft-finals"
    assert s["avg_max_recall"] == pytest.approx(statistics.fmean(max(r) for r in recalls))
    assert s["avg_min_recall"] == pytest.approx(statistics.fmean(min(r) for r in recalls))
    assert s["avg_median_recall"] == pytest.approx(statistics.fmean(statistics.median(r) for r in recalls))
    assert s["avg_count_at_least"]["0.5"] == pytest.approx(statistics.fmean(sum(v >= 0.5 for v in r) for r in recalls))
    assert s["avg_candidates_drawn"] == 3.0 and s["avg_finals_rendered"] == 2.0 and s["seconds_per_graph"] > 0
    assert summary["recall"]["mean"] == pytest.approx(statistics.fmean(r["recall"] for r in meta))
    # the report shows each graph's candidates side by side, one winner marked per graph
    html = (run_dir / "report.html").read_text()
    assert "sbpc-table" in html
    assert html.count('class="cand-graph"') == 5 and html.count('class="cand winner"') == 5
    assert html.count('class="cand"') == 10


def test_draft_guided_finals_are_finished_from_the_winning_draft(local_ray, tiny_model_dir, segmenter_dir, inputs,
                                                                 tmp_path):
    import numpy as np
    from PIL import Image

    from jobs.config import ConfigError
    from sgmodel.pipeline import SceneGraphDiffusionPipeline
    from workers.validate import graph_from_json

    summary, code = run(config(tiny_model_dir, segmenter_dir, inputs, tmp_path, "g", candidates=3, draft_steps=2,
                               final_strength=0.5, keep_candidates=True))
    assert code == 0 and summary["images"] == 5 and summary["sbpc"]["final_strength"] == 0.5
    run_dir = tmp_path / "g"
    pipe = SceneGraphDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    cands = read(run_dir, "candidates")
    for row in read(run_dir, "metadata"):
        winner = next(c for c in cands if c["id"] == row["id"] and c["won"])
        draft = np.asarray(Image.open(run_dir / winner["image_key"]).convert("RGB"))
        # the kept image: the model's 4-step schedule from step 2 on, started from the winning draft
        expected = pipe([graph_from_json(row["graph"])], num_inference_steps=4, seeds=[row["seed"]], image=[draft],
                        strength=0.5, output_type="np").images[0]
        got = np.asarray(Image.open(run_dir / row["image_key"])).astype(np.int16)
        assert np.abs(got - np.round(expected * 255).astype(np.int16)).max() <= 1
    with pytest.raises(ConfigError, match="--final-strength"):
        config(tiny_model_dir, segmenter_dir, inputs, tmp_path, "x", candidates=3, final_strength=0.5)
    with pytest.raises(ConfigError, match="--final-strength"):
        config(tiny_model_dir, segmenter_dir, inputs, tmp_path, "x", candidates=3, draft_steps=2, final_strength=0.1)


def test_adaptive_naive_sbpc_stops_early_and_is_deterministic(local_ray, tiny_model_dir, segmenter_dir, inputs, tmp_path):
    # A target of 0 is reached by the first candidate: exactly one candidate per graph.
    summary, code = run(config(tiny_model_dir, segmenter_dir, inputs, tmp_path, "a", candidates=4, target_recall=0.0))
    assert code == 0 and summary["sbpc"]["avg_candidates_drawn"] == 1.0
    assert all(r["candidates_drawn"] == 1 and r["winner_candidate"] == 0 for r in read(tmp_path / "a", "metadata"))
    # naive N=1 at the same steps renders the same first-candidate images
    run(config(tiny_model_dir, segmenter_dir, inputs, tmp_path, "n", candidates=1))
    a = {p.name: p.read_bytes() for p in (tmp_path / "a" / "images").rglob("*.png")}
    n = {p.name: p.read_bytes() for p in (tmp_path / "n" / "images").rglob("*.png")}
    assert a == n and len(a) == 5


def test_draft_model_draws_the_candidates_without_guidance(
        local_ray, tiny_model_dir, segmenter_dir, inputs, tmp_path):
    import numpy as np
    from PIL import Image

    from jobs.config import ConfigError
    from sgmodel.pipeline import SceneGraphDiffusionPipeline
    from sgmodel.shapes.draft_distill import train_draft_student, write_teacher_pairs
    from workers.validate import graph_from_json

    teacher = SceneGraphDiffusionPipeline.from_pretrained(tiny_model_dir)
    teacher.set_progress_bar_config(disable=True)
    pairs = write_teacher_pairs(teacher, tmp_path / "pairs", stream=0, start=0, count=24, batch_size=8, steps=4,
                                log=lambda _: None)
    student_dir = tmp_path / "student"
    train_draft_student(tiny_model_dir, pairs, student_dir, draft_steps=2, train_steps=2, batch_size=8, val_count=8,
                        eval_every=1, log=lambda _: None)

    summary, code = run(config(tiny_model_dir, segmenter_dir, inputs, tmp_path, "s", candidates=3,
                               draft_model=str(student_dir), keep_candidates=True))
    assert code == 0 and summary["images"] == 5 and summary["sbpc"]["mode"] == "draft"
    run_dir = tmp_path / "s"
    meta = {r["id"]: r for r in read(run_dir, "metadata")}
    student = SceneGraphDiffusionPipeline.from_pretrained(student_dir)
    student.set_progress_bar_config(disable=True)
    for cand in read(run_dir, "candidates"):
        assert cand["steps"] == 2  # the student's own step count, from its draft.json
        graph = graph_from_json(meta[cand["id"]]["graph"])
        expected = student([graph], num_inference_steps=2, guidance_scale=1.0, seeds=[cand["seed"]],
                           output_type="np").images[0]
        got = np.asarray(Image.open(run_dir / cand["image_key"])).astype(np.int16)
        assert np.abs(got - np.round(expected * 255).astype(np.int16)).max() <= 1
    for row in meta.values():  # the kept image is the teacher's own render of the winning seed
        final = teacher([graph_from_json(row["graph"])], num_inference_steps=4, seeds=[row["seed"]],
                        output_type="np").images[0]
        got = np.asarray(Image.open(run_dir / row["image_key"])).astype(np.int16)
        assert row["steps"] == 4 and np.abs(got - np.round(final * 255).astype(np.int16)).max() <= 1

    with pytest.raises(ConfigError, match="--draft-model = .*no draft.json"):
        config(tiny_model_dir, segmenter_dir, inputs, tmp_path, "x", candidates=3, draft_model=tiny_model_dir)
    with pytest.raises(ConfigError, match="--draft-size = 8: cannot be combined with --draft-model"):
        config(tiny_model_dir, segmenter_dir, inputs, tmp_path, "x", candidates=3, draft_model=str(student_dir),
               draft_steps=2, draft_size=8)


def test_fast_runs_the_committed_models_settings(local_ray, inputs, tmp_path):
    """`sbpc --fast` through the job: candidates, steps and stopping follow the committed demo model's
    sbpc_fast.json (and its draft model drafts every candidate when it names one)."""
    root = Path(__file__).resolve().parents[2]
    fast = json.loads((root / "models/shapes-sg-diffusion/sbpc_fast.json").read_text())
    cfg = SBPCJobConfig(input=str(inputs), output=str(tmp_path), model=str(root / "models/shapes-sg-diffusion"),
                        segmenter=str(root / "models/shapes-segmenter"), run_id="fast", batch_size=3,
                        log_every=1000, report=False, fast=True, keep_candidates=True)
    summary, code = run(cfg)
    assert code == 0 and summary["images"] == 5 and summary["rows_lost"] == 0
    cands, meta = read(tmp_path / "fast", "candidates"), read(tmp_path / "fast", "metadata")
    final_steps = fast["final_steps"] or SBPCJobConfig.steps
    assert all(row["steps"] == final_steps for row in meta)
    by_id: dict[str, list[dict]] = {}
    for c in cands:
        by_id.setdefault(c["id"], []).append(c)
    if fast["draft_model"] is not None:
        assert len(cands) == 5 * fast["candidates"]
        assert all(c["stage"] == "draft" and c["steps"] == 2 for c in cands)  # the draft model's own step count
        assert all(1 <= row["finals_rendered"] <= fast["final_candidates"] for row in meta)
        return
    # candidates are final images, drawn in index order until one reaches the target recall (and precision)
    target, target_precision = fast["target_recall"], fast["target_precision"] or 0.0

    def reached(c: dict) -> bool:
        return c["recall"] >= target and (c["precision"] or 0.0) >= target_precision

    for row in meta:
        pool = sorted(by_id[row["id"]], key=lambda c: c["candidate_index"])
        assert [c["candidate_index"] for c in pool] == list(range(len(pool))) and len(pool) == row["candidates_drawn"]
        assert all(c["steps"] == final_steps for c in pool)
        if target is not None:
            assert not any(reached(c) for c in pool[:-1])
            assert len(pool) == fast["candidates"] or reached(pool[-1])
