"""Fixtures for the model-library tests: tiny seeded pipelines built from configs, sample graphs."""

from __future__ import annotations

import os
import socket

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


@pytest.fixture(scope="session")
def process_group():
    """A one-rank gloo group, as each Ray Train worker has (DeepSpeed needs one). One for the whole test
    run: DeepSpeed caches the group, so a group destroyed and made again breaks later engines."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
            env.setenv(key, value)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()
