"""Per-rank model-state bytes read from real DeepSpeed engines (one gloo rank, CPU)."""

from __future__ import annotations

import pytest
import torch

from sgmodel.deepspeed_config import build_deepspeed_config
from workers.train_memory import (
    GRADS,
    OPTIMIZER,
    OTHER,
    PARAMS,
    ModelStateProbe,
    StorageLedger,
    model_state_bytes,
)


def test_a_storage_is_counted_once_in_its_first_category():
    flat = torch.zeros(100)
    ledger = StorageLedger()
    ledger.add(flat[:30], OPTIMIZER)
    ledger.add(flat[30:], PARAMS)  # same storage, reached as a parameter: it counts as one
    ledger.add(torch.zeros(10, dtype=torch.bfloat16), GRADS)
    ledger.add(torch.zeros(0), GRADS)
    ledger.add(torch.empty(5, device="meta"), OTHER)
    assert ledger.totals() == {PARAMS: 400, GRADS: 20, OPTIMIZER: 0, OTHER: 0}


def test_stage_0_offload_is_refused():
    with pytest.raises(ValueError, match="needs ZeRO stage 1, 2 or 3"):
        build_deepspeed_config(zero_stage=0, offload="cpu")
    assert build_deepspeed_config(zero_stage=0)["zero_optimization"]["stage"] == 0


class Small(torch.nn.Module):
    """544 parameters in 4 tensors (a multiple of DeepSpeed's flat-buffer alignment: no padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).float().pow(2).mean()


NUMEL, TENSORS = 544, 4


def trained_engine(stage: int, precision: str = "fp32", overrides: dict | None = None, steps: int = 2):
    import deepspeed

    torch.manual_seed(0)
    model = Small()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = build_deepspeed_config(zero_stage=stage, precision=precision, micro_batch_size=2, overrides=overrides)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    probe = ModelStateProbe(engine)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 16, generator=gen).to(next(engine.module.parameters()).dtype)
        engine.backward(engine(x))
        probe.after_backward()
        engine.step()
        probe.after_step()
    return engine, probe


NO_PERSISTENCE = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


# One rank: ZeRO 1-3 hold the same totals; stage 0 holds 4 bytes/parameter less in fp32 (Adam updates the
# module's own fp32 weights, where ZeRO keeps a separate fp32 master partition).
@pytest.mark.parametrize(("stage", "precision", "expected"), [
    # stage 0, fp32: the module's own weights and grads; Adam's two moments and a step per tensor
    (0, "fp32", {PARAMS: 4 * NUMEL, GRADS: 4 * NUMEL, OPTIMIZER: 8 * NUMEL + 4 * TENSORS}),
    # ZeRO 1-3: one flat group, so one step counter, and an fp32 master copy of the (one-rank) partition
    (1, "fp32", {PARAMS: 4 * NUMEL, GRADS: 4 * NUMEL, OPTIMIZER: 12 * NUMEL + 4}),
    (2, "fp32", {PARAMS: 4 * NUMEL, GRADS: 4 * NUMEL, OPTIMIZER: 12 * NUMEL + 4}),
    (3, "fp32", {PARAMS: 4 * NUMEL, GRADS: 4 * NUMEL, OPTIMIZER: 12 * NUMEL + 4}),
    # stage 0, bf16: bf16 weights and grads in the module, fp32 masters per tensor beside the moments
    (0, "bf16", {PARAMS: 2 * NUMEL, GRADS: 2 * NUMEL, OPTIMIZER: 12 * NUMEL + 4 * TENSORS}),
])
def test_each_stage_counts_what_its_engine_holds(process_group, stage, precision, expected):
    engine, probe = trained_engine(stage, precision, NO_PERSISTENCE if stage == 3 else None)
    got = probe.counts
    assert {k: got[k] for k in expected} == expected
    assert got["model_state_bytes"] == sum(expected.values())
    now = model_state_bytes(engine)  # between steps: the same weights and optimizer state
    assert (now[PARAMS], now[OPTIMIZER]) == (expected[PARAMS], expected[OPTIMIZER])
    if stage == 3:  # the partitions: empty module tensors, a ds_tensor each, gradients in one flat buffer
        assert all(p.numel() == 0 and p.ds_tensor.numel() == p.ds_numel for p in engine.module.parameters())
        assert now[GRADS] == 4 * NUMEL and now[OTHER] > 0  # plus the reduce bucket, reported apart


def test_stage_3_persistent_parameters_are_counted_once_with_their_partition(process_group):
    """Below stage3_param_persistence_threshold (1e5 elements by default) a parameter stays gathered; on one rank
    the gathered tensor is its partition's storage, which counts once (on two ranks both count)."""
    engine, probe = trained_engine(3, steps=1)
    assert all(p.numel() == p.ds_numel for p in engine.module.parameters())
    assert probe.counts[PARAMS] == 4 * NUMEL


def test_the_probe_reports_every_rank_once(process_group):
    _, probe = trained_engine(2, steps=1)
    report = probe.report()
    (rank0,) = report["model_state"]
    assert rank0["rank"] == 0 and rank0["peak_rss_bytes"] > 10 * 2**20
    assert rank0["model_state_bytes"] == rank0[PARAMS] + rank0[GRADS] + rank0[OPTIMIZER] == 20 * NUMEL + 4
    assert probe.report() == {}
