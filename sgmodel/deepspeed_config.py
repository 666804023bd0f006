"""The DeepSpeed config of a fine-tuning run, built from the job's flags by one pure function.

Kept apart from the Ray code so the mapping flag -> DeepSpeed key is testable without a cluster
and without initialising DeepSpeed: ZeRO stage, CPU offload, precision, micro-batch, gradient
accumulation and clipping. Stage 0 is plain data parallelism (every rank holds all parameters,
gradients and optimizer state; gradients are all-reduced); 1 partitions the optimizer state, 2
the gradients too, 3 the parameters too. The optimizer and LR schedule are not in here: the
training loop passes its own ``torch.optim.AdamW`` and ``LambdaLR`` to ``deepspeed.initialize``
(no JIT-compiled ops are needed on a CPU-only machine), which is why
``zero_allow_untested_optimizer`` is set.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

ZERO_STAGES = (0, 1, 2, 3)
OFFLOADS = ("none", "cpu")
PRECISIONS = ("fp32", "bf16", "fp16")


def build_deepspeed_config(
    *,
    zero_stage: int = 2,
    offload: str = "none",
    precision: str = "fp32",
    micro_batch_size: int = 8,
    gradient_accumulation: int = 1,
    world_size: int = 1,
    gradient_clipping: float = 1.0,
    use_gpu: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A DeepSpeed config dict for ``deepspeed.initialize(config=...)``.

    ``offload="cpu"`` moves the optimizer state (ZeRO-Offload) and, at stage 3, the parameters
    too (ZeRO-Infinity) to host memory; it needs stage 1 or above (DeepSpeed ignores it at stage 0).
    fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16 loss scaling). ``overrides`` (e.g.
    from ``--deepspeed-overrides``) is merged last, key by key, so any DeepSpeed option can be
    reached without a flag of its own.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage!r}")
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
    if offload != "none" and zero_stage == 0:
        raise ValueError(f"offload {offload!r} needs ZeRO stage 1, 2 or 3 (stage 0 has no state to move)")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and not use_gpu:
        raise ValueError("precision 'fp16' needs a GPU; use 'bf16' or 'fp32' on CPU workers")
    for name, value in (("micro_batch_size", micro_batch_size), ("gradient_accumulation", gradient_accumulation),
                        ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not gradient_clipping >= 0:
        raise ValueError(f"gradient_clipping must be >= 0 (0 = off), got {gradient_clipping!r}")

    zero: dict[str, Any] = {
        "stage": zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": use_gpu,  # overlapping needs separate CUDA streams; on CPU it only adds copies
    }
    if offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation,
        "train_batch_size": micro_batch_size * gradient_accumulation * world_size,
        "gradient_clipping": float(gradient_clipping),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        # Our torch AdamW stays in charge when offloading (DeepSpeedCPUAdam would need a C++ build).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # the job prints its own progress lines
        "wall_clock_breakdown": False,
    }
    if overrides:
        config = merge(config, overrides)
    return config


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: nested mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def compute_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed casts the trained module to; frozen parts are cast to match it."""
    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
