"""The pipeline as diffusers users call it: generators, callbacks, aliases, and loading through DiffusionPipeline."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from sgmodel.pipeline import LOADER_MODULE, SceneGraphDiffusionPipeline, SceneGraphPipelineOutput


def images(pipe, graphs, **kw):
    return pipe(graphs, num_inference_steps=kw.pop("steps", 3), output_type="np", **kw).images


def test_same_generator_seed_same_images(tiny_pipe, graphs):
    a = images(tiny_pipe, graphs, generator=torch.Generator().manual_seed(7))
    b = images(tiny_pipe, graphs, generator=torch.Generator().manual_seed(7))
    c = images(tiny_pipe, graphs, generator=torch.Generator().manual_seed(8))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_a_list_of_seeded_generators_draws_the_noise_of_those_seeds(tiny_pipe, graphs):
    # DDIM is deterministic after the initial noise, so per-image generators seeded s give the image of seeds=[s]
    by_seeds = images(tiny_pipe, graphs, seeds=[3, 4, 5])
    by_generators = tiny_pipe(graphs, num_inference_steps=3, output_type="np",
                              generator=[torch.Generator().manual_seed(s) for s in (3, 4, 5)])
    np.testing.assert_array_equal(by_seeds, by_generators.images)
    assert by_generators.seeds is None  # the seeds are the caller's generators', not known here


def test_a_stochastic_sampler_draws_its_step_noise_from_the_generator(tiny_pipe, graphs):
    tiny_pipe.scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    a = images(tiny_pipe, graphs[:1], generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(a, images(tiny_pipe, graphs[:1], generator=torch.Generator().manual_seed(1)))
    # the same initial noise with other step noise gives another image
    noise = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    other = images(tiny_pipe, graphs[:1], latents=noise, generator=torch.Generator().manual_seed(99))
    assert np.abs(a - other).max() > 1e-4


def test_num_images_per_prompt_and_its_alias(tiny_pipe, graphs):
    out = tiny_pipe(graphs[:2], num_inference_steps=2, num_images_per_prompt=2, output_type="np")
    alias = tiny_pipe(graphs[:2], num_inference_steps=2, num_images_per_graph=2, output_type="np")
    assert out.images.shape[0] == 4 and out.seeds == alias.seeds
    assert out.seeds == SceneGraphDiffusionPipeline.default_seeds(graphs[:2], 2)
    np.testing.assert_array_equal(out.images, alias.images)
    with pytest.raises(ValueError, match=r"`num_images_per_graph` \(3\).*`num_images_per_prompt` \(2\)"):
        tiny_pipe(graphs[:1], num_inference_steps=1, num_images_per_prompt=2, num_images_per_graph=3)


def test_latents_replace_the_initial_noise(tiny_pipe, graphs):
    noise = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    a = images(tiny_pipe, graphs[:2], latents=noise)
    np.testing.assert_array_equal(a, images(tiny_pipe, graphs[:2], latents=noise.clone(), seeds=[1, 2]))
    assert np.abs(a - images(tiny_pipe, graphs[:2], latents=noise * 0.5)).max() > 1e-4


def test_callback_on_step_end_sees_every_step_and_can_replace_the_latents(tiny_pipe, graphs):
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append((step, int(timestep), sorted(tensors), tuple(tensors["latents"].shape)))
        return {}

    plain = images(tiny_pipe, graphs[:2], seeds=[1, 2], callback_on_step_end=record,
                   callback_on_step_end_tensor_inputs=["latents", "noise_pred"])
    assert [s[0] for s in seen] == [0, 1, 2]
    assert [s[1] for s in seen] == tiny_pipe.scheduler.timesteps.tolist()
    assert all(s[2] == ["latents", "noise_pred"] and s[3] == (2, 3, 16, 16) for s in seen)
    np.testing.assert_array_equal(plain, images(tiny_pipe, graphs[:2], seeds=[1, 2]))

    def flatten_last(pipe, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if step == pipe.num_timesteps - 1 else {}

    flat = images(tiny_pipe, graphs[:2], seeds=[1, 2], callback_on_step_end=flatten_last)
    np.testing.assert_allclose(flat, 0.5, atol=1e-6)  # zero latents of a pixel-space model decode to grey


def test_a_callback_can_interrupt_the_loop(tiny_pipe, graphs):
    calls = []
    original = tiny_pipe.unet.forward
    tiny_pipe.unet.forward = lambda x, *a, **k: calls.append(1) or original(x, *a, **k)

    def stop_after_two(pipe, step, timestep, tensors):
        pipe._interrupt = step >= 1
        return {}

    images(tiny_pipe, graphs[:1], steps=5, callback_on_step_end=stop_after_two)
    assert len(calls) == 2


def test_return_dict_false_gives_a_tuple(tiny_pipe, graphs):
    out = tiny_pipe(graphs[:1], num_inference_steps=1, seeds=[4], output_type="pt", return_dict=False)
    assert isinstance(out, tuple) and out[1] == [4] and tuple(out[0].shape) == (1, 3, 16, 16)
    assert isinstance(tiny_pipe(graphs[:1], num_inference_steps=1), SceneGraphPipelineOutput)


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"generator": [torch.Generator()]}, "length 1"),
        ({"generator": 5}, "got 5"),
        ({"generator": torch.Generator(), "seeds": [1, 2]}, "seeds=[1, 2]"),
        ({"latents": torch.zeros(2, 4, 16, 16)}, "(2, 4, 16, 16)"),
        ({"callback_on_step_end_tensor_inputs": ["latents", "context"]}, "['context']"),
        ({"num_images_per_prompt": 0}, "got 0"),
    ],
)
def test_diffusers_arguments_are_checked(tiny_pipe, graphs, kwargs, quoted):
    with pytest.raises(ValueError) as err:
        tiny_pipe(graphs[:2], num_inference_steps=1, **kwargs)
    assert quoted in str(err.value)


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies a folder's pipeline module into its modules cache: keep that cache in the test's folder."""
    from diffusers.utils import dynamic_modules_utils

    cache = tmp_path / "hf-modules"
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(cache))
    return cache


