"""Fine-tuning checkpoints as safetensors: DeepSpeed's state saved and restored without unpickling anything."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from sgmodel.deepspeed_config import build_deepspeed_config
from workers.train_checkpoint import (
    CheckpointFormatError,
    check_own_checkpoint,
    decode_tree,
    encode_tree,
    load_tree,
    save_tree,
    staged_for_deepspeed,
    tidy_saved,
    use_safetensors_checkpoints,
)

TAG = "deepspeed"


def test_a_state_tree_round_trips_through_one_safetensors_file(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    flat = torch.arange(10, dtype=torch.float32)
    state = {
        "module": OrderedDict([("a.weight", torch.randn(3, 2)), ("a.bias", torch.zeros(3, dtype=torch.bfloat16))]),
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": flat[2:6]}}, "param_groups": [{"lr": 1e-3}]},
        "views": [flat[:4], flat[4:]],  # share one storage, as DeepSpeed's flat buffers do
        "shapes": [OrderedDict([("a.weight", torch.Size([3, 2]))])],
        "stage": ZeroStageEnum.gradients, "scaler": LossScaler(1.0),
        "mapping": {"a.weight": fragment_address(numel=6, start=0)},
        "misc": (1, "two", None, 3.5, True), "dtype": torch.bfloat16,
    }
    save_tree(state, tmp_path / "state.safetensors")
    got = load_tree(tmp_path / "state.safetensors")
    assert list(got["module"]) == ["a.weight", "a.bias"] and isinstance(got["module"], OrderedDict)
    assert torch.equal(got["module"]["a.weight"], state["module"]["a.weight"])
    assert got["module"]["a.bias"].dtype == torch.bfloat16
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], torch.tensor([2.0, 3.0, 4.0, 5.0]))
    assert torch.equal(torch.cat(got["views"]), flat)
    assert got["shapes"][0]["a.weight"] == torch.Size([3, 2])
    assert got["stage"] is ZeroStageEnum.gradients
    assert isinstance(got["scaler"], LossScaler) and got["scaler"].cur_scale == 1.0
    assert got["mapping"]["a.weight"] == fragment_address(numel=6, start=0)
    assert got["misc"] == (1, "two", None, 3.5, True) and got["dtype"] == torch.bfloat16


def test_only_known_classes_are_rebuilt():
    with pytest.raises(CheckpointFormatError, match="does not rebuild"):
        decode_tree({"object": "os.system", "state": {"dict": []}}, {})
    with pytest.raises(CheckpointFormatError, match="does not rebuild"):
        decode_tree({"enum": "subprocess.Popen", "value": 1}, {})
    with pytest.raises(TypeError, match="at /thing.*pathlib"):
        encode_tree({"thing": Path("x")}, {})


class Planted:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "unpickled"))


def test_a_checkpoint_in_pickle_format_is_refused_unread(tmp_path):
    folder = tmp_path / "step-00000010" / TAG
    folder.mkdir(parents=True)
    proof = tmp_path / "proof"
    (folder / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(Planted(str(proof))))
    with pytest.raises(CheckpointFormatError, match="pickle format are not loaded"):
        with staged_for_deepspeed(folder.parent, TAG):
            pass
    assert not proof.exists()


def test_resume_reads_only_the_runs_own_checkpoint_storage(tmp_path):
    root = str(tmp_path / "ckpt" / "finetune")
    check_own_checkpoint(f"{root}/step-00000010", root)
    check_own_checkpoint("bucket/runs/x-checkpoints/finetune/step-1", "bucket/runs/x-checkpoints/finetune")
    check_own_checkpoint("s3://bucket/runs/x-checkpoints/finetune/step-1", "bucket/runs/x-checkpoints/finetune")
    for elsewhere in (str(tmp_path / "other" / "step-1"), f"{root}/../../elsewhere/step-1", root, f"{root}-x/step-1",
                      "s3://other-bucket/runs/x-checkpoints/finetune/step-1"):
        with pytest.raises(CheckpointFormatError, match="not in this run's checkpoint storage"):
            check_own_checkpoint(elsewhere, root)


# ----------------------------------------------------------------------------- with DeepSpeed


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 4] -> a scalar loss."""
        return self.b(torch.tanh(self.a(x))).pow(2).mean()


def engine_for(stage: int, precision: str, seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    config = build_deepspeed_config(zero_stage=stage, precision=precision, micro_batch_size=2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config,
                                      dist_init_required=False)
    use_safetensors_checkpoints(engine)
    return engine


def train(engine, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 4, generator=gen).to(next(engine.module.parameters()).dtype)
        engine.backward(engine(x))
        engine.step()


def weights(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize(("stage", "precision"), [(2, "fp32"), (3, "bf16")])
def test_a_resumed_engine_continues_exactly(process_group, tmp_path, stage, precision):
    original = engine_for(stage, precision, seed=0)
    train(original, 3, seed=1)
    original.save_checkpoint(str(tmp_path), tag=TAG)
    tidy_saved(tmp_path)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files and all(name.endswith(".safetensors") or name == "latest" for name in files), files
    train(original, 2, seed=2)

    resumed = engine_for(stage, precision, seed=123)  # other initial weights: all must come from the checkpoint
    with staged_for_deepspeed(tmp_path, TAG) as staged:
        path, _ = resumed.load_checkpoint(staged, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    assert path is not None and resumed.global_steps == 3
    train(resumed, 2, seed=2)
    expected, got = weights(original), weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:  # same weights, Adam moments and LR schedule: the same two steps
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
