"""Draft-model distillation: teacher pairs, the student's training, the CLI that runs both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jobs.distill_draft import PAIR_STREAM
from jobs.distill_draft import main as distill_main
from sgmodel.draft import check_draft_teacher, load_draft_model, read_draft_config
from sgmodel.fingerprint import model_fingerprint
from sgmodel.pipeline import SceneGraphDiffusionPipeline
from sgmodel.shapes.draft_distill import (
    load_pairs,
    pair_seed,
    shapes_graphs,
    train_draft_student,
    write_teacher_pairs,
)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir) -> SceneGraphDiffusionPipeline:
    pipe = SceneGraphDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pairs_are_the_teachers_renders_of_their_seeds_and_reruns_keep_them(teacher, tmp_path):
    paths = write_teacher_pairs(teacher, tmp_path, stream=3, start=10, count=6, batch_size=4, steps=2, guidance=2.0,
                                log=lambda _: None)
    assert [p.name for p in paths] == ["pairs-00000003-00000010.safetensors", "pairs-00000003-00000014.safetensors"]
    pairs = load_pairs(paths)
    assert pairs["index"].tolist() == list(range(10, 16)) and (pairs["steps"], pairs["guidance"]) == (2, 2.0)
    seeds = [pair_seed(3, i) for i in range(10, 16)]
    torch.testing.assert_close(pairs["noise"], teacher.initial_noise(seeds, 16, 16))
    expected = teacher(shapes_graphs(3, range(10, 16)), num_inference_steps=2, guidance_scale=2.0, seeds=seeds,
                       output_type="latent").images
    torch.testing.assert_close(pairs["target"], expected)

    before = [p.stat().st_mtime_ns for p in paths]
    write_teacher_pairs(teacher, tmp_path, stream=3, start=10, count=6, batch_size=4, steps=2, guidance=2.0,
                        log=lambda _: pytest.fail("an existing shard was rendered again"))
    assert [p.stat().st_mtime_ns for p in paths] == before

    other = write_teacher_pairs(teacher, tmp_path / "other", stream=3, start=16, count=4, batch_size=4, steps=2,
                                guidance=3.0, log=lambda _: None)
    with pytest.raises(ValueError, match="mix streams/steps/guidance"):
        load_pairs(paths + other)


def test_student_learns_the_teachers_renders_and_loads_as_a_pipeline(teacher, tiny_model_dir, tmp_path):
    paths = write_teacher_pairs(teacher, tmp_path / "pairs", stream=0, start=0, count=48, batch_size=8, steps=2,
                                log=lambda _: None)
    torch.manual_seed(0)
    summary = train_draft_student(tiny_model_dir, paths, tmp_path / "student", draft_steps=2, train_steps=12,
                                  batch_size=8, lr=1e-3, warmup_steps=2, val_count=16, eval_every=4,
                                  log=lambda _: None)
    history = summary["history"]
    assert [h["step"] for h in history] == [0, 4, 8, 12]
    assert summary["best_val_mse"] == min(h["val_mse"] for h in history) < history[0]["val_mse"]
    assert read_draft_config(tmp_path / "student") == {
        "teacher": tiny_model_dir, "teacher_fingerprint": model_fingerprint(tiny_model_dir), "teacher_steps": 2,
        "guidance": 3.0, "draft_steps": 2}
    with pytest.raises(ValueError, match="learnt the renders of"):  # another model's draft is refused
        check_draft_teacher(read_draft_config(tmp_path / "student"), "student", "0123456789abcdef")
    assert read_draft_config(tiny_model_dir) is None

    # The saved student is the best one: its guidance-free 2-step drafts of the held-out pairs have that MSE.
    student = SceneGraphDiffusionPipeline.from_pretrained(tmp_path / "student")
    student.set_progress_bar_config(disable=True)
    assert student.scheduler.config.prediction_type == "sample"
    pairs = load_pairs(paths)
    held_out = pairs["index"][-16:].tolist()
    drafts = student(shapes_graphs(0, held_out), num_inference_steps=2, guidance_scale=1.0,
                     seeds=[pair_seed(0, i) for i in held_out], latents=pairs["noise"][-16:], output_type="latent")
    mse = torch.nn.functional.mse_loss(drafts.images, pairs["target"][-16:]).item()
    assert mse == pytest.approx(summary["best_val_mse"], rel=1e-4)
    # Encoders are the teacher's: a graph's condition is the same for draft and final.
    for name in ("graph_encoder", "conditioner"):
        for a, b in zip(getattr(student, name).state_dict().values(), getattr(teacher, name).state_dict().values()):
            torch.testing.assert_close(a, b)


def test_cli_makes_pairs_in_processes_then_trains_the_student(tiny_model_dir, tmp_path, capsys):
    pairs_dir, out = tmp_path / "pairs", tmp_path / "student"
    args = ["--teacher", tiny_model_dir, "--output", str(out), "--pairs-dir", str(pairs_dir), "--pairs", "40",
            "--batch-size", "8", "--val-count", "16", "--train-steps", "4", "--teacher-steps", "2", "--processes", "2",
            "--threads", "1"]
    assert distill_main(args) == 0
    shards = sorted(pairs_dir.glob("*.safetensors"))
    assert [p.name for p in shards] == [f"pairs-{PAIR_STREAM:08d}-{i:08d}.safetensors" for i in range(0, 40, 8)]
    assert np.concatenate([load_file(str(p))["index"].numpy() for p in shards]).tolist() == list(range(40))
    assert read_draft_config(out)["draft_steps"] == 2 and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    capsys.readouterr()
    assert distill_main(args + ["--val-count", "40"]) == 2  # checked before anything runs, one line
    assert "--val-count = 40: must be in 1 … 39" in capsys.readouterr().err
    # --skip-pairs trains on what is there; an empty folder is a clear error
    assert distill_main(args + ["--skip-pairs", "--output", str(tmp_path / "again")]) == 0
    # --init-student continues an earlier student: it starts at that student's held-out loss
    more = tmp_path / "more"
    assert distill_main(args + ["--skip-pairs", "--init-student", str(out), "--output", str(more)]) == 0
    first, second = (json.loads((d / "training_summary.json").read_text()) for d in (out, more))
    assert second["history"][0]["val_mse"] == pytest.approx(first["best_val_mse"], rel=1e-4)
    assert second["history"][0]["val_mse"] != pytest.approx(first["history"][0]["val_mse"], rel=1e-4)
    assert (second["init_from"], second["total_train_steps"]) == (str(out), 8)
    with pytest.raises(ValueError, match="not a 3-step draft student"):
        distill_main(args + ["--skip-pairs", "--init-student", str(out), "--draft-steps", "3",
                             "--output", str(tmp_path / "wrong")])
    assert distill_main(args + ["--skip-pairs", "--pairs-dir", str(Path(tmp_path / "empty"))]) == 2
    assert "empty': has no pair shards" in capsys.readouterr().err


def test_committed_draft_model_is_distilled_from_the_demo_model_at_the_job_defaults():
    from jobs.defaults import DEMO_MODEL, resolve
    from jobs.generate import GenerateConfig

    path = resolve("models/shapes-sg-diffusion-draft")
    draft = read_draft_config(path)
    assert draft == {"teacher": DEMO_MODEL, "teacher_steps": GenerateConfig.steps,
                     "guidance": GenerateConfig.guidance, "draft_steps": 2,
                     "teacher_fingerprint": model_fingerprint(resolve(DEMO_MODEL))}
    student, config = load_draft_model(path)
    assert config == draft
    demo = SceneGraphDiffusionPipeline.from_pretrained(resolve(DEMO_MODEL))
    with pytest.raises(ValueError, match="no draft.json, not a distilled draft model"):
        load_draft_model(resolve(DEMO_MODEL))
    assert student.scheduler.config.prediction_type == "sample" and student.default_size == demo.default_size
    for name in ("text_encoder", "graph_encoder", "conditioner"):  # only the UNet was trained
        for (key, a), b in zip(getattr(student, name).state_dict().items(), getattr(demo, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key} differs from the demo model's"
