"""Device, precision and model loading shared by the Ray actors (and the benchmarks' bare loops)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SCHEDULERS = ("model", "ddim", "dpm", "euler")
# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def pick_device(want_gpu: bool) -> torch.device:
    if want_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on a GPU, fp32 on the CPU (CPU half precision is slow and lossy for sampling)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def set_threads(threads: int | None) -> int:
    """Torch intra-op threads for a worker: explicit, or every CPU of the machine."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def keep_freed_memory() -> bool:
    """Let glibc keep large freed blocks for reuse instead of handing them back to the kernel.

    A render on the CPU frees and re-allocates the same large activation buffers at every step.
    Blocks above glibc's mmap threshold (at most 32 MiB, however it adapts) are unmapped on free and
    page-faulted in again, zeroed, on the next allocation; so is the top of the heap once it is
    trimmed, so a CPU render spends a large share of its time in page faults (see
    docs/benchmarks.md, job overhead). A worker serving batch after batch reaches its peak memory
    anyway, so holding it costs nothing. Called once per CPU worker process; GPU memory is managed by
    torch's own caching allocator. Returns whether the settings took (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def swap_scheduler(pipe, name: str) -> None:
    """Replace the pipeline's scheduler by DDIM / DPM-Solver++ / Euler, keeping its noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if name != "model":
        pipe.scheduler = classes[name].from_config(pipe.scheduler.config)


def load_pipeline(
    path_or_id: str,
    device: torch.device,
    dtype: torch.dtype,
    scheduler: str = "model",
    compile_unet: bool = False,
    channels_last: bool = False,
    separate_guidance: bool = False,
):
    """Load a SceneGraphDiffusionPipeline folder (safetensors only) onto a device, ready to sample.

    ``channels_last`` stores the UNet's weights channels-last, which oneDNN's and cuDNN's convolutions
    run faster (benchmarks/render_speed.py) with the same images up to rounding; ``separate_guidance``
    runs guided steps as two UNet calls (same images)."""
    from sgmodel.pipeline import SceneGraphDiffusionPipeline

    pipe = SceneGraphDiffusionPipeline.from_pretrained(path_or_id, torch_dtype=dtype, use_safetensors=True)
    pipe.to(device)
    swap_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    pipe.separate_guidance_passes = separate_guidance
    if compile_unet:  # worth it for long runs; the first batches pay the compile time
        if device.type == "cpu":  # frozen weights: inductor folds them in and prepacks them for oneDNN
            pipe.unet = torch.compile(pipe.unet, options={"freezing": True})
        else:  # CUDA graphs cut the launch overhead of a small UNet's many kernels
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=False)
    return pipe


def localize_model(path_or_uri: str, storage=None, cache_dir: str | None = None) -> str:
    """A local folder for a model: s3:// prefixes are downloaded once into a cache; others pass through."""
    if not path_or_uri.startswith("s3://"):
        return path_or_uri
    from workers.storage import Storage, split_s3

    storage = storage or Storage()
    cache = Path(cache_dir or os.environ.get("SGBATCH_CACHE", Path.home() / ".cache" / "sgbatch")) / "models"
    target = cache / hashlib.sha256(path_or_uri.rstrip("/").encode()).hexdigest()[:16]
    done = target / ".complete"
    if done.exists():
        return str(target)
    prefix = path_or_uri.rstrip("/") + "/"
    files = storage.list(prefix)
    if not files:
        raise FileNotFoundError(f"no model files under {path_or_uri!r}")
    index = prefix + "model_index.json"
    if index in files:  # a pipeline folder may also hold a run's checkpoints and logs: fetch the model only
        parts = {k for k in json.loads(storage.read_text(index)) if not k.startswith("_")}
        files = [u for u in files if u == index or u[len(prefix):].split("/", 1)[0] in parts]
    for uri in files:
        rel = split_s3(uri)[1][len(split_s3(prefix)[1]) :]
        storage.write_bytes(str(target / rel), storage.read_bytes(uri))
    done.write_text(path_or_uri)
    return str(target)
