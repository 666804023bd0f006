"""Model loading helpers shared by the workers."""

from __future__ import annotations

from pathlib import Path

from workers.runtime import localize_model


def test_localize_model_fetches_only_the_pipeline_components(s3_bucket, tmp_path):
    # A fine-tuning output holds the exported pipeline next to its checkpoints and logs; a generation
    # worker loading it as --model must not download the (large) optimizer states.
    storage = s3_bucket.storage()
    files = {
        "model_index.json": '{"_class_name": "SceneGraphDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}',
        "unet/config.json": "{}",
        "unet/diffusion_pytorch_model.safetensors": "weights",
        "checkpoints/finetune/step-00000010/deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt": "optimizer",
        "metrics.jsonl": "{}\n",
    }
    for key, text in files.items():
        storage.write_text(s3_bucket.uri("run", key), text)
    local = Path(localize_model(s3_bucket.uri("run"), storage, cache_dir=str(tmp_path)))
    got = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != ".complete")
    assert got == ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert (local / "unet" / "diffusion_pytorch_model.safetensors").read_text() == "weights"


def test_localize_model_copies_a_folder_without_model_index_whole(s3_bucket, tmp_path):
    storage = s3_bucket.storage()
    for key in ("config.json", "model.safetensors", "sub/extra.json"):
        storage.write_text(s3_bucket.uri("seg", key), key)
    local = Path(localize_model(s3_bucket.uri("seg"), storage, cache_dir=str(tmp_path)))
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p.name != ".complete") == [
        "config.json", "model.safetensors", "sub/extra.json"]
