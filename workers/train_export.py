"""The model a fine-tuning run starts from and the pipeline folder it ends with."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from workers.storage import Storage, join

if TYPE_CHECKING:
    from workers.train_loop import WorkerSettings


def load_base(settings: WorkerSettings, storage: Storage):
    """The pipeline to fine-tune: a scene-graph pipeline as saved, or SD + a fresh graph encoder/conditioner.

    A scene-graph base asked for another ``--conditioning`` is converted (new parts start neutral, see
    :func:`sgmodel.pipeline.convert_conditioning`), and its attention re-split when asked for other
    ``attention_heads``; with an image encoder, a graph encoder without a
    projection into its embedding space gets one. Seeded by the caller, so every rank builds
    identical new modules.
    """
    from sgmodel.pipeline import (
        SceneGraphDiffusionPipeline,
        add_graph_projection,
        convert_conditioning,
        set_attention_heads,
    )
    from workers.runtime import localize_model

    path = localize_model(settings.base, storage)
    projection_dim = None
    if settings.image_encoder:
        projection_dim = int(load_image_encoder_config(settings, storage).projection_dim)
    if settings.base_kind == "scene_graph":
        pipe = SceneGraphDiffusionPipeline.from_pretrained(path, use_safetensors=True)
        if settings.conditioning is not None:
            convert_conditioning(pipe, settings.conditioning, settings.layout_channels)
        if projection_dim is not None:
            add_graph_projection(pipe, projection_dim)
    else:
        pipe = SceneGraphDiffusionPipeline.from_stable_diffusion(
            path, conditioning=settings.conditioning or "tokens", projection_dim=projection_dim,
            layout_channels=settings.layout_channels if settings.conditioning == "gated" else 0, **settings.graph_sizes,
        )
    if settings.attention_heads is not None:
        pipe.register_modules(unet=set_attention_heads(pipe.unet, settings.attention_heads))
    return pipe


def load_image_encoder_config(settings: WorkerSettings, storage: Storage):
    from transformers import CLIPVisionConfig

    from workers.runtime import localize_model

    return CLIPVisionConfig.from_pretrained(localize_model(settings.image_encoder, storage))


def load_image_encoder(settings: WorkerSettings, storage: Storage):
    """The frozen CLIP vision model of the alignment losses (None when λ = 1)."""
    if not settings.image_encoder:
        return None
    from transformers import CLIPVisionModelWithProjection

    from workers.runtime import localize_model

    return CLIPVisionModelWithProjection.from_pretrained(
        localize_model(settings.image_encoder, storage), use_safetensors=True
    )


def export_pipeline(settings: WorkerSettings, state: Mapping[str, torch.Tensor], storage: Storage) -> list[str]:
    """Load the base again, put the trained weights in, merge LoRA, save safetensors to ``settings.output``.

    Rebuilding from the base (instead of saving the training copy) gives full frozen weights even
    when ZeRO-3 partitioned them, and a plain fp32 pipeline whatever the training precision. With
    LoRA, the adapters are also written unmerged as ``pytorch_lora_weights.safetensors``.
    """
    from sgmodel.train import configure_trainable, merge_lora

    torch.manual_seed(settings.seed)
    pipe = load_base(settings, storage)
    configure_trainable(pipe, settings.train)  # adds LoRA adapters under the names training used
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        part, _, rest = name.partition(".")
        if part == "discriminator":  # a training-only helper, not part of the generator
            continue
        by_part.setdefault(part, {})[rest] = tensor
    for part, tensors in by_part.items():
        target = getattr(pipe, part)
        missing_from_model = set(tensors) - set(dict(target.named_parameters()))
        if missing_from_model:
            raise RuntimeError(f"trained weights not found in the base's {part}: {sorted(missing_from_model)[:5]}")
        with torch.no_grad():
            params = dict(target.named_parameters())
            for key, tensor in tensors.items():
                params[key].copy_(tensor.reshape(params[key].shape).to(params[key].dtype))  # [1] -> 0-dim gates
    pipe.to(torch.float32)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        if settings.train.trainable == "lora":
            save_lora_weights(pipe.unet, tmp)
            merge_lora(pipe.unet)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                uri = join(settings.output, str(path.relative_to(tmp)))
                storage.write_bytes(uri, path.read_bytes())
                written.append(uri)
    return written


def save_lora_weights(unet: torch.nn.Module, folder: str) -> None:
    """The UNet's LoRA adapters as diffusers writes them (``pytorch_lora_weights.safetensors``, with the
    adapter config in its metadata), so ``pipe.load_lora_weights(folder)`` puts them on the base's UNet."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
