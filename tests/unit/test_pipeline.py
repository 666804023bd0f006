import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sgmodel.graph import SceneGraph, SGObject
from sgmodel.pipeline import SceneGraphDiffusionPipeline, add_gated_attention


def run(pipe, graphs, seeds, steps=3, **kw):
    return pipe(graphs, num_inference_steps=steps, seeds=seeds, output_type="np", **kw).images


def test_same_graph_and_seed_same_image_whatever_the_batch(tiny_pipe, graphs):
    batch = run(tiny_pipe, graphs, seeds=[11, 12, 13])
    assert batch.shape == (3, 16, 16, 3)
    assert batch.min() >= 0 and batch.max() <= 1
    alone = run(tiny_pipe, [graphs[1]], seeds=[12])
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)
    reordered = run(tiny_pipe, [graphs[2], graphs[0]], seeds=[13, 11])
    np.testing.assert_allclose(batch[0], reordered[1], atol=1e-5)
    np.testing.assert_array_equal(batch, run(tiny_pipe, graphs, seeds=[11, 12, 13]))


def test_seeds_and_graphs_both_matter(tiny_pipe, graphs):
    a = run(tiny_pipe, [graphs[0]], seeds=[1])
    assert np.abs(a - run(tiny_pipe, [graphs[0]], seeds=[2])).max() > 1e-3
    assert np.abs(a - run(tiny_pipe, [graphs[1]], seeds=[1])).max() > 1e-6


def test_several_images_per_graph_use_their_own_seeds(tiny_pipe, graphs):
    out = tiny_pipe(graphs[:2], num_inference_steps=2, num_images_per_graph=2, seeds=[5, 6, 7, 8], output_type="np")
    assert out.images.shape[0] == 4 and out.seeds == [5, 6, 7, 8]
    single = run(tiny_pipe, [graphs[1]], seeds=[8], steps=2)
    np.testing.assert_allclose(out.images[3], single[0], atol=1e-5)


def test_default_seeds_come_from_graph_seed_or_id(tiny_pipe):
    seeded = SceneGraph(id="s", objects=(SGObject("circle"),), seed=42)
    plain = SceneGraph(id="p", objects=(SGObject("circle"),))
    seeds = SceneGraphDiffusionPipeline.default_seeds([seeded, plain], 2)
    assert seeds[:2] == [42, 43]
    assert seeds[2:] == SceneGraphDiffusionPipeline.default_seeds([plain], 2)
    assert tiny_pipe([seeded], num_inference_steps=1).seeds == [42]


def test_save_load_round_trip_gives_identical_images(tiny_pipe, graphs, tmp_path):
    before = run(tiny_pipe, graphs, seeds=[1, 2, 3])
    tiny_pipe.save_pretrained(tmp_path)
    assert list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.bin"))
    loaded = SceneGraphDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(before, run(loaded, graphs, seeds=[1, 2, 3]))


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_schedulers(tiny_pipe, graphs, scheduler_cls):
    tiny_pipe.scheduler = scheduler_cls.from_config(tiny_pipe.scheduler.config)
    a = run(tiny_pipe, graphs[:2], seeds=[3, 4], steps=4)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a[1], run(tiny_pipe, [graphs[1]], seeds=[4], steps=4)[0], atol=1e-5)


def test_guidance_changes_output_and_one_disables_uncond(tiny_pipe, graphs):
    calls = []
    original = tiny_pipe.unet.forward
    tiny_pipe.unet.forward = lambda x, *a, **k: calls.append(x.shape[0]) or original(x, *a, **k)
    run(tiny_pipe, graphs[:2], seeds=[1, 2], steps=1, guidance_scale=1.0)
    run(tiny_pipe, graphs[:2], seeds=[1, 2], steps=1, guidance_scale=4.0)
    assert calls == [2, 4]  # cond and uncond share one batched forward


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [
        ({"graphs": []}, "[]"),
        ({"graphs": [{"id": "x", "objects": []}]}, "graphs[0]"),
        ({"graphs": ["not a graph"]}, "'not a graph'"),
        ({"num_inference_steps": 0}, "got 0"),
        ({"guidance_scale": -1.0}, "-1.0"),
        ({"height": 15}, "got 15"),
        ({"width": "wide"}, "'wide'"),
        ({"seeds": [1]}, "[1]"),
        ({"seeds": [1, -5]}, "-5"),
        ({"num_images_per_graph": 0}, "got 0"),
        ({"output_type": "jpeg"}, "'jpeg'"),
    ],
)
def test_check_inputs_quotes_the_bad_argument(tiny_pipe, graphs, kwargs, quoted):
    args = {"graphs": graphs[:2], "num_inference_steps": 1, "seeds": [1, 2]} | kwargs
    with pytest.raises(ValueError) as err:
        tiny_pipe(**args)
    assert quoted in str(err.value)


