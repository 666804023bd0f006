"""Layouts: where each object of a scene graph goes, as a distribution over boxes, and its spatial canvas.

A graph fixes which objects there are and how they relate ("circle left of square"), not where they
are: many layouts fit. The layout head therefore predicts, per object, a mean box and a spread
(a diagonal Gaussian over centre and size, trained by negative log-likelihood against true boxes).
An image's layout is drawn from it with the image's own seed, so the same (graph, seed) always gets
the same layout and different seeds get different ones (what SBPC chooses between). A drawn layout
must agree with the graph: draws whose boxes break a spatial relation of the graph, or overlap
other boxes more than allowed, are redrawn (a bounded number of times, keeping the best). Centres
are drawn from the Gaussian truncated to where the whole box fits in the image: a clamped draw
would cut the box at the border, a shape no training image has.

The canvas paints each object's layout features into its box: GLIGEN's route for spatially
aligned conditions, concatenated to the UNet's input channels (as inpainting models take their
mask), so the denoiser sees where each object goes from its first layer on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sgmodel.data.geometry import relation_holds
from sgmodel.encoder import mlp
from sgmodel.graph import SceneGraph
from sgmodel.scoring.recall import normalize_predicate

LAYOUT_SEED_SALT = 0x1A40_C0DE
"""Mixed into an image's seed for its layout draws, so they never reuse the image noise's stream."""
MIN_SIDE = 0.02
"""Smallest box side a draw may have (normalised)."""
MAX_LOG_SIGMA, MIN_LOG_SIGMA = 0.0, -6.0
CONTAINMENT = ("inside", "surrounding")


class LayoutHead(nn.Module):
    """sg2im-style box regression from node features, as a distribution: [N, D] -> [N, 8].

    The output holds the mean of (cx, cy, w, h) before a sigmoid (4) and the log standard
    deviations in box units (4); :func:`box_distribution` turns it into boxes.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = mlp([dim, hidden_dim, 8])

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        return self.net(nodes)


