"""The flag -> DeepSpeed config mapping, checked against DeepSpeed's own config parser."""

from __future__ import annotations

import pytest
import torch

from sgmodel.deepspeed_config import build_deepspeed_config, compute_dtype, merge


def parsed(config: dict):
    """DeepSpeed's own validation (pydantic models, batch-size arithmetic) of a world-size-1 config."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(config)


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_cpu_combination_is_accepted_by_deepspeed(stage, precision):
    config = build_deepspeed_config(zero_stage=stage, precision=precision, micro_batch_size=3, gradient_accumulation=2,
                                    gradient_clipping=0.5)
    ds = parsed(config)
    assert ds.zero_optimization_stage == stage
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == (3, 2, 6)
    assert ds.gradient_clipping == 0.5
    assert ds.bfloat16_config.enabled == (precision == "bf16") and not ds.float16_config.enabled


def test_global_batch_counts_every_worker():
    config = build_deepspeed_config(micro_batch_size=4, gradient_accumulation=3, world_size=8)
    assert config["train_batch_size"] == 4 * 3 * 8
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3


def test_cpu_offload_moves_optimizer_state_and_at_stage_3_the_parameters():
    two = build_deepspeed_config(zero_stage=2, offload="cpu")["zero_optimization"]
    assert two["offload_optimizer"]["device"] == "cpu" and "offload_param" not in two
    three = build_deepspeed_config(zero_stage=3, offload="cpu")["zero_optimization"]
    assert three["offload_optimizer"]["device"] == "cpu" and three["offload_param"]["device"] == "cpu"
    assert not three["offload_param"]["pin_memory"]  # pinned host memory only helps GPU transfers
    assert build_deepspeed_config(zero_stage=3, offload="cpu", use_gpu=True)["zero_optimization"]["offload_param"]["pin_memory"]
    assert "offload_optimizer" not in build_deepspeed_config(zero_stage=3)["zero_optimization"]
    ds = parsed(build_deepspeed_config(zero_stage=3, offload="cpu"))
    assert ds.zero_config.offload_optimizer is not None and ds.zero_config.offload_param is not None


def test_fp16_needs_a_gpu_and_enables_dynamic_loss_scaling():
    with pytest.raises(ValueError, match="fp16.*GPU"):
        build_deepspeed_config(precision="fp16")
    config = build_deepspeed_config(precision="fp16", use_gpu=True)
    assert config["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert not config["bf16"]["enabled"]
    assert compute_dtype(config) == torch.float16


def test_compute_dtype_follows_precision():
    assert compute_dtype(build_deepspeed_config(precision="fp32")) == torch.float32
    assert compute_dtype(build_deepspeed_config(precision="bf16")) == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zero_stage": 4}, "zero_stage must be one of"),
        ({"zero_stage": 0, "offload": "cpu"}, "needs ZeRO stage 1, 2 or 3"),
        ({"offload": "nvme"}, "offload must be one of"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"micro_batch_size": 0}, "micro_batch_size must be an integer >= 1, got 0"),
        ({"gradient_accumulation": 1.5}, "gradient_accumulation must be an integer"),
        ({"world_size": True}, "world_size must be an integer"),
        ({"gradient_clipping": -1.0}, "gradient_clipping must be >= 0"),
        ({"gradient_clipping": float("nan")}, "gradient_clipping must be >= 0"),
    ],
)
def test_bad_values_are_rejected_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_deepspeed_config(**kwargs)


def test_overrides_merge_key_by_key_and_reach_deepspeed():
    config = build_deepspeed_config(zero_stage=3, overrides={
        "zero_optimization": {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": 1000},
        "steps_per_print": 5,
    })
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["contiguous_gradients"]  # kept
    assert zero["stage3_param_persistence_threshold"] == 0 and config["steps_per_print"] == 5
    assert parsed(config).zero_config.param_persistence_threshold == 0


def test_merge_does_not_modify_its_inputs():
    base = {"a": {"b": 1, "c": [1]}, "d": 2}
    over = {"a": {"b": 3}, "e": {"f": 4}}
    merged = merge(base, over)
    assert merged == {"a": {"b": 3, "c": [1]}, "d": 2, "e": {"f": 4}}
    merged["a"]["c"].append(2)
    merged["e"]["f"] = 5
    assert base == {"a": {"b": 1, "c": [1]}, "d": 2} and over == {"a": {"b": 3}, "e": {"f": 4}}


def test_unknown_zero_keys_from_overrides_are_caught_by_deepspeed():
    config = build_deepspeed_config(overrides={"zero_optimization": {"stage3_no_such_option": 1}})
    with pytest.raises(Exception, match="stage3_no_such_option"):
        parsed(config)