def test_gated_with_zero_gates_equals_the_base_unet():
    torch.manual_seed(0)
    base = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    gated = add_gated_attention(base).eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    gligen = {"boxes": torch.rand(2, 3, 4), "masks": torch.ones(2, 3), "positive_embeddings": torch.randn(2, 3, 8)}
    with torch.no_grad():
        expected = base(x, 10, encoder_hidden_states=ctx).sample
        got = gated(x, 10, encoder_hidden_states=ctx, cross_attention_kwargs={"gligen": dict(gligen)}).sample
        assert torch.equal(expected, got)
        for name, p in gated.named_parameters():
            if name.endswith("alpha_attn") or name.endswith("alpha_dense"):
                p.fill_(0.5)
        changed = gated(x, 10, encoder_hidden_states=ctx, cross_attention_kwargs={"gligen": dict(gligen)}).sample
    assert not torch.allclose(expected, changed)


def write_tiny_clip_tokenizer(folder) -> None:
    """A byte-level-BPE CLIP tokenizer with a character vocabulary (every word splits into letters)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["ca"] = len(vocab)  # one merge: the fast tokenizer refuses an empty merge list
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nc a\n")


@pytest.fixture
def tiny_sd_folder(tmp_path):
    """A Stable Diffusion-format folder (unet, vae, text_encoder, tokenizer, scheduler) built from configs."""
    return build_tiny_sd_folder(tmp_path / "tiny-sd")


def build_tiny_sd_folder(root):
    """Stable Diffusion's components (unet, vae, text_encoder, tokenizer, scheduler), seeded, saved under ``root``."""
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(root / "vae")
    write_tiny_clip_tokenizer(root / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(root / "tokenizer")
    tok.save_pretrained(root / "tokenizer")  # writes tokenizer_config.json, as real SD folders have
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    ).save_pretrained(root / "text_encoder")
    DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False).save_pretrained(root / "scheduler")
    return root


