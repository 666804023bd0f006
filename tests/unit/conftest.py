"""Fixtures for the model-library tests: tiny seeded pipelines built from configs, sample graphs."""

from __future__ import annotations

import pytest
import torch

from sgmodel.graph import SceneGraph, SGObject, SGRelation
from sgmodel.shapes.flavours import build_pipeline

VOCAB = [
    "circle", "square", "triangle", "red", "green", "blue", "small", "large",
    "left of", "right of", "above", "below", "a red ball",
]


def make_graphs() -> list[SceneGraph]:
    return [
        SceneGraph(
            id="two",
            objects=(SGObject("circle", ("red",)), SGObject("square", ("large", "blue"), (0.5, 0.5, 0.9, 0.9))),
            relations=(SGRelation(0, "left of", 1),),
        ),
        SceneGraph(id="single", objects=(SGObject("triangle"),)),
        SceneGraph(
            id="three",
            objects=(SGObject("circle", ("green",)), SGObject("circle", ("green",)), SGObject("square")),
            relations=(SGRelation(0, "above", 2), SGRelation(1, "right of", 0)),
            caption="a red ball",
        ),
    ]


@pytest.fixture
def graphs() -> list[SceneGraph]:
    return make_graphs()


@pytest.fixture
def tiny_pipe():
    """A tiny pixel-space pipeline (16x16, tokens conditioning), seeded."""
    torch.manual_seed(0)
    pipe = build_pipeline("debug", VOCAB, conditioning="tokens", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_gated_pipe():
    pipe = build_pipeline("debug", VOCAB, conditioning="gated", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe
