"""The shapes segmenter: training runs end to end, saves a loadable folder; the committed checkpoint reads renders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sgmodel.shapes.segmenter import (
    EVAL_SEED,
    TINY_ARCH,
    augment,
    build_processor,
    evaluate_segmenter,
    load_segmenter,
    main,
    pixel_values_from_tensor,
    render_batch,
    segment,
    segmenter_config,
    train_segmenter,
)
from sgmodel.shapes.world import CLASS_NAMES, shapes_sample

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "shapes-segmenter"


def test_config_labels_and_validation():
    config = segmenter_config()
    assert config.num_labels == len(CLASS_NAMES) == 16
    assert config.id2label[0] == "background" and config.label2id["red circle"] == 1
    with pytest.raises(ValueError, match="divisible"):
        segmenter_config(hidden_sizes=(30, 64, 96, 128), num_attention_heads=(4, 2, 4, 8))
    with pytest.raises(ValueError, match="4 encoder stages"):
        segmenter_config(hidden_sizes=(32, 64), depths=(1, 1), num_attention_heads=(1, 2))


def test_training_transform_matches_the_processor():
    """Training feeds tensors, inference goes through the processor: both must see the same input."""
    processor = build_processor()
    images = [np.asarray(shapes_sample(2, i, 32)[1].image) for i in range(3)]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    got = pixel_values_from_tensor(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, processor)
    assert got.shape == expected.shape == (3, 3, 128, 128)
    # within two grey levels (in normalised units) of the PIL bilinear resize
    assert (got - expected).abs().max() < 2 / 255 / 0.224 + 1e-4


def test_augment_keeps_shape_range_and_is_seeded():
    images, labels = render_batch(seed=1, start=0, batch_size=8, image_size=32)
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8, 32, 32) and labels.dtype == torch.long
    a = augment(images, torch.Generator().manual_seed(0))
    b = augment(images, torch.Generator().manual_seed(0))
    assert a.shape == images.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, images)


def test_train_segmenter_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "seg"
    summary = train_segmenter(
        out, steps=4, batch_size=4, seed=3, image_size=32, lr=1e-3, log_every=2, arch=TINY_ARCH, input_size=64
    )
    logged = capsys.readouterr().out
    assert "step 2/4 loss" in logged and "step 4/4 loss" in logged and "pixel_acc" in logged
    assert summary["steps"] == 4 and summary["seed"] == 3
    assert (out / "model.safetensors").exists() and (out / "preprocessor_config.json").exists()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert json.loads((out / "training_summary.json").read_text())["parameters"] == summary["parameters"]

    model, processor = load_segmenter(out)
    assert processor.size == {"height": 64, "width": 64}
    renders = [shapes_sample(EVAL_SEED, i, 32)[1] for i in range(3)]
    maps = segment(model, processor, [r.image for r in renders])
    assert maps.shape == (3, 32, 32) and maps.dtype == np.uint8
    assert maps.max() < len(CLASS_NAMES)

    # same seed, same weights: training is reproducible
    again = train_segmenter(
        tmp_path / "again", steps=4, batch_size=4, seed=3, image_size=32, lr=1e-3, log_every=2,
        arch=TINY_ARCH, input_size=64,
    )
    assert again["parameters"] == summary["parameters"]
    from safetensors.torch import load_file

    first, second = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cli_and_evaluation(tmp_path):
    summary = main(
        ["--output", str(tmp_path / "cli"), "--steps", "2", "--batch-size", "2", "--tiny", "--eval-count", "4",
         "--log-every", "1"]
    )
    report = summary["eval"]
    assert report["images"] == 4 and report["objects"] >= 4
    for key in ("pixel_accuracy", "foreground_pixel_accuracy", "object_recall", "mean_object_iou"):
        assert 0.0 <= report[key] <= 1.0
    with pytest.raises(ValueError, match="held out"):
        train_segmenter(tmp_path / "x", steps=1, seed=EVAL_SEED, eval_count=1, arch=TINY_ARCH)


@pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").exists(), reason="no committed segmenter checkpoint")
def test_committed_checkpoint_reads_clean_renders(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(CHECKPOINT, local_files_only=True).eval()
    processor = AutoImageProcessor.from_pretrained(CHECKPOINT, local_files_only=True)
    assert model.config.id2label[0] == "background" and model.config.num_labels == 16
    renders = [shapes_sample(EVAL_SEED + 1, i, 32)[1] for i in range(16)]
    maps = segment(model, processor, [r.image for r in renders])
    truth = np.stack([r.class_map for r in renders])
    assert maps.shape == truth.shape == (16, 32, 32)
    assert (maps == truth).mean() > 0.95
    foreground = truth > 0
    assert (maps[foreground] == truth[foreground]).mean() > 0.85
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 6_000_000


@pytest.mark.slow
@pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").exists(), reason="no committed segmenter checkpoint")
def test_committed_checkpoint_object_recall():
    report = evaluate_segmenter(CHECKPOINT, count=100, seed=EVAL_SEED + 2, size=32)
    assert report["object_recall"] >= 0.97
    assert report["pixel_accuracy"] >= 0.97
    assert report["spurious_per_image"] <= 0.1
    # blurred, noisy, colour-shifted renders (a proxy for generated images) still read well
    degraded = evaluate_segmenter(CHECKPOINT, count=100, seed=EVAL_SEED + 2, size=32, degraded=True)
    assert degraded["degraded"] and degraded["object_recall"] >= 0.9
