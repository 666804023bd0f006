"""--compile on the CPU: inductor with frozen weights renders the eager pipeline's images up to rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jobs.generate import GenerateConfig
from jobs.stages import generation_settings
from sgmodel.shapes.quality import held_out_graphs
from workers.runtime import load_pipeline

MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-sg-diffusion"


def test_compile_is_opt_in():
    assert generation_settings(GenerateConfig(), 0).compile is False
    assert generation_settings(GenerateConfig(compile=True), 0).compile is True


def test_compiled_frozen_unet_renders_the_eager_images_within_rounding():
    graphs = held_out_graphs(2, 11, 32)
    images = {}
    for compiled in (False, True):
        pipe = load_pipeline(str(MODEL), torch.device("cpu"), torch.float32, compile_unet=compiled, channels_last=True)
        assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule) == compiled
        out = pipe(graphs, num_inference_steps=3, seeds=[5, 6], output_type="np").images
        images[compiled] = np.round(out * 255).astype(np.int16)
    diff = np.abs(images[True] - images[False])
    assert diff.max() <= 3 and images[True].std() > 10  # real images, equal up to float rounding
