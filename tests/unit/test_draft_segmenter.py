"""The draft segmenter: trained on (student draft -> final segmenter's map of the teacher render)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgmodel.draft_distill import (
    load_draft_model,
    load_pairs,
    pair_seed,
    shapes_graphs,
    train_draft_student,
    write_teacher_pairs,
)
from sgmodel.draft_segmenter import draft_training_data, read_draft_segmenter_config, train_draft_segmenter
from sgmodel.pipeline import SceneGraphDiffusionPipeline
from sgmodel.recall import SegmentationScorer
from sgmodel.sbpc import pipeline_generate_fn

STREAM = 5


@pytest.fixture(scope="module")
def distilled(tiny_model_dir, tmp_path_factory):
    """Teacher pairs of the tiny model and a (barely trained) student: a real draft model folder."""
    root = tmp_path_factory.mktemp("draft-seg")
    teacher = SceneGraphDiffusionPipeline.from_pretrained(tiny_model_dir)
    teacher.set_progress_bar_config(disable=True)
    paths = write_teacher_pairs(teacher, root / "pairs", stream=STREAM, start=0, count=48, batch_size=16, steps=2,
                                log=lambda _: None)
    train_draft_student(tiny_model_dir, paths, root / "student", draft_steps=2, train_steps=1, batch_size=8,
                        val_count=8, eval_every=1, log=lambda _: None)
    return teacher, paths, root / "student"


def test_training_data_are_the_jobs_drafts_and_the_final_segmenters_maps(distilled, segmenter_dir):
    teacher, paths, student_dir = distilled
    student, draft = load_draft_model(student_dir)
    scorer = SegmentationScorer.from_pretrained(segmenter_dir)
    pairs = load_pairs(paths[:1])
    # One batch of the shard's 16 pairs, as the reference calls below: batch shapes change odd pixels.
    images, labels = draft_training_data(student, draft["draft_steps"], scorer, pairs, batch_size=16)
    indices = pairs["index"].tolist()
    graphs, seeds = shapes_graphs(STREAM, indices), [pair_seed(STREAM, i) for i in indices]
    # Drafts: what the SBPC job's draft generator returns for these seeds (guidance-free, the student's steps).
    expected = pipeline_generate_fn(student, 1.0)(graphs, seeds, draft["draft_steps"], 16, 16)
    assert np.abs(images.astype(np.int16) - np.stack(expected).astype(np.int16)).max() <= 1
    # Labels: the final segmenter's class maps of the teacher's full renders of the same seeds (the pairs'
    # targets, which are those renders up to odd pixels).
    stored = list((student.decode(pairs["target"]).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    finals = pipeline_generate_fn(teacher, 3.0)(graphs, seeds, 2, 16, 16)
    assert max(np.abs(a.astype(np.int16) - b.astype(np.int16)).max() for a, b in zip(stored, finals)) <= 1
    np.testing.assert_array_equal(labels, np.stack(scorer.segment(stored)))


def test_draft_segmenter_learns_the_final_maps_and_saves_the_best(distilled, segmenter_dir, tmp_path):
    _, paths, student_dir = distilled
    torch.manual_seed(0)
    summary = train_draft_segmenter(segmenter_dir, student_dir, paths, tmp_path / "seg", train_steps=8, batch_size=8,
                                    lr=1e-3, val_count=16, eval_every=4, log=lambda _: None)
    history = summary["history"]
    assert [h["step"] for h in history] == [0, 4, 8]
    best = min(history, key=lambda h: h["val_loss"])
    assert summary["best_step"] == best["step"] and best["val_loss"] < history[0]["val_loss"]
    assert read_draft_segmenter_config(tmp_path / "seg") == {
        "draft_model": str(student_dir), "draft_steps": 2, "final_segmenter": segmenter_dir}
    assert read_draft_segmenter_config(segmenter_dir) is None

    # The saved model is the best one: scored through the job's scorer class, its held-out drafts
    # have the recall error the summary reports.
    student, draft = load_draft_model(student_dir)
    final_scorer = SegmentationScorer.from_pretrained(segmenter_dir)
    images, labels = draft_training_data(student, 2, final_scorer, load_pairs(paths))
    graphs = shapes_graphs(STREAM, range(32, 48))
    saved = SegmentationScorer.from_pretrained(tmp_path / "seg")
    draft_recall = np.array([r.recall for r in saved.score(list(images[32:]), graphs)])
    final_recall = np.array([r.recall for r in final_scorer.score_class_maps(labels[32:], graphs)])
    assert np.abs(draft_recall - final_recall).mean() == pytest.approx(best["recall_mae"])


def test_committed_draft_segmenter_reads_the_committed_draft_models_drafts():
    from jobs.defaults import DEMO_SEGMENTER, resolve
    from sgmodel.draft_distill import read_draft_config

    path = resolve("models/shapes-segmenter-draft")
    draft_model = "models/shapes-sg-diffusion-draft"
    assert read_draft_segmenter_config(path) == {
        "draft_model": draft_model, "draft_steps": read_draft_config(resolve(draft_model))["draft_steps"],
        "final_segmenter": DEMO_SEGMENTER}
    draft_scorer, final_scorer = SegmentationScorer.from_pretrained(path), SegmentationScorer.from_pretrained(
        resolve(DEMO_SEGMENTER))
    assert draft_scorer.id2label == final_scorer.id2label
    changed = [k for k, v in draft_scorer.model.state_dict().items()
               if not torch.equal(v, final_scorer.model.state_dict()[k])]
    assert changed  # fine-tuned, not a copy
