"""Model sizes in one registry: the tiny ``debug`` flavour the tests use runs the same code as ``demo``.

A flavour builds a fresh, untrained SceneGraphDiffusionPipeline from configs alone (no download):
a word-level tokenizer and a small CLIP text model over a given vocabulary, the graph encoder, the
conditioner and a pixel-space UNet. Stable Diffusion-sized models come from
``SceneGraphDiffusionPipeline.from_stable_diffusion`` instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sgmodel.conditioning import SceneGraphConditioner
from sgmodel.encoder import SceneGraphEncoder
from sgmodel.pipeline import SceneGraphDiffusionPipeline, add_gated_attention
from sgmodel.shapes.tokenizer import build_word_tokenizer


@dataclass(frozen=True, kw_only=True)
class Flavour:
    image_size: int
    """Pixel-space resolution the UNet is built for."""
    unet_channels: tuple[int, ...]
    """UNet block widths; cross-attention at every level but the first."""
    layers_per_block: int
    attention_head_dim: int
    norm_num_groups: int
    text_dim: int
    """Hidden size of the small CLIP text model."""
    text_layers: int
    graph_dim: int
    hidden_dim: int
    graph_layers: int
    cross_attention_dim: int


FLAVOURS: dict[str, Flavour] = {
    "debug": Flavour(
        image_size=16, unet_channels=(8, 16), layers_per_block=1, attention_head_dim=4, norm_num_groups=4,
        text_dim=16, text_layers=1, graph_dim=16, hidden_dim=32, graph_layers=2, cross_attention_dim=16,
    ),
    "demo": Flavour(
        image_size=32, unet_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
        text_dim=64, text_layers=2, graph_dim=64, hidden_dim=128, graph_layers=3, cross_attention_dim=64,
    ),
}


def build_pipeline(
    flavour: str | Flavour,
    vocabulary: Iterable[str],
    conditioning: str = "tokens",
    seed: int = 0,
    projection_dim: int | None = None,
    use_caption: bool = True,
    layout_channels: int = 0,
) -> SceneGraphDiffusionPipeline:
    """A fresh pixel-space pipeline of the given flavour whose tokenizer knows ``vocabulary``'s words."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    f = FLAVOURS[flavour] if isinstance(flavour, str) else flavour
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(vocabulary, model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=f.text_dim,
            intermediate_size=2 * f.text_dim,
            num_hidden_layers=f.text_layers,
            num_attention_heads=max(1, f.text_dim // 16),
            max_position_embeddings=16,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            projection_dim=f.text_dim,
        )
    )
    n = len(f.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=f.image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=f.unet_channels,
        layers_per_block=f.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=f.cross_attention_dim,
        attention_head_dim=f.attention_head_dim,
        norm_num_groups=f.norm_num_groups,
    )
    if conditioning == "gated":
        unet = add_gated_attention(unet, layout_channels)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=True,
        timestep_spacing="trailing",  # good few-step drafts (SBPC) from the same trained model
        set_alpha_to_one=False,
    )
    encoder = SceneGraphEncoder(
        text_dim=f.text_dim, graph_dim=f.graph_dim, hidden_dim=f.hidden_dim, num_layers=f.graph_layers,
        projection_dim=projection_dim,
    )
    conditioner = SceneGraphConditioner(
        mode=conditioning, text_dim=f.text_dim, graph_dim=f.graph_dim, cross_attention_dim=f.cross_attention_dim,
        hidden_dim=f.hidden_dim, text_pooling="mean", max_grounding_tokens=8,
        use_caption=use_caption, layout_channels=layout_channels,
    )
    for module in (unet, text_encoder, encoder, conditioner):
        module.eval()  # as from_pretrained leaves them; training code switches to train() itself
    return SceneGraphDiffusionPipeline(
        unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
        graph_encoder=encoder, conditioner=conditioner, vae=None,
    )
