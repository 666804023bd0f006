"""Layouts: the box distribution, seeded draws that agree with the graph, the canvas, gated conversion."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sgmodel.graph import SceneGraph, SGObject, SGRelation
from sgmodel.layout import (
    box_distribution,
    layout_nll,
    layout_violations,
    mean_boxes,
    paint_canvas,
    sample_layout,
)
from sgmodel.pipeline import convert_conditioning
from sgmodel.shapes.diffusion import shapes_batches
from sgmodel.shapes.flavours import build_pipeline
from sgmodel.train import DiffusionTrainingModule, TrainConfig, fit, parameter_groups

from .conftest import VOCAB

LEFT = SceneGraph(id="left", objects=(SGObject("circle", ("red",)), SGObject("square", ("blue",))),
                  relations=(SGRelation(0, "left of", 1),))


def params_for(means_cxcywh: list[list[float]], std: float) -> torch.Tensor:
    """Head output whose distribution has these means (cx, cy, w, h) and one standard deviation."""
    mean = torch.tensor(means_cxcywh)
    return torch.cat([torch.logit(mean), torch.full_like(mean, float(np.log(std)))], -1)


def no_boxes(graph: SceneGraph) -> SceneGraph:
    return replace(graph, objects=tuple(replace(o, box=None) for o in graph.objects))


def test_distribution_means_and_nll():
    params = params_for([[0.25, 0.5, 0.2, 0.2]], 0.05)
    mean, std = box_distribution(params)
    torch.testing.assert_close(mean, torch.tensor([[0.25, 0.5, 0.2, 0.2]]))
    torch.testing.assert_close(std, torch.full((1, 4), 0.05))
    torch.testing.assert_close(mean_boxes(params), torch.tensor([[0.15, 0.4, 0.35, 0.6]]))
    at_mean = layout_nll(params, torch.tensor([[0.15, 0.4, 0.35, 0.6]]))
    far = layout_nll(params, torch.tensor([[0.6, 0.4, 0.8, 0.6]]))
    assert far > at_mean + 10


def test_draws_are_seeded_agree_with_the_graph_and_keep_given_boxes():
    # the mean layout breaks "circle left of square"; the spread lets draws find layouts that hold
    params = params_for([[0.6, 0.5, 0.2, 0.2], [0.4, 0.5, 0.2, 0.2]], 0.2)
    none = torch.zeros(2, dtype=torch.bool)
    zeros = torch.zeros(2, 4)
    assert layout_violations(mean_boxes(params), LEFT, max_overlap=1.0) == 1
    draws = [sample_layout(params, none, zeros, LEFT, seed, max_overlap=1.0) for seed in range(6)]
    for boxes in draws:
        assert layout_violations(boxes, LEFT, max_overlap=1.0) == 0
        assert boxes[0, 0] + boxes[0, 2] < boxes[1, 0] + boxes[1, 2]  # centres: circle left of square
    assert len({tuple(b.flatten().tolist()) for b in draws}) == 6  # every seed its own layout
    torch.testing.assert_close(sample_layout(params, none, zeros, LEFT, 3, max_overlap=1.0), draws[3])
    given = torch.tensor([False, True])
    fixed = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.9, 0.3]])
    boxes = sample_layout(params, given, fixed, LEFT, 0, max_overlap=1.0)
    torch.testing.assert_close(boxes[1], fixed[1])
    assert (boxes[0, 0] + boxes[0, 2]) / 2 < 0.8  # drawn around the given square's centre, to its left


def test_the_mean_mode_starts_from_the_mean_layout():
    params = params_for([[0.3, 0.5, 0.2, 0.2], [0.7, 0.5, 0.2, 0.2]], 0.2)
    boxes = sample_layout(params, torch.zeros(2, dtype=torch.bool), torch.zeros(2, 4), LEFT, 5, mode="mean")
    torch.testing.assert_close(boxes, mean_boxes(params))
    with pytest.raises(ValueError, match="'sample' or 'mean'"):
        sample_layout(params, torch.zeros(2, dtype=torch.bool), torch.zeros(2, 4), LEFT, 5, mode="median")


def test_draws_keep_whole_boxes_inside_the_image():
    # a wide centre spread near the border: clamping the centre would cut boxes at the edge
    mean = torch.tensor([[0.9, 0.1, 0.4, 0.3]])
    params = torch.cat([torch.logit(mean), torch.log(torch.tensor([[1.0, 1.0, 1e-3, 1e-3]]))], -1)
    single = SceneGraph(id="one", objects=(SGObject("circle"),))
    draws = torch.stack([sample_layout(params, torch.zeros(1, dtype=torch.bool), torch.zeros(1, 4), single, seed)[0]
                         for seed in range(64)])
    assert draws.min() >= 0.0 and draws.max() <= 1.0
    torch.testing.assert_close(draws[:, 2] - draws[:, 0], torch.full((64,), 0.4), atol=0.01, rtol=0)
    torch.testing.assert_close(draws[:, 3] - draws[:, 1], torch.full((64,), 0.3), atol=0.01, rtol=0)
    centres = (draws[:, 0] + draws[:, 2]) / 2
    assert centres.min() < 0.4 and centres.max() > 0.6  # still spread over the whole feasible range


def test_overlapping_draws_are_redrawn():
    apart = SceneGraph(id="pair", objects=(SGObject("circle"), SGObject("square")))
    params = params_for([[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4]], 0.25)
    boxes = sample_layout(params, torch.zeros(2, dtype=torch.bool), torch.zeros(2, 4), apart, 1, max_overlap=0.1)
    assert layout_violations(boxes, apart, max_overlap=0.1) == 0


def test_canvas_paints_features_inside_boxes_only():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]]])
    features = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    canvas = paint_canvas(boxes, torch.tensor([[1.0, 1.0]]), features, 4, 4)
    assert canvas.shape == (1, 2, 4, 4)
    assert canvas[0, 0, :, :2].eq(1).all() and canvas[0, 0, :, 2:].eq(0).all()
    assert canvas[0, 1, 2:, 2:].eq(2).all() and canvas[0, 1].sum() == 8
    masked = paint_canvas(boxes, torch.tensor([[1.0, 0.0]]), features, 4, 4)
    assert masked[0, 1].eq(0).all()


def test_conversion_to_gated_keeps_the_images_until_trained(graphs):
    pipe = build_pipeline("debug", VOCAB)
    pipe.set_progress_bar_config(disable=True)
    seeds = [1, 2, 3]
    before = pipe(graphs, num_inference_steps=3, seeds=seeds, output_type="np").images
    torch.manual_seed(0)
    convert_conditioning(pipe, "gated", layout_channels=4)
    assert pipe.conditioner.config.mode == "gated" and pipe.unet.config.attention_type == "gated"
    assert pipe.unet.config.in_channels == 3 + 4 and pipe.latent_channels == 3
    after = pipe(graphs, num_inference_steps=3, seeds=seeds, output_type="np").images
    np.testing.assert_array_equal(before, after)


def test_gated_images_follow_their_seed_and_train_the_layout_head():
    torch.manual_seed(0)
    pipe = build_pipeline("debug", VOCAB, conditioning="gated", layout_channels=4)
    pipe.set_progress_bar_config(disable=True)
    module = DiffusionTrainingModule(pipe, TrainConfig(trainable="all", cond_dropout=0.0))
    batches = shapes_batches(0, 8, 16)
    graphs, images = next(shapes_batches(5, 8, 16))
    losses = module(graphs, images, generator=torch.Generator().manual_seed(0))
    start = float(losses.layout)
    losses.layout.backward()  # the layout likelihood trains the head, never the shared graph encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.conditioner.layout_head.parameters())
    assert all(p.grad is None or not p.grad.any() for p in pipe.graph_encoder.parameters())
    module.zero_grad(set_to_none=True)
    fit(module, batches, steps=30, lr=3e-3)
    with torch.no_grad():
        end = float(module(graphs, images, generator=torch.Generator().manual_seed(0)).layout)
    assert end < start - 0.3  # the box distribution learnt the shapes world's layouts

    # without boxes, each image draws its own layout from its seed, the same one every time
    bare = [no_boxes(g) for g in graphs[:2]]
    cond = pipe.encode(bare).index(torch.tensor([0, 0, 1]))
    drawn = pipe.conditioner.draw_layouts(cond, bare, [0, 0, 1], [11, 12, 11])
    again = pipe.conditioner.draw_layouts(cond, bare, [0, 0, 1], [11, 12, 11])
    torch.testing.assert_close(drawn.grounding["boxes"], again.grounding["boxes"])
    assert not torch.equal(drawn.grounding["boxes"][0], drawn.grounding["boxes"][1])
    one = pipe(bare, num_inference_steps=2, seeds=[11, 11], output_type="np").images
    two = pipe(bare, num_inference_steps=2, seeds=[11, 11], output_type="np").images
    np.testing.assert_array_equal(one, two)
    # boxes the graph carries are the ones the UNet gets
    given = pipe.conditioner.draw_layouts(pipe.encode(graphs[:1]), graphs[:1], [0], [3])
    n = len(graphs[0].objects)
    torch.testing.assert_close(given.grounding["boxes"][0, :n], torch.tensor([o.box for o in graphs[0].objects]))


def test_new_gated_layers_train_at_their_own_rate_and_leave_the_latent_input_fixed():
    torch.manual_seed(0)
    pipe = build_pipeline("debug", VOCAB)
    convert_conditioning(pipe, "gated", layout_channels=4)
    module = DiffusionTrainingModule(pipe, TrainConfig(trainable="all", cond_dropout=0.0))
    base, new = parameter_groups(module, 1e-5, new_layers_lr=1e-2)
    new_ids = {id(p) for p in new["params"]}
    assert new["lr"] == 1e-2 and base["lr"] == 1e-5
    assert id(pipe.unet.conv_in.weight) in new_ids and id(pipe.conditioner.layout_head.net[0].weight) in new_ids
    assert any(id(p) in new_ids for n, p in pipe.unet.named_parameters() if ".fuser." in n)
    assert id(pipe.unet.conv_out.weight) not in new_ids and all(id(p) not in new_ids for p in pipe.graph_encoder.parameters())
    conv_in = pipe.unet.conv_in.weight.detach().clone()
    optimizer = torch.optim.AdamW([base, new])
    graphs, images = next(shapes_batches(5, 8, 16))
    module(graphs, images, generator=torch.Generator().manual_seed(0)).total.backward()
    optimizer.step()
    after = pipe.unet.conv_in.weight.detach()
    torch.testing.assert_close(after[:, :3], conv_in[:, :3], rtol=0, atol=0)  # latent channels: unchanged
    assert (after[:, 3:] - conv_in[:, 3:]).abs().max() > 1e-3  # canvas channels moved at the new layers' rate
    with pytest.raises(ValueError, match="tokens.*no gated layers"):
        parameter_groups(DiffusionTrainingModule(build_pipeline("debug", VOCAB), TrainConfig()), 1e-5, 1e-2)


def test_the_caption_projection_caption_mode_adds_trains_at_the_new_layers_rate():
    torch.manual_seed(0)
    pipe = build_pipeline("debug", VOCAB)
    convert_conditioning(pipe, "caption")
    module = DiffusionTrainingModule(pipe, TrainConfig(trainable="all", cond_dropout=0.0))
    _, new = parameter_groups(module, 1e-5, new_layers_lr=1e-2)
    assert {id(p) for p in new["params"]} == {id(p) for p in pipe.conditioner.caption_tokens.parameters()}


def test_caption_mode_shows_the_unet_the_caption_alone(graphs):
    pipe = build_pipeline("debug", VOCAB)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    convert_conditioning(pipe, "caption")
    with torch.no_grad():
        pipe.conditioner.caption_tokens.weight.normal_()
    captioned = [replace(g, caption="a red ball") for g in graphs[:2]]
    swapped = [replace(captioned[1], id="x"), replace(captioned[0], id="y")]  # other graphs, same captions
    kw = dict(num_inference_steps=2, seeds=[4, 5], output_type="np")
    np.testing.assert_array_equal(pipe(captioned, **kw).images, pipe(swapped, **kw).images)
    other = [replace(g, caption="blue square") for g in captioned]
    assert np.abs(pipe(other, **kw).images - pipe(captioned, **kw).images).max() > 0