def test_diffusion_pipeline_loads_a_saved_folder_and_renders_the_same(tiny_pipe, graphs, tmp_path, modules_cache):
    folder = tmp_path / "shared"
    tiny_pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == [LOADER_MODULE, "SceneGraphDiffusionPipeline"]
    assert (folder / f"{LOADER_MODULE}.py").is_file()

    ours = SceneGraphDiffusionPipeline.from_pretrained(folder)
    theirs = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(theirs) is SceneGraphDiffusionPipeline
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    expected = images(tiny_pipe, graphs, seeds=[1, 2, 3])
    np.testing.assert_array_equal(images(ours, graphs, seeds=[1, 2, 3]), expected)
    np.testing.assert_array_equal(images(theirs, graphs, seeds=[1, 2, 3]), expected)
    gen = images(theirs, graphs, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(gen, images(ours, graphs, generator=torch.Generator().manual_seed(0)))


def test_diffusion_pipeline_asks_for_trust_remote_code(tiny_pipe, tmp_path, modules_cache):
    tiny_pipe.save_pretrained(tmp_path / "shared")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(tmp_path / "shared")


def test_our_loader_never_imports_the_folders_module(tiny_pipe, graphs, tmp_path):
    folder = tmp_path / "shared"
    tiny_pipe.save_pretrained(folder)
    (folder / f"{LOADER_MODULE}.py").write_text("raise RuntimeError('this file must not run')\n")
    loaded = SceneGraphDiffusionPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images(loaded, graphs, seeds=[5, 6, 7]), images(tiny_pipe, graphs, seeds=[5, 6, 7]))
