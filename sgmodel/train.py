"""One training step of a scene-graph diffusion model, usable in-process and under DeepSpeed.

``DiffusionTrainingModule`` is an ``nn.Module`` whose forward takes (graphs, images) and returns
the loss terms, so ``deepspeed.initialize(model=module, …)`` wraps it as is. Only the parts that
train are registered as submodules; frozen parts (VAE, frozen text encoder, frozen UNet, the
image encoder) are held outside the module tree, so ZeRO-3 never partitions them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sgmodel.conditioning import SceneGraphConditioner, encode_graphs
from sgmodel.graph import SceneGraph
from sgmodel.layout import layout_nll
from sgmodel.losses import (
    AlignmentDiscriminator,
    LossTerms,
    adversarial_losses,
    combine_losses,
    contrastive_alignment_loss,
    mmd_loss,
    reconstruction_loss,
)
from sgmodel.optim import EMA, lr_factor, trainable_named
from sgmodel.pipeline import SceneGraphDiffusionPipeline
from sgmodel.text import TextEmbedder

logger = logging.getLogger(__name__)

Trainable = Literal["conditioning", "unet", "lora", "all"]
TRAINABLE = ("conditioning", "unet", "lora", "all")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(kw_only=True)
class TrainConfig:
    trainable: Trainable = "conditioning"
    """conditioning: graph encoder + conditioner (+ gated layers, and the input conv when it reads a layout
    canvas); unet: also the whole UNet; lora: conditioning + LoRA adapters on the UNet's attention; all:
    everything incl. the text encoder (models trained from scratch, like the shapes demo)."""
    cond_dropout: float = 0.1
    """Probability of replacing a sample's condition by the null tokens (classifier-free guidance)."""
    lambda_recon: float = 1.0
    """λ in λ·recon + (1−λ)(β·CLIP + (1−β)·MMD); 1 disables alignment."""
    beta_clip: float = 0.5
    """β: share of the contrastive term within the alignment loss."""
    adversarial_weight: float = 0.0
    """Weight of the GAN-style embedding alignment (0 = off)."""
    layout_weight: float = 1.0
    """Weight of the layout head's box loss (gated conditioning, objects with boxes): the negative
    log-likelihood of the true boxes under the predicted box distribution."""
    lora_rank: int = 8
    """Rank of the LoRA adapters (trainable='lora')."""
    snr_gamma: float | None = None
    """Min-SNR loss weighting γ (None = plain MSE)."""

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"--trainable = {self.trainable!r}: must be one of {TRAINABLE}")
        for name in ("cond_dropout", "lambda_recon", "beta_clip"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} = {value!r}: must lie in [0, 1]")
        for name in ("adversarial_weight", "layout_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)!r}: must be >= 0")
        if self.lora_rank < 1:
            raise ValueError(f"--lora-rank = {self.lora_rank!r}: must be >= 1")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"--snr-gamma = {self.snr_gamma!r}: must be > 0")


def configure_trainable(pipe: SceneGraphDiffusionPipeline, config: TrainConfig) -> None:
    """Set requires_grad on the pipeline's modules for ``config.trainable`` (adds LoRA adapters if asked)."""
    for module in (pipe.unet, pipe.text_encoder, pipe.vae, pipe.graph_encoder, pipe.conditioner):
        if module is not None:
            module.requires_grad_(False)
    pipe.graph_encoder.requires_grad_(True)
    pipe.conditioner.requires_grad_(True)
    if config.trainable in ("unet", "all"):
        pipe.unet.requires_grad_(True)
    if config.trainable == "all":
        pipe.text_encoder.requires_grad_(True)
    if config.trainable == "lora":
        from peft import LoraConfig

        if not getattr(pipe.unet, "peft_config", None):
            pipe.unet.add_adapter(
                LoraConfig(
                    r=config.lora_rank, lora_alpha=config.lora_rank, init_lora_weights="gaussian",
                    target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                )
            )
        for name, param in pipe.unet.named_parameters():
            param.requires_grad_("lora_" in name)
    if pipe.unet.config.attention_type == "gated":  # the GLIGEN layers are part of the conditioning
        layout_input = pipe.unet.config.in_channels > pipe.unet.config.out_channels
        for name, param in pipe.unet.named_parameters():
            if ".fuser." in name or name.startswith("position_net.") or (layout_input and name.startswith("conv_in.")):
                param.requires_grad_(True)  # conv_in reads the layout canvas


