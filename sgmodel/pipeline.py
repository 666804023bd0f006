"""SceneGraphDiffusionPipeline: scene graphs in, images out, as a diffusers ``DiffusionPipeline``.

Works in latent space with a VAE (Stable Diffusion) or in pixel space without one (the project's
small demo models). Called as diffusers pipelines are (``generator``, ``num_images_per_prompt``,
``latents``, ``callback_on_step_end``, ``output_type``, ``return_dict``), plus ``seeds``: one seed
per image and its own noise generator, so the same (graph, seed) gives the same image whatever
else shares the batch (the batch jobs' deterministic path).

A saved folder names a small loader module in ``model_index.json`` (``_class_name`` =
``[LOADER_MODULE, class name]``), so ``diffusers.DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` loads it wherever sgbatch is installed. This class itself never imports
that file: its ``load_config`` reads the entry as its own class name.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from sgmodel.conditioning import Condition, SceneGraphConditioner, concat_conditions, encode_graphs
from sgmodel.encoder import SceneGraphEncoder
from sgmodel.graph import SceneGraph, SceneGraphError, derive_seed, parse_graph
from sgmodel.text import TextEmbedder

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SEED = 2**63
LOADER_MODULE = "sgbatch_pipeline"
"""The module file a saved folder carries for ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)``."""
LOADER_SOURCE = '''"""Loads this folder with sgbatch's SceneGraphDiffusionPipeline (needs the sgbatch package installed).

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
"""

from sgmodel.pipeline import SceneGraphDiffusionPipeline

__all__ = ["SceneGraphDiffusionPipeline"]
'''
ALIGNMENT = 64
"""Bytes: the CPU allocator's alignment, which weights memory-mapped from safetensors may lack."""


@dataclass
class SceneGraphPipelineOutput(BaseOutput):
    images: Any
    """PIL images, a float array [B, H, W, 3] in [0, 1], a tensor [B, 3, H, W] in [0, 1], or the
    denoised latents [B, C, h, w] (``"latent"``; what ``decode`` turns into images)."""
    seeds: list[int] | None
    """The seed of each image, in output order (graph-major: graph 0's images first); None when the
    noise came from a caller's ``generator``."""


class SceneGraphDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Scene graphs in, images out. ``load_lora_weights`` puts diffusers-format LoRA weights (e.g. a
    fine-tuning run's ``pytorch_lora_weights.safetensors``) on the UNet and text encoder, as for Stable Diffusion."""

    model_cpu_offload_seq = "text_encoder->graph_encoder->conditioner->unet->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "noise_pred"]

    def __init__(
        self,
        unet,
        scheduler,
        text_encoder,
        tokenizer,
        graph_encoder: SceneGraphEncoder,
        conditioner: SceneGraphConditioner,
        vae=None,
    ) -> None:
        super().__init__()
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            graph_encoder=graph_encoder,
            conditioner=conditioner,
            vae=vae,
        )
        self._text_embedder: TextEmbedder | None = None
        self._guidance_scale = 1.0
        self._num_timesteps = 0
        self._interrupt = False
        self.separate_guidance_passes = False
        """Guided sampling: run the conditional and unconditional halves as two UNet calls instead of one
        batched call. Same images; the speed difference depends on device and batch (benchmarks/render_speed.py)."""
        # Here rather than in from_pretrained: DiffusionPipeline.from_pretrained builds this class too.
        for module in (unet, vae, text_encoder, graph_encoder, conditioner):
            if isinstance(module, torch.nn.Module):
                realign_parameters(module)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config``, reading a saved folder's ``[LOADER_MODULE, class]`` entry as this class.

        Without this, diffusers would import the folder's loader file (and ask for
        ``trust_remote_code``) even when this class is the one loading it.
        """
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        name = config.get("_class_name")
        if isinstance(name, (list, tuple)) and len(name) == 2 and name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs) -> None:
        """diffusers' ``save_pretrained``, plus the loader module that ``DiffusionPipeline.from_pretrained`` imports."""
        hub = {k: kwargs.pop(k) for k in ("commit_message", "private", "create_pr", "token", "repo_id") if k in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        write_loader(save_directory, type(self).__name__)
        if push_to_hub:
            from huggingface_hub import create_repo

            repo_id = create_repo(hub.get("repo_id", Path(save_directory).name), exist_ok=True,
                                  private=hub.get("private"), token=hub.get("token")).repo_id
            self._upload_folder(save_directory, repo_id, token=hub.get("token"),
                                commit_message=hub.get("commit_message"), create_pr=hub.get("create_pr", False))

    def predict_noise(self, model_input: torch.Tensor, t, unet_kwargs: dict) -> torch.Tensor:
        """The UNet's prediction for a step; guided batches [cond; uncond] may go through in two halves."""
        if not (self.do_classifier_free_guidance and self.separate_guidance_passes):
            return self.unet(model_input, t, **unet_kwargs).sample
        full, half = model_input.shape[0], model_input.shape[0] // 2
        return torch.cat([self.unet(model_input[rows], t, **_batch_rows(unet_kwargs, rows, full)).sample
                          for rows in (slice(0, half), slice(half, full))])

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set by a ``callback_on_step_end`` (``pipe._interrupt = True``) to skip the remaining steps."""
        return self._interrupt

    # ------------------------------------------------------------------ helpers
    @property
    def text_embedder(self) -> TextEmbedder:
        """The cached label/predicate embedder over this pipeline's text model (built once)."""
        if self._text_embedder is None or self._text_embedder.text_encoder is not self.text_encoder:
            self._text_embedder = TextEmbedder(
                self.text_encoder, self.tokenizer, pooling=self.conditioner.config.text_pooling
            )
        return self._text_embedder

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    @property
    def latent_channels(self) -> int:
        """Channels of the noise the sampler denoises (the UNet may take layout channels on top)."""
        return int(self.unet.config.out_channels)

    @property
    def size_multiple(self) -> int:
        """Height/width must be multiples of this (VAE downsampling times UNet downsampling)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def encode(self, graphs: Sequence[SceneGraph]) -> Condition:
        return encode_graphs(graphs, self.text_embedder, self.graph_encoder, self.conditioner)

    @staticmethod
    def default_seeds(graphs: Sequence[SceneGraph], num_images_per_graph: int, base_seed: int = 0) -> list[int]:
        """A graph's own ``seed`` (then +k per extra image), else one derived from (base, id, k)."""
        out = []
        for g in graphs:
            for k in range(num_images_per_graph):
                out.append((g.seed + k) % MAX_SEED if g.seed is not None else derive_seed(base_seed, g.id, k))
        return out

    # ------------------------------------------------------------------ validation
    def check_inputs(
        self,
        graphs: Any,
        num_inference_steps: Any,
        guidance_scale: Any,
        height: Any,
        width: Any,
        seeds: Any,
        num_images_per_prompt: Any,
        output_type: Any,
        generator: Any = None,
        latents: Any = None,
        callback_on_step_end_tensor_inputs: Any = None,
    ) -> list[SceneGraph]:
        """Reject bad arguments with a ValueError that quotes them; returns the graphs as SceneGraphs."""
        if isinstance(graphs, (SceneGraph, Mapping)):
            graphs = [graphs]
        if not isinstance(graphs, Sequence) or isinstance(graphs, (str, bytes)) or len(graphs) == 0:
            raise ValueError(f"`graphs` must be a non-empty list of SceneGraph or contract rows, got {graphs!r}")
        parsed = []
        for i, g in enumerate(graphs):
            if isinstance(g, SceneGraph):
                parsed.append(g)
            elif isinstance(g, Mapping):
                try:
                    parsed.append(parse_graph(g))
                except SceneGraphError as err:
                    raise ValueError(f"`graphs[{i}]` is not a valid scene graph: {err}") from err
            else:
                raise ValueError(f"`graphs[{i}]` must be a SceneGraph or a mapping, got {type(g).__name__}: {g!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 0:
            raise ValueError(f"`guidance_scale` must be a number >= 0, got {guidance_scale!r}")
        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(f"`{name}` must be a positive multiple of {multiple}, got {value!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be an integer >= 1, got {num_images_per_prompt!r}")
        images = len(parsed) * num_images_per_prompt
        if seeds is not None:
            if generator is not None:
                raise ValueError(f"pass `seeds` or `generator`, not both (got seeds={seeds!r})")
            if not isinstance(seeds, Sequence) or len(seeds) != images:
                raise ValueError(
                    f"`seeds` must list one seed per image ({len(parsed)} graphs x {num_images_per_prompt} = "
                    f"{images}), got {seeds!r}"
                )
            for s in seeds:
                if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) < MAX_SEED:
                    raise ValueError(f"`seeds` must be integers in [0, 2**63), got {s!r} in {list(seeds)!r}")
        if generator is not None:
            gens = generator if isinstance(generator, list) else [generator]
            bad = [g for g in gens if not isinstance(g, torch.Generator)]
            if bad:
                raise ValueError(f"`generator` must be a torch.Generator or a list of them, got {bad[0]!r}")
            if isinstance(generator, list) and len(generator) != images:
                raise ValueError(
                    f"You have passed a list of generators of length {len(generator)}, but requested an effective batch "
                    f"size of {images} ({len(parsed)} graphs x {num_images_per_prompt}). Make sure the batch size "
                    "matches the length of the generators."
                )
        if latents is not None:
            expected = (images, self.latent_channels, height // self.vae_scale_factor,
                        width // self.vae_scale_factor)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
                shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else latents
                raise ValueError(f"`latents` must be a tensor of shape {expected}, got {shape!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if callback_on_step_end_tensor_inputs is not None and not all(
            k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found "
                f"{[k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]}"
            )
        return parsed

    # ------------------------------------------------------------------ sampling
    def initial_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """Unit Gaussian noise [B, C, h, w] from one CPU generator per image: the same on any device, in any batch."""
        shape = (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])

    def prepare_noise(self, count: int, seeds: Sequence[int] | None, generator, height: int, width: int, dtype,
                      device) -> torch.Tensor:
        """Unit noise [count, C, h, w]: from the seeds (one CPU generator each), else from ``generator`` as
        diffusers draws it (``randn_tensor``: a list gives one generator per image)."""
        if seeds is not None:
            return self.initial_noise(seeds, height, width).to(device=device, dtype=dtype)
        shape = (count, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> latents [B, C, h, w]: the inverse of ``decode`` (the VAE's mode)."""
        pixels = images.to(self._execution_device, torch.float32) * 2 - 1
        if self.vae is None:
            return pixels.to(self.unet.dtype)
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return (dist.mode() * self.vae.config.scaling_factor).to(self.unet.dtype)

    def start_images(self, image: Any, count: int, height: int, width: int) -> torch.Tensor:
        """``image`` (uint8 arrays [H, W, 3], a float array [B, H, W, 3] or a tensor [B, 3, H, W] in [0, 1])
        as a float tensor [B, 3, height, width] in [0, 1]; other sizes are resized (bilinear)."""
        if isinstance(image, torch.Tensor):
            out = image.float()
        else:
            arrays = [np.asarray(a) for a in image]
            out = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
            if arrays and arrays[0].dtype == np.uint8:
                out = out / 255.0
        if out.ndim != 4 or out.shape[0] != count or out.shape[1] != 3:
            raise ValueError(f"`image` must hold one RGB image per output image ({count}), got shape {tuple(out.shape)}")
        if tuple(out.shape[-2:]) != (height, width):
            out = torch.nn.functional.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
        return out.clamp(0, 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> images in [0, 1], [B, 3, H, W] float32."""
        if self.vae is not None:
            latents = latents / self.vae.config.scaling_factor
            images = self.vae.decode(latents.to(self.vae.dtype)).sample
        else:
            images = latents
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @staticmethod
    def to_output(images: torch.Tensor, output_type: str):
        if output_type == "pt":
            return images.cpu()
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]

    @torch.inference_mode()
    def __call__(
        self,
        graphs: Sequence[SceneGraph] | Sequence[Mapping],
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        height: int | None = None,
        width: int | None = None,
        seeds: Sequence[int] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        image: Any = None,
        strength: float = 1.0,
        layout: str = "sample",
        generator: torch.Generator | list[torch.Generator] | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        num_images_per_graph: int | None = None,
    ) -> SceneGraphPipelineOutput | tuple:
        """Images for scene graphs (``graphs``: SceneGraph objects or contract rows as dicts).

        Noise comes from ``seeds`` (one seed per image, each with its own CPU generator: an image does not
        depend on what else shares the batch), else from ``generator`` as diffusers draws it (one
        ``torch.Generator``, or a list with one per image), else from seeds derived from each graph's id
        (:meth:`default_seeds`). ``latents`` [B, C, h, w] replaces the initial noise (scaled by the
        scheduler's ``init_noise_sigma``, as diffusers does). ``num_images_per_prompt`` images per graph
        (``num_images_per_graph`` is the same). ``callback_on_step_end(pipe, step, timestep, tensors)`` runs
        after each step with the tensors named in ``callback_on_step_end_tensor_inputs`` (from
        ``_callback_tensor_inputs``) and may return a new ``latents``.

        ``image`` + ``strength`` (image-to-image, as diffusers' img2img): start from ``image``, one per
        output image, noised with each image's own noise to the ``strength`` fraction of the schedule,
        and run only the last ``int(num_inference_steps * strength)`` steps. The seed's own noise keeps
        the start on the path the sampler would take from that seed, so an image that predicts the
        seed's final image (a draft) is finished into it (SBPC's draft-guided finals).

        ``layout`` (gated models, objects without boxes): ``"sample"`` draws each image's layout from
        the layout distribution with the image's seed; ``"mean"`` starts from the mean layout."""
        # 0. Defaults and validation.
        height = height or self.default_size
        width = width or self.default_size
        if num_images_per_graph is not None:
            if num_images_per_prompt not in (1, num_images_per_graph):
                raise ValueError(
                    f"`num_images_per_graph` ({num_images_per_graph!r}) is another name of `num_images_per_prompt` "
                    f"({num_images_per_prompt!r}): pass one of them"
                )
            num_images_per_prompt = num_images_per_graph
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        graphs = self.check_inputs(
            graphs, num_inference_steps, guidance_scale, height, width, seeds, num_images_per_prompt, output_type,
            generator, latents, callback_on_step_end_tensor_inputs,
        )
        if layout not in ("sample", "mean"):
            raise ValueError(f"`layout` must be 'sample' or 'mean', got {layout!r}")
        if seeds is not None:
            seeds = [int(s) for s in seeds]
        elif generator is None:
            seeds = self.default_seeds(graphs, num_images_per_prompt)
        if image is not None:
            if latents is not None:
                raise ValueError("pass `image` (image-to-image) or `latents` (initial noise), not both")
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
                raise ValueError(f"`strength` must be in (0, 1], got {strength!r}")
            if int(num_inference_steps * strength) < 1:
                raise ValueError(f"`strength` {strength!r} of {num_inference_steps} steps runs no step")
        device = self._execution_device
        dtype = self.unet.dtype
        self._guidance_scale = guidance_scale
        self._interrupt = False

        # 1. Encode the graphs once; repeat the condition for each image of a graph; draw each image's layout.
        cond = self.encode(graphs)
        rows = torch.arange(len(graphs), device=cond.context.device).repeat_interleave(num_images_per_prompt)
        # Layouts follow the images' seeds; with a caller's generator, seeds derived from the graph ids.
        layout_seeds = seeds if seeds is not None else self.default_seeds(graphs, num_images_per_prompt)
        cond = self.conditioner.draw_layouts(cond.index(rows), graphs, rows.tolist(), layout_seeds, mode=layout)
        batch = cond.context.shape[0]
        if self.do_classifier_free_guidance:
            cond = concat_conditions(cond, self.conditioner.null_condition(batch))
        unet_kwargs = {k: _cast(v, dtype) for k, v in cond.unet_kwargs().items()}
        canvas = cond.canvas(height // self.vae_scale_factor, width // self.vae_scale_factor)
        canvas = canvas.to(device=device, dtype=dtype) if canvas is not None else None

        # 2. Timesteps.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if image is not None:  # diffusers' img2img schedule: skip the first (1 - strength) of the steps
            begin = (num_inference_steps - int(num_inference_steps * strength)) * self.scheduler.order
            timesteps = timesteps[begin:]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(begin)
        self._num_timesteps = len(timesteps)

        # 3. Initial latents: the start image noised, the caller's latents, or fresh noise.
        if image is not None:
            start = self.encode_images(self.start_images(image, batch, height, width))
            noise = self.prepare_noise(batch, seeds, generator, height, width, dtype, device)
            latents = self.scheduler.add_noise(start, noise, timesteps[:1].repeat(batch))
        elif latents is None:
            latents = self.prepare_noise(batch, seeds, generator, height, width, dtype, device)
            latents = latents * self.scheduler.init_noise_sigma
        else:  # caller-made noise (e.g. SBPC drafts: the full-size noise, pooled) [B, C, h, w]
            latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        # Stochastic samplers' per-step noise: the caller's generator, else one generator per seed.
        step_generator = generator if generator is not None else [
            torch.Generator("cpu").manual_seed(int(s) ^ 0x5DEECE66D) for s in seeds
        ]

        # 4. Denoise: cond and uncond go through the UNet in one batched forward (or two, see
        # separate_guidance_passes).
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            model_input = torch.cat([latents, latents]) if self.do_classifier_free_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if canvas is not None:  # layout channels after the latents, as inpainting UNets take their mask
                model_input = torch.cat([model_input, canvas], dim=1)
            noise_pred = self.predict_noise(model_input, t, unet_kwargs)
            if self.do_classifier_free_guidance:
                cond_pred, uncond_pred = noise_pred.chunk(2)
                noise_pred = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
            latents = self.scheduler.step(noise_pred, t, latents, generator=step_generator).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents, "noise_pred": noise_pred}
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = (outputs or {}).pop("latents", latents)

        # 5. Decode and convert.
        # "latent": the denoised latents themselves (pixel-space models: pixels in [-1, 1]), e.g. distillation targets.
        images = latents.cpu() if output_type == "latent" else self.to_output(self.decode(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, seeds
        return SceneGraphPipelineOutput(images=images, seeds=seeds)

    # ------------------------------------------------------------------ assembling from Stable Diffusion
    @classmethod
    def from_stable_diffusion(
        cls,
        path_or_id: str,
        conditioning: str = "tokens",
        graph_dim: int | None = None,
        hidden_dim: int | None = None,
        num_layers: int = 5,
        projection_dim: int | None = None,
        torch_dtype: torch.dtype | None = None,
        layout_channels: int = 0,
        conditioner_hidden_dim: int | None = None,
        **load_kwargs,
    ) -> SceneGraphDiffusionPipeline:
        """A diffusers Stable Diffusion folder or hub id + a fresh graph encoder and conditioner.

        ``layout_channels`` (gated only): extra UNet input channels for the layout canvas, their weights
        starting at zero. Sizes of the new modules: ``graph_dim`` (default: the text encoder's width, at most 512, so a
        small model gets a small encoder), ``hidden_dim`` (the encoder's MLPs; default ``graph_dim``),
        ``conditioner_hidden_dim`` (default ``hidden_dim``), ``num_layers`` graph convolutions.
        With ``conditioning="gated"`` the UNet is rebuilt with GLIGEN gated self-attention; its
        gates start at zero, so until trained it computes exactly what the original UNet did.
        """
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        if conditioning not in ("tokens", "gated"):
            raise ValueError(f"`conditioning` must be 'tokens' or 'gated', got {conditioning!r}")
        if layout_channels and conditioning != "gated":
            raise ValueError(f"`layout_channels` {layout_channels!r} needs `conditioning='gated'`")
        kw = dict(load_kwargs, use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(path_or_id, subfolder="unet", torch_dtype=torch_dtype, **kw)
        if conditioning == "gated":
            unet = add_gated_attention(unet, layout_channels)
        vae = AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", torch_dtype=torch_dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(path_or_id, subfolder="text_encoder", torch_dtype=torch_dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id, subfolder="tokenizer", **load_kwargs)
        scheduler = DDIMScheduler.from_pretrained(path_or_id, subfolder="scheduler", **load_kwargs)
        text_dim = text_encoder.config.hidden_size
        cross_dim = unet.config.cross_attention_dim
        graph_dim = graph_dim or min(512, text_dim)
        hidden_dim = hidden_dim or graph_dim
        graph_encoder = SceneGraphEncoder(
            text_dim=text_dim, graph_dim=graph_dim, hidden_dim=hidden_dim, num_layers=num_layers,
            projection_dim=projection_dim,
        )
        conditioner = SceneGraphConditioner(
            mode=conditioning, text_dim=text_dim, graph_dim=graph_dim, cross_attention_dim=cross_dim,
            hidden_dim=conditioner_hidden_dim or hidden_dim, text_pooling="eos", layout_channels=layout_channels,
        )
        if torch_dtype is not None:
            graph_encoder.to(torch_dtype)
            conditioner.to(torch_dtype)
        for frozen in (vae, text_encoder):
            frozen.requires_grad_(False)
        return cls(
            unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
            graph_encoder=graph_encoder, conditioner=conditioner, vae=vae,
        )


def add_gated_attention(unet, layout_channels: int = 0):
    """Rebuild a UNet2DConditionModel with GLIGEN gated self-attention (and ``layout_channels`` extra
    input channels for the layout canvas), keeping every original weight.

    The new layers (``fuser`` per transformer block, ``position_net``) start with zero gates and the
    new input channels with zero weights, so the output equals the original UNet's until they are trained.
    """
    from diffusers import UNet2DConditionModel

    extra = unet.config.in_channels - unet.config.out_channels
    if unet.config.attention_type == "gated" and extra == layout_channels:
        return unet
    if extra and extra != layout_channels:
        raise ValueError(f"the UNet already takes {extra} layout channels; cannot change them to {layout_channels}")
    # (an edited config dict is ignored by from_config; the overrides must be keywords)
    gated = UNet2DConditionModel.from_config(
        unet.config, attention_type="gated", in_channels=unet.config.out_channels + layout_channels,
    ).to(device=unet.device, dtype=unet.dtype)
    state = unet.state_dict()
    conv = state["conv_in.weight"]
    if conv.shape[1] != gated.conv_in.weight.shape[1]:
        padded = conv.new_zeros(gated.conv_in.weight.shape)
        padded[:, : conv.shape[1]] = conv
        state = {**state, "conv_in.weight": padded}
    missing, unexpected = gated.load_state_dict(state, strict=False)
    new_only = all(".fuser." in k or k.startswith("position_net.") for k in missing)
    if unexpected or not new_only:
        raise RuntimeError(f"gated UNet does not match the base UNet: missing={missing}, unexpected={unexpected}")
    return gated


def widths_heads_do_not_divide(block_widths: Sequence[int], heads: int) -> list[int]:
    """The UNet block widths that ``heads`` attention heads cannot split evenly."""
    return [w for w in block_widths if w % heads]


def set_attention_heads(unet, heads: int):
    """Rebuild a UNet2DConditionModel with its attention split into ``heads`` heads, keeping every weight.

    The projections' shapes do not depend on the head count, so the weights carry over as they are;
    only how each attention layer splits its channels changes, which changes the outputs: fine-tune
    after it. Fewer, wider heads are cheaper on CPU, where small heads leave the softmax over
    tokens x tokens per head as the cost (diffusers names the head count ``attention_head_dim``).
    """
    from diffusers import UNet2DConditionModel

    if heads < 1:
        raise ValueError(f"attention heads must be >= 1, got {heads!r}")
    if unet.config.attention_head_dim == heads:
        return unet
    if misfit := widths_heads_do_not_divide(unet.config.block_out_channels, heads):
        raise ValueError(f"attention heads {heads!r} do not divide the UNet's block width {misfit[0]}")
    reshaped = UNet2DConditionModel.from_config(unet.config, attention_head_dim=heads)
    reshaped.to(device=unet.device, dtype=unet.dtype)
    reshaped.load_state_dict(unet.state_dict(), strict=True)
    return reshaped


def convert_conditioning(pipe: SceneGraphDiffusionPipeline, mode: str, layout_channels: int = 0) -> None:
    """Switch a pipeline to another conditioning mode in place, keeping every trained weight.

    Parts the new mode adds (gated layers, new input channels, grounding and layout heads, caption
    projection) start where they change nothing the UNet sees (zero gates, zero-weight channels), so
    fine-tuning begins from the base model's behaviour. Seed torch first for identical new weights.
    """
    config = {k: v for k, v in pipe.conditioner.config.items() if not k.startswith("_")}
    channels = layout_channels if mode == "gated" else 0
    if config["mode"] == mode and config.get("layout_channels", 0) == channels:
        return
    new_config = {**config, "mode": mode, "layout_channels": channels,
                  "use_caption": bool(config.get("use_caption")) or mode == "caption"}
    conditioner = SceneGraphConditioner(**new_config)
    _, unexpected = conditioner.load_state_dict(pipe.conditioner.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"cannot convert {config['mode']!r} conditioning to {mode!r}: weights {unexpected} have no place")
    conditioner.to(device=pipe.conditioner.device, dtype=pipe.conditioner.dtype)
    pipe.register_modules(conditioner=conditioner.eval())
    if mode == "gated":
        pipe.register_modules(unet=add_gated_attention(pipe.unet, channels))


def add_graph_projection(pipe: SceneGraphDiffusionPipeline, projection_dim: int) -> None:
    """Give the graph encoder a projection of its global vector into an image-embedding space of
    ``projection_dim`` (for the alignment losses), keeping its weights; an existing one must match."""
    current = pipe.graph_encoder.config.projection_dim
    if current == projection_dim:
        return
    if current is not None:
        raise ValueError(f"the graph encoder projects to {current} dimensions, the image encoder's space has "
                         f"{projection_dim}")
    config = {k: v for k, v in pipe.graph_encoder.config.items() if not k.startswith("_")}
    encoder = SceneGraphEncoder(**{**config, "projection_dim": projection_dim})
    encoder.load_state_dict(pipe.graph_encoder.state_dict(), strict=False)
    encoder.to(device=pipe.graph_encoder.device, dtype=pipe.graph_encoder.dtype)
    pipe.register_modules(graph_encoder=encoder.eval())


def realign_parameters(module: torch.nn.Module) -> None:
    """Copy weights that safetensors memory-mapped at arbitrary offsets into fresh allocations.

    CPU kernels pick code paths by memory alignment, so unaligned weights give outputs that differ
    from the saved model's in the last bits; after this, a reloaded model reproduces images exactly.
    Aligned tensors (fresh ones, and those on a GPU) are left as they are.
    """
    with torch.no_grad():
        for sub in module.modules():
            for _, param in sub.named_parameters(recurse=False):
                if _misaligned(param.data):
                    param.data = param.data.clone()
            for name, buf in sub.named_buffers(recurse=False):
                if buf is not None and _misaligned(buf):
                    setattr(sub, name, buf.clone())


def _misaligned(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and tensor.numel() > 0 and tensor.data_ptr() % ALIGNMENT != 0


def write_loader(folder: str | os.PathLike, class_name: str) -> None:
    """Make a saved folder loadable by ``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.

    diffusers imports a custom pipeline from ``{folder}/{module}.py`` when ``model_index.json``'s
    ``_class_name`` is ``[module, class]``; the module only re-exports this package's class.
    """
    index = Path(folder) / "model_index.json"
    config = json.loads(index.read_text())
    config["_class_name"] = [LOADER_MODULE, class_name]
    index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (Path(folder) / f"{LOADER_MODULE}.py").write_text(LOADER_SOURCE)


def pipeline_class_name(model_index: Mapping[str, Any]) -> str:
    """The pipeline class a ``model_index.json`` names (plain, or ``[module, class]`` for a custom pipeline)."""
    name = model_index.get("_class_name")
    if isinstance(name, (list, tuple)) and len(name) == 2:
        name = name[1]
    return name if isinstance(name, str) else ""


def _batch_rows(value, rows: slice, batch: int):
    """``value`` with every tensor of ``batch`` rows (also inside dicts, e.g. GLIGEN's) cut to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _batch_rows(v, rows, batch) for k, v in value.items()}
    return value


def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value
