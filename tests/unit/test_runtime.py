"""Model loading helpers shared by the workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from workers.runtime import localize_model

# Allocates, touches and frees a 64 MiB tensor (above glibc's largest mmap threshold) again and again,
# as a CPU render does with its activations; prints the minor page faults of each of the last 10 of 20
# rounds (the heap settles in the first few).
_REALLOCATE = """
import resource, sys, torch
from workers.runtime import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(10):
    torch.ones(16 << 20)
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, *faults)
"""


def _reallocation_faults(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", _REALLOCATE, mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    return out[0], [int(n) for n in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    took, kept = _reallocation_faults("keep")
    assert took == "True"
    _, default = _reallocation_faults("default")
    # glibc's default unmaps each 64 MiB block on free, so every round faults it in again: at least
    # one fault per 2 MiB (huge pages). Kept blocks are reused without faulting; a busy host may still
    # reclaim the kept heap now and then, so most rounds, not all, must run fault-free.
    assert all(n >= 32 for n in default), default
    assert sum(n < 32 for n in kept) >= 7, kept


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
