"""The generator's UNet in channels-last layout (--memory-format): the same images up to rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jobs.generate import GenerateConfig
from jobs.stages import generation_settings
from sgmodel.shapes.quality import held_out_graphs
from workers.runtime import load_pipeline

MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-sg-diffusion"


def test_contiguous_is_the_default_and_channels_last_can_be_chosen():
    assert generation_settings(GenerateConfig(), 0).channels_last is False
    assert generation_settings(GenerateConfig(memory_format="channels_last"), 0).channels_last is True


def test_channels_last_weights_render_the_committed_models_images_within_rounding():
    graphs = held_out_graphs(3, 7, 32)
    images = {}
    for layout in (False, True):
        pipe = load_pipeline(str(MODEL), torch.device("cpu"), torch.float32, channels_last=layout)
        conv = pipe.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == layout
        out = pipe(graphs, num_inference_steps=4, seeds=[1, 2, 3], output_type="np").images  # floats in [0, 1]
        images[layout] = np.round(out * 255).astype(np.int16)
    diff = np.abs(images[True] - images[False])
    assert diff.max() <= 3 and images[True].std() > 10  # real images, equal up to float rounding