@pytest.mark.parametrize("conditioning", ["tokens", "gated"])
def test_from_stable_diffusion_folder(tiny_sd_folder, graphs, conditioning, tmp_path):
    pipe = SceneGraphDiffusionPipeline.from_stable_diffusion(
        str(tiny_sd_folder), conditioning=conditioning, graph_dim=16, hidden_dim=16, num_layers=1
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is not None and pipe.size_multiple == 4
    assert (pipe.unet.config.attention_type == "gated") == (conditioning == "gated")
    images = run(pipe, graphs, seeds=[1, 2, 3], steps=2, height=16, width=16)
    assert images.shape == (3, 16, 16, 3)
    pipe.save_pretrained(tmp_path / "sg")
    again = SceneGraphDiffusionPipeline.from_pretrained(tmp_path / "sg")
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(images, run(again, graphs, seeds=[1, 2, 3], steps=2, height=16, width=16))


def test_latent_output_is_what_decode_turns_into_the_images(tiny_pipe, tiny_sd_folder, graphs):
    sd = SceneGraphDiffusionPipeline.from_stable_diffusion(str(tiny_sd_folder), graph_dim=16, hidden_dim=16)
    sd.set_progress_bar_config(disable=True)
    for pipe, channels in ((tiny_pipe, 3), (sd, 4)):  # pixel space, and latent space with a VAE
        kw = {"num_inference_steps": 2, "seeds": [4, 5, 6], "height": 16, "width": 16}
        latents = pipe(graphs, output_type="latent", **kw).images
        assert latents.shape == (3, channels, 16 // pipe.vae_scale_factor, 16 // pipe.vae_scale_factor)
        with torch.no_grad():
            torch.testing.assert_close(pipe.decode(latents), pipe(graphs, output_type="pt", **kw).images)


def test_gated_sd_pipeline_matches_plain_unet_before_training(tiny_sd_folder):
    plain = UNet2DConditionModel.from_pretrained(tiny_sd_folder / "unet").eval()
    pipe = SceneGraphDiffusionPipeline.from_stable_diffusion(str(tiny_sd_folder), conditioning="gated", graph_dim=16)
    cond = pipe.encode([SceneGraph(id="g", objects=(SGObject("cat"), SGObject("dog")))])
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = plain(x, 5, encoder_hidden_states=cond.context, encoder_attention_mask=cond.mask).sample
        got = pipe.unet(x, 5, **cond.unet_kwargs()).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def count_unet_calls(pipe) -> list[int]:
    calls: list[int] = []
    original = pipe.unet.forward
    pipe.unet.forward = lambda x, *a, **k: calls.append(x.shape[0]) or original(x, *a, **k)
    return calls


def test_image_to_image_runs_the_last_strength_steps_from_the_start_image(tiny_pipe, graphs):
    seeds = [7, 8, 9]
    start = run(tiny_pipe, graphs, seeds=[1, 2, 3], steps=2)  # any images, float [0, 1]
    calls = count_unet_calls(tiny_pipe)
    out = run(tiny_pipe, graphs, seeds, steps=10, image=start, strength=0.5)
    assert len(calls) == 5  # int(10 * 0.5) of the 10 steps
    assert out.shape == start.shape and np.isfinite(out).all()
    np.testing.assert_array_equal(out, run(tiny_pipe, graphs, seeds, steps=10, image=start, strength=0.5))
    alone = run(tiny_pipe, [graphs[1]], [8], steps=10, image=start[1:2], strength=0.5)
    np.testing.assert_allclose(out[1], alone[0], atol=1e-5)  # batch-independent, like generation from noise
    # uint8 images are read as /255; other sizes are resized to the output size
    uint8 = [(im * 255).round().astype(np.uint8) for im in start]
    np.testing.assert_allclose(run(tiny_pipe, graphs, seeds, steps=10, image=uint8, strength=0.5), out, atol=2e-2)
    small = torch.from_numpy(start).permute(0, 3, 1, 2)[..., ::2, ::2]
    assert run(tiny_pipe, graphs, seeds, steps=10, image=small, strength=0.5).shape == start.shape
    # the less of the schedule runs, the closer the output stays to the start image
    far = np.abs(run(tiny_pipe, graphs, seeds, steps=10, image=start, strength=1.0) - start).mean()
    near = np.abs(run(tiny_pipe, graphs, seeds, steps=10, image=start, strength=0.1) - start).mean()
    assert near < far


def test_image_to_image_encodes_through_the_vae(tiny_sd_folder, graphs):
    sd = SceneGraphDiffusionPipeline.from_stable_diffusion(str(tiny_sd_folder), graph_dim=16, hidden_dim=16)
    sd.set_progress_bar_config(disable=True)
    ramp = np.linspace(0.0, 1.0, 16, dtype=np.float32)
    start = np.stack([np.broadcast_to(ramp[None, :, None] * c, (16, 16, 3)) for c in (0.3, 0.6, 1.0)])
    latents = sd.encode_images(torch.from_numpy(start).permute(0, 3, 1, 2))
    assert latents.shape == (3, 4, 16 // sd.vae_scale_factor, 16 // sd.vae_scale_factor)
    # the start image goes through the VAE: with little of the schedule left, the output stays near the
    # VAE's own reconstruction of the start image, and far from another image's
    recon = sd.decode(latents).permute(0, 2, 3, 1).cpu().numpy()
    out = run(sd, graphs, [1, 2, 3], steps=20, height=16, width=16, image=start, strength=0.05)
    other = run(sd, graphs, [1, 2, 3], steps=20, height=16, width=16, image=1.0 - start, strength=0.05)
    assert out.shape == (3, 16, 16, 3)
    assert np.abs(out - recon).mean() < 0.5 * np.abs(other - recon).mean()


@pytest.mark.parametrize(
    ("kwargs", "quoted"),
    [({"strength": 0.0}, "got 0.0"), ({"strength": 1.5}, "got 1.5"), ({"strength": 0.05}, "runs no step"),
     ({"image": np.zeros((1, 16, 16, 3), np.float32)}, "one RGB image per output image (2)"),
     ({"latents": torch.zeros(2, 3, 16, 16)}, "not both")],
)
def test_image_to_image_arguments_are_checked(tiny_pipe, graphs, kwargs, quoted):
    args = {"image": np.zeros((2, 16, 16, 3), np.float32), "strength": 0.5} | kwargs
    with pytest.raises(ValueError) as err:
        run(tiny_pipe, graphs[:2], [1, 2], steps=10, **args)
    assert quoted in str(err.value)
