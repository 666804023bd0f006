"""Training losses (CLIP-guided scene-graph diffusion):

    L = λ·L_recon + (1 − λ)·(β·L_CLIP + (1 − β)·L_MMD)

L_recon is the ε- (or v-) prediction MSE; L_CLIP a symmetric contrastive loss between projected
global graph vectors and CLIP image embeddings of the training images; L_MMD an RBF-kernel
maximum mean discrepancy between the two batches. An optional adversarial discriminator aligns
the embedding distributions too. λ = 1 disables alignment (no image encoder available).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel MSE between UNet output and target (noise or v), [B, C, H, W] each; optional weights [B]."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def contrastive_alignment_loss(graph_emb: torch.Tensor, image_emb: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE: row i of graph_emb [B, P] should match row i of image_emb [B, P]."""
    g = F.normalize(graph_emb.float(), dim=-1)
    i = F.normalize(image_emb.float(), dim=-1)
    logits = g @ i.t() / temperature
    labels = torch.arange(g.shape[0], device=g.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def mmd_loss(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Biased MMD² with a sum of RBF kernels between batches x [B, P] and y [B', P] (L2-normalised first).

    Zero for identical batches; grows as the distributions move apart. Bandwidths are in units of
    squared distance on the unit sphere, so they need no tuning per embedding width.
    """
    x = F.normalize(x.float(), dim=-1)
    y = F.normalize(y.float(), dim=-1)
    both = torch.cat([x, y])
    d2 = torch.cdist(both, both).pow(2)
    kernel = sum(torch.exp(-d2 / (2 * bw)) for bw in bandwidths)
    n = x.shape[0]
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    return (kxx.mean() + kyy.mean() - 2 * kxy.mean()).clamp(min=0.0)


class AlignmentDiscriminator(nn.Module):
    """Tells image embeddings (real) from projected graph embeddings (fake): [B, P] -> logits [B]."""

    def __init__(self, dim: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.LeakyReLU(0.2), nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.net(F.normalize(emb.float(), dim=-1)).squeeze(-1)


def adversarial_losses(
    discriminator: AlignmentDiscriminator, graph_emb: torch.Tensor, image_emb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(discriminator loss, generator loss) with the non-saturating GAN objective.

    The discriminator loss sees detached graph embeddings; the generator loss trains the graph side.
    """
    real = discriminator(image_emb.detach())
    fake = discriminator(graph_emb.detach())
    d_loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros_like(fake)
    )
    # The generator term must not train the discriminator: evaluate it with detached weights.
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    g_logits = torch.func.functional_call(discriminator, frozen, (graph_emb,))
    g_loss = F.binary_cross_entropy_with_logits(g_logits, torch.ones_like(g_logits))
    return d_loss, g_loss


@dataclass
class LossTerms:
    total: torch.Tensor
    recon: torch.Tensor
    clip: torch.Tensor | None = None
    mmd: torch.Tensor | None = None
    adversarial: torch.Tensor | None = None
    layout: torch.Tensor | None = None

    def as_floats(self) -> dict[str, float]:
        out = {}
        for name in ("total", "recon", "clip", "mmd", "adversarial", "layout"):
            value = getattr(self, name)
            if value is not None:
                out[f"loss_{name}"] = float(value.detach())
        return out


def combine_losses(
    recon: torch.Tensor,
    clip: torch.Tensor | None,
    mmd: torch.Tensor | None,
    lambda_recon: float = 1.0,
    beta_clip: float = 0.5,
) -> torch.Tensor:
    """λ·recon + (1 − λ)·(β·clip + (1 − β)·mmd); alignment terms that are None count as 0."""
    if not 0.0 <= lambda_recon <= 1.0 or not 0.0 <= beta_clip <= 1.0:
        raise ValueError(f"lambda_recon and beta_clip must lie in [0, 1], got {lambda_recon!r}, {beta_clip!r}")
    total = lambda_recon * recon
    if lambda_recon < 1.0:
        zero = recon.new_zeros(())
        align = beta_clip * (clip if clip is not None else zero) + (1 - beta_clip) * (mmd if mmd is not None else zero)
        total = total + (1 - lambda_recon) * align
    return total