def box_distribution(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 8] head output -> (mean, std) of (cx, cy, w, h) in [0, 1] box units, each [..., 4]."""
    mean = params[..., :4].sigmoid()
    std = params[..., 4:].clamp(MIN_LOG_SIGMA, MAX_LOG_SIGMA).exp()
    return mean, std


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1), clipped to the image."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0.0, 1.0)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def mean_boxes(params: torch.Tensor) -> torch.Tensor:
    """The mean layout: [..., 8] head output -> xyxy boxes [..., 4]."""
    return cxcywh_to_xyxy(box_distribution(params)[0])


def layout_nll(params: torch.Tensor, true_boxes: torch.Tensor) -> torch.Tensor:
    """Gaussian negative log-likelihood (constant dropped) of true xyxy boxes [N, 4] under [N, 8], averaged."""
    mean, std = box_distribution(params.float())
    target = xyxy_to_cxcywh(true_boxes.float())
    return (std.log() + 0.5 * ((target - mean) / std) ** 2).mean()


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    ix = (min(a[2], b[2]) - max(a[0], b[0])).clamp(min=0)
    iy = (min(a[3], b[3]) - max(a[1], b[1])).clamp(min=0)
    inter = float(ix * iy)
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def layout_violations(boxes: torch.Tensor, graph: SceneGraph, max_overlap: float) -> int:
    """How many of the graph's spatial relations ``boxes`` [N, 4] break, plus pairs overlapping more
    than ``max_overlap`` (IoU) that no inside/surrounding relation allows."""
    bad = 0
    contained = set()
    for rel in graph.relations:
        predicate = normalize_predicate(rel.predicate)
        if predicate in CONTAINMENT:
            contained.add(frozenset((rel.subject, rel.object)))
        holds = relation_holds(predicate, boxes[rel.subject].tolist(), boxes[rel.object].tolist())
        bad += holds is False
    n = boxes.shape[0]
    for i in range(n):
        for j in range(i + 1, n):
            if frozenset((i, j)) not in contained and _iou(boxes[i], boxes[j]) > max_overlap:
                bad += 1
    return bad


def _inside_normal(mean: torch.Tensor, std: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """Draws of N(mean, std) truncated to [low, high] (inverse CDF, one uniform per value)."""
    a = torch.special.ndtr((low - mean) / std)
    b = torch.special.ndtr((high - mean) / std)
    u = a + (b - a) * torch.rand(mean.shape, generator=generator)
    return (mean + std * torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6))).clamp(low, high)


def sample_layout(params: torch.Tensor, given: torch.Tensor, given_boxes: torch.Tensor, graph: SceneGraph,
                  seed: int, *, mode: str = "sample", tries: int = 32, max_overlap: float = 0.2) -> torch.Tensor:
    """One image's layout, xyxy [N, 4], deterministic in ``seed``.

    params [N, 8]: the head's output for the graph's objects; given [N] bool with given_boxes [N, 4]:
    boxes the graph itself carries, which win over drawn ones. ``mode="sample"`` draws from the
    distribution; ``"mean"`` tries the mean layout first. Draws that break the graph (see
    :func:`layout_violations`) are redrawn up to ``tries`` times; the draw with fewest violations is kept.
    """
    if mode not in ("sample", "mean"):
        raise ValueError(f"layout mode must be 'sample' or 'mean', got {mode!r}")
    params = params.detach().float().cpu()
    given = given.cpu()
    given_boxes = given_boxes.detach().float().cpu()
    if bool(given.all()):
        return given_boxes
    mean, std = box_distribution(params)
    generator = torch.Generator("cpu").manual_seed((int(seed) ^ LAYOUT_SEED_SALT) % 2**63)
    best, best_bad = None, None
    for attempt in range(max(1, tries)):
        if mode == "mean" and attempt == 0:
            w, h = mean[:, 2].clamp(MIN_SIDE, 1.0), mean[:, 3].clamp(MIN_SIDE, 1.0)
            cx, cy = mean[:, 0].clamp(w / 2, 1 - w / 2), mean[:, 1].clamp(h / 2, 1 - h / 2)
        else:
            sides = mean[:, 2:] + std[:, 2:] * torch.randn(mean[:, 2:].shape, generator=generator)
            w, h = sides.clamp(MIN_SIDE, 1.0).unbind(-1)
            cx = _inside_normal(mean[:, 0], std[:, 0], w / 2, 1 - w / 2, generator)
            cy = _inside_normal(mean[:, 1], std[:, 1], h / 2, 1 - h / 2, generator)
        boxes = cxcywh_to_xyxy(torch.stack([cx, cy, w, h], -1))
        boxes = torch.where(given.unsqueeze(-1), given_boxes, boxes)
        bad = layout_violations(boxes, graph, max_overlap)
        if best_bad is None or bad < best_bad:
            best, best_bad = boxes, bad
        if bad == 0:
            break
    return best


def paint_canvas(boxes: torch.Tensor, masks: torch.Tensor, features: torch.Tensor, height: int,
                 width: int) -> torch.Tensor:
    """Each object's features painted over its box: boxes [B, M, 4] xyxy, masks [B, M] (1 = real object),
    features [B, M, K] -> canvas [B, K, height, width] (sums where boxes overlap)."""
    ys = (torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5) / height
    xs = (torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5) / width
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))  # [B, M, 1, 1]
    inside = (xs >= x0) & (xs < x1) & (ys[:, None] >= y0) & (ys[:, None] < y1)  # [B, M, H, W]
    weight = inside.to(features.dtype) * masks.to(features.dtype)[..., None, None]
    return torch.einsum("bmhw,bmk->bkhw", weight, features)


def layouts_for(graphs: Sequence[SceneGraph], rows: Sequence[int], seeds: Sequence[int], params: torch.Tensor,
                given: torch.Tensor, given_boxes: torch.Tensor, *, mode: str, max_overlap: float) -> torch.Tensor:
    """Layouts of a batch of images, xyxy [B, M, 4] (zeros in padding slots).

    Image b shows ``graphs[rows[b]]`` with seed ``seeds[b]``; params [G, M, 8], given [G, M] and
    given_boxes [G, M, 4] are per graph, padded to M slots.
    """
    out = torch.zeros(len(rows), params.shape[1], 4)
    for b, (g, seed) in enumerate(zip(rows, seeds)):
        n = len(graphs[g].objects)
        out[b, :n] = sample_layout(params[g, :n], given[g, :n], given_boxes[g, :n], graphs[g], seed, mode=mode,
                                   max_overlap=max_overlap)
    return out
