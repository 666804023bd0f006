"""Guided steps as one batched UNet call or two (--guidance-passes): the same images either way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jobs.generate import GenerateConfig
from jobs.stages import generation_settings
from sgmodel.shapes.quality import held_out_graphs
from workers.runtime import load_pipeline

MODEL = Path(__file__).resolve().parents[2] / "models" / "shapes-sg-diffusion"


def test_batched_is_the_default_and_separate_can_be_chosen():
    assert generation_settings(GenerateConfig(), 0).separate_guidance is False
    assert generation_settings(GenerateConfig(guidance_passes="separate"), 0).separate_guidance is True
    assert generation_settings(GenerateConfig(guidance_passes="separate"), 1).separate_guidance is True


def test_separate_passes_render_the_committed_models_images():
    """The committed model is GLIGEN-conditioned: its grounding inputs are cut per half too."""
    graphs = held_out_graphs(3, 7, 32)
    images, calls = {}, {}
    for separate in (False, True):
        pipe = load_pipeline(str(MODEL), torch.device("cpu"), torch.float32, separate_guidance=separate)
        batches: list[int] = []
        pipe.unet.register_forward_hook(lambda module, args, kwargs, out, seen=batches: seen.append(args[0].shape[0]),
                                        with_kwargs=True)
        out = pipe(graphs, num_inference_steps=4, guidance_scale=3.0, seeds=[1, 2, 3], output_type="np").images
        images[separate], calls[separate] = np.round(out * 255).astype(np.int16), batches
    assert calls[False] == [6] * 4 and calls[True] == [3] * 8
    assert np.abs(images[True] - images[False]).max() <= 1 and images[True].std() > 10
