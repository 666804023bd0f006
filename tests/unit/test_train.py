import itertools

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from sgmodel.shapes.flavours import build_pipeline
from sgmodel.train import DiffusionTrainingModule, TrainConfig, fit, merge_lora

from .conftest import VOCAB, make_graphs


def fixed_batch():
    torch.manual_seed(0)
    graphs = make_graphs()
    images = torch.rand(len(graphs), 3, 16, 16) * 2 - 1
    return graphs, images


def param_snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_overfitting_a_fixed_batch_drives_the_loss_down():
    pipe = build_pipeline("debug", VOCAB, seed=0)
    module = DiffusionTrainingModule(pipe, TrainConfig(trainable="all", cond_dropout=0.0))
    batch = fixed_batch()
    enc_before, cond_before = param_snapshot(pipe.graph_encoder), param_snapshot(pipe.conditioner)

    def evaluate() -> float:
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(module(*batch, generator=gen).recon.item() for _ in range(8)) / 8

    start = evaluate()
    fit(module, itertools.repeat(batch), steps=300, lr=3e-3, seed=0)
    end = evaluate()
    assert end < 0.35 * start, (start, end)
    assert changed(enc_before, pipe.graph_encoder) and changed(cond_before, pipe.conditioner)


def test_gradients_reach_encoder_and_conditioner_with_a_frozen_unet():
    pipe = build_pipeline("debug", VOCAB, seed=0)
    module = DiffusionTrainingModule(pipe, TrainConfig(trainable="conditioning", cond_dropout=0.0))
    assert not hasattr(module, "unet")  # frozen UNet stays outside the module tree (and ZeRO-3)
    unet_before = param_snapshot(pipe.unet)
    losses = module(*fixed_batch(), generator=torch.Generator().manual_seed(0))
    losses.total.backward()
    for part in (pipe.graph_encoder, pipe.conditioner):
        grads = [p.grad for p in part.parameters() if p.requires_grad and p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in pipe.unet.parameters())
    fit(module, itertools.repeat(fixed_batch()), steps=2, lr=1e-3)
    assert not changed(unet_before, pipe.unet)


def test_gated_training_opens_the_gates_and_trains_the_layout_head():
    pipe = build_pipeline("debug", VOCAB, conditioning="gated", seed=0)
    module = DiffusionTrainingModule(pipe, TrainConfig(trainable="conditioning", cond_dropout=0.0))
    gates = [p for n, p in pipe.unet.named_parameters() if n.endswith("alpha_attn")]
    assert gates and all(float(g.detach()) == 0.0 for g in gates)
    base = [p for n, p in pipe.unet.named_parameters() if ".fuser." not in n and not n.startswith("position_net")]
    base_before = [p.detach().clone() for p in base]
    losses = module(*fixed_batch(), generator=torch.Generator().manual_seed(0))
    assert losses.layout is not None  # one graph has a box
    fit(module, itertools.repeat(fixed_batch()), steps=5, lr=1e-2)
    assert any(float(g.detach()) != 0.0 for g in gates)
    assert all(torch.equal(a, b) for a, b in zip(base_before, base))


def test_alignment_losses_with_an_image_encoder():
    pipe = build_pipeline("debug", VOCAB, seed=0, projection_dim=8)
    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, projection_dim=8)
    )
    config = TrainConfig(trainable="conditioning", lambda_recon=0.5, beta_clip=0.5, adversarial_weight=0.1)
    module = DiffusionTrainingModule(pipe, config, image_encoder=vision)
    losses = module(*fixed_batch(), generator=torch.Generator().manual_seed(0))
    for term in (losses.clip, losses.mmd, losses.adversarial):
        assert term is not None and torch.isfinite(term)
    expected = 0.5 * losses.recon + 0.5 * (0.5 * losses.clip + 0.5 * losses.mmd) + 0.1 * losses.adversarial
    torch.testing.assert_close(losses.total, expected)
    with pytest.raises(ValueError, match="image encoder"):
        DiffusionTrainingModule(build_pipeline("debug", VOCAB, projection_dim=8), TrainConfig(lambda_recon=0.5))


def test_lora_adapters_train_and_merge_into_a_plain_unet():
    pipe = build_pipeline("debug", VOCAB, seed=0)
    module = DiffusionTrainingModule(pipe, TrainConfig(trainable="lora", lora_rank=2, cond_dropout=0.0))
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    fit(module, itertools.repeat(fixed_batch()), steps=3, lr=1e-2)
    x, ctx = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 16)
    with torch.no_grad():
        with_adapters = pipe.unet(x, 3, encoder_hidden_states=ctx).sample
        merged = merge_lora(pipe.unet)
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x, 3, encoder_hidden_states=ctx).sample, with_adapters, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", [{"trainable": "everything"}, {"cond_dropout": 1.5}, {"lora_rank": 0}])
def test_train_config_validation(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


@pytest.mark.parametrize(("conditioning", "trainable"), [("tokens", "conditioning"), ("gated", "conditioning"),
                                                         ("tokens", "all"), ("gated", "lora")])
def test_every_trainable_parameter_gets_a_gradient_even_without_relations_captions_or_dropped_rows(
    conditioning, trainable
):
    # DeepSpeed ZeRO (and DDP) reduce gradients collectively: a parameter that one rank's batch leaves
    # unused desynchronises the ranks, so unused paths must still yield (zero) gradients.
    from sgmodel.graph import SceneGraph, SGObject

    pipe = build_pipeline("debug", VOCAB, conditioning=conditioning, seed=0, use_caption=True)
    module = DiffusionTrainingModule(pipe, TrainConfig(trainable=trainable, cond_dropout=0.0))
    graphs = [SceneGraph(id="a", objects=(SGObject("circle", ("red",)),)), SceneGraph(id="b", objects=(SGObject("square"),))]
    losses = module(graphs, torch.zeros(2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    losses.total.backward()
    missing = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert {"conditioner.null_tokens", "conditioner.triple_tokens.0.weight"} <= {
        name for name, p in module.named_parameters() if p.requires_grad
    }