def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights and drop them: a plain UNet for generation."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name) if parent_name else unet
            setattr(parent, child, module.get_base_layer())
    if hasattr(unet, "peft_config"):
        del unet.peft_config
    unet._hf_peft_config_loaded = False
    return unet


class _Frozen:
    """Holds modules without registering them (kept out of optimizers, state dicts and ZeRO-3)."""

    def __init__(self, **modules) -> None:
        self.__dict__.update(modules)


class DiffusionTrainingModule(nn.Module):
    """forward(graphs, images) -> LossTerms. Images are [B, 3, H, W] in [-1, 1]."""

    def __init__(
        self,
        pipe: SceneGraphDiffusionPipeline,
        config: TrainConfig,
        image_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        configure_trainable(pipe, config)
        self.config = config
        self.graph_encoder = pipe.graph_encoder
        self.conditioner = pipe.conditioner
        unet_trains = any(p.requires_grad for p in pipe.unet.parameters())
        text_trains = any(p.requires_grad for p in pipe.text_encoder.parameters())
        if unet_trains:
            self.unet = pipe.unet
        if text_trains:
            self.text_encoder = pipe.text_encoder
        if config.adversarial_weight > 0:
            if pipe.graph_encoder.projection is None:
                raise ValueError("adversarial alignment needs a graph encoder built with projection_dim")
            self.discriminator = AlignmentDiscriminator(pipe.graph_encoder.config.projection_dim)
        self.frozen = _Frozen(
            unet=None if unet_trains else pipe.unet,
            text_encoder=None if text_trains else pipe.text_encoder,
            vae=pipe.vae,
            image_encoder=image_encoder,
        )
        if image_encoder is not None:
            image_encoder.requires_grad_(False).eval()
        self.text = TextEmbedder(pipe.text_encoder, pipe.tokenizer, pooling=pipe.conditioner.config.text_pooling)
        self.text_trains = text_trains
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.uses_alignment = config.lambda_recon < 1.0 or config.adversarial_weight > 0
        if self.uses_alignment and image_encoder is None:
            raise ValueError("lambda_recon < 1 or adversarial_weight > 0 needs an image encoder (CLIP vision model)")

    def _unet(self) -> nn.Module:
        return self.unet if hasattr(self, "unet") else self.frozen.unet

    @torch.no_grad()
    def _to_latents(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        vae = self.frozen.vae
        if vae is None:
            return images
        dist = vae.encode(images.to(vae.dtype)).latent_dist
        return dist.sample(generator=generator) * vae.config.scaling_factor

    @torch.no_grad()
    def _image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.frozen.image_encoder
        size = int(getattr(enc.config, "image_size", 224))
        x = F.interpolate((images.float() + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(next(enc.parameters()).dtype)
        return enc(pixel_values=x).image_embeds

    def forward(
        self, graphs: Sequence[SceneGraph], images: torch.Tensor, generator: torch.Generator | None = None
    ) -> LossTerms:
        """graphs (B), images [B, 3, H, W] in [-1, 1] -> LossTerms (scalars)."""
        unet = self._unet()
        device = next(self.graph_encoder.parameters()).device
        images = images.to(device)
        batch = images.shape[0]
        if len(graphs) != batch:
            raise ValueError(f"got {len(graphs)} graphs for {batch} images")

        # 1. Condition, with some rows dropped to the null tokens for classifier-free guidance.
        cond = encode_graphs(graphs, self.text, self.graph_encoder, self.conditioner, train_text_encoder=self.text_trains)
        drop = torch.rand(batch, generator=generator, device="cpu").to(device) < self.config.cond_dropout
        unet_cond = self.conditioner.drop(cond, drop)

        # 2. Noise a random timestep and predict.
        latents = self._to_latents(images, generator)
        noise = torch.randn(latents.shape, generator=generator, device="cpu").to(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (batch,), generator=generator, device="cpu").to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        kwargs = unet_cond.unet_kwargs()
        dtype = unet.dtype
        kwargs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
        if "cross_attention_kwargs" in kwargs:
            kwargs["cross_attention_kwargs"] = {
                "gligen": {k: v.to(dtype) for k, v in kwargs["cross_attention_kwargs"]["gligen"].items()}
            }
        model_input = noisy.to(dtype)
        canvas = unet_cond.canvas(*noisy.shape[-2:])
        if canvas is not None:  # the layout channels, painted from the rows' own (or predicted mean) boxes
            model_input = torch.cat([model_input, canvas.to(dtype)], dim=1)
        pred = unet(model_input, t, **kwargs).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        recon = reconstruction_loss(pred, target, self._snr_weights(t))

        # 3. Alignment of the global graph vector with the image embedding (optional).
        clip = mmd = adv = None
        extra = recon.new_zeros(())
        if self.uses_alignment:
            image_emb = self._image_embeddings(images)
            graph_emb = self.graph_encoder.project(cond.global_)
            clip = contrastive_alignment_loss(graph_emb, image_emb)
            mmd = mmd_loss(graph_emb, image_emb)
            if self.config.adversarial_weight > 0:
                d_loss, g_loss = adversarial_losses(self.discriminator, graph_emb, image_emb)
                adv = d_loss + g_loss
                extra = extra + self.config.adversarial_weight * adv
        total = combine_losses(recon, clip, mmd, self.config.lambda_recon, self.config.beta_clip)

        # 4. Layout head: negative log-likelihood of the boxes the graphs do have (gated conditioning).
        layout = None
        if cond.layout_head_output is not None and self.config.layout_weight > 0:
            boxes = [o.box for g in graphs for o in g.objects]
            has = torch.tensor([b is not None for b in boxes], device=device)
            if bool(has.any()):
                gt = torch.tensor([b if b is not None else (0.0,) * 4 for b in boxes], device=device)
                layout = layout_nll(cond.layout_head_output[has], gt[has])
                extra = extra + self.config.layout_weight * layout
            else:  # still a gradient on every rank (ZeRO / DDP reduce parameter by parameter)
                extra = extra + 0.0 * cond.layout_head_output.sum()
        return LossTerms(total=total + extra, recon=recon, clip=clip, mmd=mmd, adversarial=adv, layout=layout)

    def _snr_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        gamma = self.config.snr_gamma
        if gamma is None:
            return None
        alphas = self.noise_scheduler.alphas_cumprod.to(t.device)[t]
        snr = alphas / (1 - alphas)
        weights = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            weights = weights * snr / (snr + 1)
        return weights


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


NEW_LAYER_PARTS = {
    "gated": (".fuser.", "position_net.", "conv_in.", "conditioner.grounding.", "conditioner.layout_features.",
              "conditioner.layout_head."),
    "caption": ("conditioner.caption_tokens.",),
}
"""Per conditioning mode, the layers converting a tokens model to it adds (name fragments): gated,
GLIGEN's fusers and box embedding, the input conv's canvas channels, the conditioner's grounding,
canvas-feature and layout-head MLPs; caption, the caption projection."""


def conditioning_mode(module: nn.Module) -> str:
    """The mode of the scene-graph conditioner inside ``module`` ("tokens" when it has none)."""
    return next((m.config.mode for m in module.modules() if isinstance(m, SceneGraphConditioner)), "tokens")


def is_new_layer(name: str, mode: str = "gated") -> bool:
    return any(part in f".{name}" for part in NEW_LAYER_PARTS.get(mode, ()))


def parameter_groups(module: nn.Module, lr: float, new_layers_lr: float | None = None) -> list[dict]:
    """AdamW parameter groups: all trainable weights at ``lr``, or, with ``new_layers_lr``, the layers
    the model's conditioning mode adds (see :data:`NEW_LAYER_PARTS`) at that rate.

    Zero-initialised gates and canvas channels (gated), or a fresh caption projection (caption), start
    far from any useful value and would need many steps at a rate the pretrained weights tolerate; a
    rate of their own lets them catch up while the rest of the model keeps what it knew. The input
    conv's latent channels stay fixed then (their gradient is zeroed, and the group has no weight
    decay, which would shrink them), so its higher rate moves only the canvas channels it was given.
    """
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if new_layers_lr is None:
        return [{"params": [p for _, p in named], "lr": lr}]
    mode = conditioning_mode(module)
    new = [(name, p) for name, p in named if is_new_layer(name, mode)]
    if not new:
        raise ValueError(f"--new-layers-lr: the model's {mode!r} conditioning has no gated layers or caption "
                         "projection to train at their own rate")
    for name, p in new:
        if name.endswith("conv_in.weight"):
            latent = p.shape[1] - _canvas_channels(module)
            p.register_hook(partial(_zero_latent_channels, latent=latent))
    new_ids = {id(p) for _, p in new}
    return [{"params": [p for _, p in named if id(p) not in new_ids], "lr": lr},
            {"params": [p for _, p in new], "lr": new_layers_lr, "weight_decay": 0.0}]


def _canvas_channels(module: nn.Module) -> int:
    unet = next(m for m in module.modules() if hasattr(m, "config") and hasattr(m.config, "in_channels"))
    return unet.config.in_channels - unet.config.out_channels


def _zero_latent_channels(grad: torch.Tensor, latent: int) -> torch.Tensor:
    grad = grad.clone()
    grad[:, :latent] = 0
    return grad


@dataclass
class StepLog:
    step: int
    losses: dict[str, float]
    lr: float
    samples_per_s: float


def fit(
    module: DiffusionTrainingModule,
    batches: Iterator[tuple[Sequence[SceneGraph], torch.Tensor]],
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    warmup_steps: int = 0,
    grad_clip: float = 1.0,
    seed: int = 0,
    ema_decay: float | None = None,
    log_every: int = 50,
    on_log: Callable[[StepLog], None] | None = None,
    start_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    ema: EMA | None = None,
    total_steps: int | None = None,
) -> tuple[torch.optim.Optimizer, EMA | None]:
    """A plain in-process training loop (AdamW, cosine decay after warmup, grad clipping, optional EMA).

    Trains steps ``start_step … steps-1``; to continue a run in chunks pass back the returned
    optimizer and EMA and the run's ``total_steps`` (LR schedule).
    """
    params = trainable_parameters(module)
    total = total_steps or steps
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if ema is None and ema_decay:
        ema = EMA(trainable_named(module), ema_decay)

    def lr_at(step: int) -> float:
        return lr * lr_factor(step, warmup_steps, total)

    generator = torch.Generator("cpu").manual_seed(seed + start_step)
    module.train()
    window_start, window_samples = time.perf_counter(), 0
    for step in range(start_step, steps):
        graphs, images = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("peak_lr", group["lr"]) * lr_at(step) / lr
        losses = module(graphs, images, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(trainable_named(module))
        window_samples += len(graphs)
        if on_log and ((step + 1) % log_every == 0 or step + 1 == steps):
            elapsed = time.perf_counter() - window_start
            on_log(StepLog(step + 1, losses.as_floats(), lr_at(step), window_samples / max(elapsed, 1e-9)))
            window_start, window_samples = time.perf_counter(), 0
    module.eval()
    return optimizer, ema
