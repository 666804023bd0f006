"""The fine-tuning job on a local Ray instance: 2 CPU workers, gloo, DeepSpeed ZeRO-2/3, a tiny model.

Each test runs the real job (Ray Data -> TorchTrainer -> deepspeed.initialize -> checkpoints ->
export) for a few dozen steps of the debug flavour on a small shapes table with bad rows mixed in.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.finetune import RUN_NAME, FinetuneConfig, run
from jobs.runs import RunExistsError
from sgmodel.graph import graph_to_row, parse_graph
from sgmodel.optim import lr_factor
from sgmodel.pipeline import SceneGraphDiffusionPipeline
from sgmodel.shapes.world import iter_shapes_records
from tests.integration.jobdata import write_shards
from tests.unit.test_pipeline import tiny_sd_folder  # noqa: F401 - a fixture
from workers import train_loop

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BAD_TRAINING_ROWS = {
    # expected reason code: the row
    "image_undecodable": {"id": "bad-bytes", "image": b"certainly not a PNG"},
    "image_missing": {"id": "bad-null", "image": None},
    "relation_index_out_of_range": {"id": "bad-graph", "relations": [{"subject": 0, "predicate": "above", "object": 9}]},
}
ZERO3_PARTITION_ALL = '{"zero_optimization": {"stage3_param_persistence_threshold": 0}}'
"""The debug model's tensors are all below ZeRO-3's default persistence threshold: partition them anyway."""


def training_rows(count: int, seed: int, size: int = 24) -> list[dict]:
    """Shapes graphs with their rendered PNGs (24 px: the job resizes them to the model's 16 px)."""
    return [graph_to_row(g) for g, _ in iter_shapes_records(count, seed, size)]


def with_bad_rows(rows: list[dict]) -> list[dict]:
    out = list(rows)
    for i, (_, patch) in enumerate(BAD_TRAINING_ROWS.items()):
        out.insert(7 + 11 * i, {**rows[i], **patch})  # spread over the shards
    return out


@pytest.fixture(scope="module")
def train_table(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tables") / "train"
    write_shards(folder, with_bad_rows(training_rows(64, seed=11)), per_shard=24)
    return folder


@pytest.fixture(scope="module")
def val_table(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tables") / "val"
    write_shards(folder, training_rows(16, seed=12), per_shard=16)
    return folder


def config(train: str, base: str, output: str, **kw) -> FinetuneConfig:
    values = dict(train=train, base=base, output=output, workers=2, batch_size=4, lr=3e-3, log_every=5,
                  checkpoint_every=10, report=False, seed=0)
    values.update(kw)
    return FinetuneConfig(**values)


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def sample(pipe: SceneGraphDiffusionPipeline) -> np.ndarray:
    graphs = [parse_graph(r) for r in training_rows(2, seed=99)]
    return pipe(graphs, num_inference_steps=3, guidance_scale=2.0, seeds=[1, 2], output_type="np").images


def test_zero3_bf16_loss_goes_down_and_the_export_loads_and_generates(local_ray, tiny_model_dir, train_table,
                                                                      val_table, tmp_path):
    out = tmp_path / "ft"
    summary, code = run(config(str(train_table), tiny_model_dir, str(out), val=str(val_table), steps=20, zero_stage=3,
                               precision="bf16", trainable="all", deepspeed_overrides=ZERO3_PARTITION_ALL))
    assert code == 0, summary["error"]
    assert summary["status"] == "succeeded" and summary["steps"] == 20 and summary["resumed_from_step"] is None
    # Held-out loss with fixed noise and timesteps: the base model's vs the fine-tuned one's.
    assert summary["final_losses"]["val_loss"] < 0.8 * summary["val_loss_initial"], summary
    assert summary["bad_rows_by_reason"] == {code: 1 for code in BAD_TRAINING_ROWS}
    assert summary["samples_per_s"] > 0 and summary["samples"] == 20 * 4 * 2

    lines = metrics(out)
    assert [m["step"] for m in lines] == [5, 10, 15, 20]
    assert all({"loss_total", "loss_recon", "lr", "samples_per_s"} <= set(m) for m in lines)
    assert [m["step"] for m in lines if "val_loss" in m] == [10, 20]
    assert lines[-1]["loss_total"] < lines[0]["loss_total"]
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["job"] == "finetune" and run_json["config"]["zero_stage"] == 3 and run_json["versions"]["deepspeed"]
    assert run_json["deepspeed"]["zero_optimization"]["stage"] == 3 and run_json["deepspeed"]["bf16"]["enabled"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 20
    checkpoints = Path(f"{out}-checkpoints") / RUN_NAME  # beside the output
    assert {p.name for p in checkpoints.glob("step-*")} == {"step-00000010", "step-00000020"}
    assert (checkpoints / "step-00000020" / "trainer_state.json").is_file()
    saved = [p for p in checkpoints.rglob("*") if p.is_file()]
    assert any(p.name.endswith("optim_states.safetensors") for p in saved)
    assert not any(p.suffix in (".pt", ".bin", ".py") for p in saved), saved  # no pickles, no scripts

    # The export: safetensors only, fp32, loads as a pipeline and samples something else than the base.
    weights = sorted(p.name for p in out.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
    assert weights and all(name.endswith(".safetensors") for name in weights)
    tuned = SceneGraphDiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert tuned.unet.dtype == torch.float32
    base = SceneGraphDiffusionPipeline.from_pretrained(tiny_model_dir, use_safetensors=True)
    for pipe in (tuned, base):
        pipe.set_progress_bar_config(disable=True)
    images, before = sample(tuned), sample(base)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert np.abs(images - before).mean() > 1e-3
    changed = [n for n, p in tuned.text_encoder.named_parameters()
               if not torch.equal(p, dict(base.text_encoder.named_parameters())[n])]
    assert changed  # trainable="all" reached the text encoder through ZeRO-3's gather


def crash_after_step_10(config: dict) -> None:
    """The job's worker loop, but every worker exits hard once its step-10 checkpoint is registered."""
    import ray.train

    report = ray.train.report

    def report_then_crash(metrics, checkpoint=None, **kwargs):
        report(metrics, checkpoint=checkpoint, **kwargs)
        if checkpoint is not None and metrics.get("step") == 10:
            ray.train.get_all_reported_checkpoints()  # wait until the checkpoint is registered
            os._exit(1)

    ray.train.report = report_then_crash  # this worker process only
    train_loop.train_loop_per_worker(config)


def test_a_second_run_of_a_busy_output_is_refused_even_with_overwrite(tiny_model_dir, train_table, tmp_path):
    # Another driver (this test) holds the output's lease: nothing may be deleted or written there.
    from jobs.lease import RunLease, RunLockedError
    from workers.storage import Storage, StorageSettings

    out = tmp_path / "ft"
    out.mkdir()
    (out / "run.json").write_text("{}")
    with RunLease(Storage(StorageSettings()), str(out / "_lease.json"), str(out)) as other:
        other.acquire(take_over=False)
        for flags in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(RunLockedError, match="is in use by"):
                run(config(str(train_table), tiny_model_dir, str(out), steps=2, **flags))
            assert sorted(p.name for p in out.iterdir()) == ["_lease.json", "run.json"]
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_killed_run_resumes_from_its_checkpoint_step(local_ray, tiny_model_dir, train_table, tmp_path, monkeypatch):
    out = tmp_path / "ft"
    cfg = config(str(train_table), tiny_model_dir, str(out), steps=20, checkpoint_every=5, trainable="unet",
                 ema_decay=0.9, attention_heads=2)
    with monkeypatch.context() as patch:
        patch.setattr(train_loop, "train_loop_per_worker", crash_after_step_10)
        failed, code = run(cfg)
    assert code == 1 and failed["status"] == "failed" and failed["error"]
    checkpoints = Path(f"{out}-checkpoints") / RUN_NAME
    assert {p.name for p in checkpoints.glob("step-*")} == {"step-00000005", "step-00000010"}
    assert [m["step"] for m in metrics(out)] == [5, 10]
    assert not (out / "model_index.json").exists()

    with pytest.raises(RunExistsError, match="--resume"):
        run(cfg)
    summary, code = run(config(str(train_table), tiny_model_dir, str(out), steps=20, checkpoint_every=5,
                               trainable="unet", ema_decay=0.9, attention_heads=2, resume=True))
    assert code == 0, summary["error"]
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 20
    lines = metrics(out)
    assert [m["step"] for m in lines] == [5, 10, 15, 20]  # no step trained twice, none skipped
    # The LR schedule continued where it stopped: "lr" is that of the window's last step (step 15 = index 14);
    # a scheduler restarted at the resume would be at its 5th step, near the peak.
    assert lines[2]["lr"] == pytest.approx(3e-3 * lr_factor(14, 0, 20))
    assert lines[2]["lr"] < 0.5 * 3e-3 * lr_factor(4, 0, 20)
    assert lines[-1]["loss_total"] < lines[0]["loss_total"]
    assert (out / "model_index.json").is_file()
    state = json.loads((checkpoints / "step-00000020" / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["resumed_from_step"] == 10 and state["samples"] == 20 * 8

    # The export holds the EMA weights, continued across the restart (20 updates, not 10).
    from safetensors import safe_open

    with safe_open(str(checkpoints / "step-00000020" / "ema.safetensors"), framework="pt") as f:
        assert f.metadata()["updates"] == "20"
        name = next(k for k in f.keys() if k.startswith("unet.") and k.endswith("conv_in.weight"))
        averaged = f.get_tensor(name)
    exported = SceneGraphDiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert torch.equal(exported.unet.conv_in.weight.detach(), averaged)
    assert exported.unet.config.attention_head_dim == 2  # --attention-heads: the base's 4 heads re-split in 2


def test_stable_diffusion_base_gets_a_graph_encoder_and_exports_a_latent_pipeline(
    local_ray, tiny_sd_folder, train_table, tmp_path  # noqa: F811 - the fixture imported above
):
    out = tmp_path / "ft"
    summary, code = run(config(str(train_table), str(tiny_sd_folder), str(out), steps=4, checkpoint_every=4,
                               log_every=2, conditioning="gated", layout_channels=0, trainable="conditioning", lr=1e-3))
    assert code == 0, summary["error"]
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["base_kind"] == "stable_diffusion" and run_json["image_size"] == 16  # 8 latents x VAE factor 2
    tuned = SceneGraphDiffusionPipeline.from_pretrained(out, use_safetensors=True)
    tuned.set_progress_bar_config(disable=True)
    assert tuned.vae is not None and tuned.unet.config.attention_type == "gated"
    assert tuned.conditioner.config.mode == "gated" and tuned.conditioner.config.cross_attention_dim == 16
    images = sample(tuned)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    # Only the conditioning trained: the UNet's original weights came through unchanged.
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.from_pretrained(tiny_sd_folder / "unet")
    assert torch.equal(tuned.unet.conv_in.weight, original.conv_in.weight)


def test_gated_lora_checkpoints_and_export_to_s3_then_generate_from_there(local_ray, s3_bucket, train_table, tmp_path):
    from jobs.defaults import SAMPLE_SHAPES, resolve
    from jobs.generate import GenerateConfig
    from jobs.generate import run as generate
    from sgmodel.shapes.diffusion import VOCABULARY
    from sgmodel.shapes.flavours import build_pipeline
    from workers.runtime import localize_model

    storage = s3_bucket.storage()
    base_dir = tmp_path / "tiny-gated"
    build_pipeline("debug", VOCABULARY, conditioning="gated", seed=0, use_caption=False).save_pretrained(base_dir)
    for folder, prefix in ((base_dir, "models/tiny-gated"), (train_table, "tables/train")):
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                storage.write_bytes(s3_bucket.uri(prefix, str(path.relative_to(folder))), path.read_bytes())

    out = s3_bucket.uri("runs/ft")
    summary, code = run(config(s3_bucket.uri("tables/train"), s3_bucket.uri("models/tiny-gated"), out, steps=10,
                               checkpoint_every=5, trainable="lora", lora_rank=4,
                               s3_endpoint_url=s3_bucket.endpoint_url, s3_region="us-east-1"))
    assert code == 0, summary["error"]
    keys = {uri[len(out) + 1:] for uri in storage.list(out)}
    assert {"model_index.json", "run.json", "metrics.jsonl", "summary.json", "pytorch_lora_weights.safetensors",
            "unet/diffusion_pytorch_model.safetensors", "conditioner/diffusion_pytorch_model.safetensors"} <= keys
    checkpoint_keys = {uri[len(out) + len("-checkpoints/"):] for uri in storage.list(f"{out}-checkpoints")}
    assert {k.split("/")[1] for k in checkpoint_keys if k.startswith(f"{RUN_NAME}/step-")} == {
        "step-00000005", "step-00000010"}
    assert not any(k.endswith((".bin", ".pt")) for k in keys | checkpoint_keys)

    local = localize_model(out, storage, cache_dir=str(tmp_path / "cache"))
    tuned = SceneGraphDiffusionPipeline.from_pretrained(local, use_safetensors=True)
    assert not any("lora" in name for name, _ in tuned.unet.named_parameters())  # merged into the base weights
    gates = [p for name, p in tuned.unet.named_parameters() if name.endswith(("alpha_attn", "alpha_dense"))]
    assert gates and all(p.dim() == 0 for p in gates)  # saved as diffusers expects them
    assert any(float(p.detach()) != 0.0 for p in gates)  # GLIGEN gates start at 0: the gated layers trained

    gen_summary, gen_code = generate(GenerateConfig(
        input=resolve(SAMPLE_SHAPES), model=out, segmenter="none", output=s3_bucket.uri("generated"), run_id="g",
        steps=2, batch_size=8, report=False, s3_endpoint_url=s3_bucket.endpoint_url, s3_region="us-east-1",
    ))
    assert gen_code == 0 and gen_summary["images"] == 32 and gen_summary["errors"] == 0
    assert not math.isnan(summary["final_losses"]["loss_total"])
