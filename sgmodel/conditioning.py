"""From encoded scene graphs to what the UNet consumes.

Two modes (config ``mode``):
- ``tokens`` (SGDiff / CLIP-guided SG diffusion): per-object tokens = MLP(label embedding ⊕ graph
  feature), per-triple tokens and the global token, padded with a mask, as cross-attention context;
  an optional caption's token embeddings are appended.
- ``gated`` (GLIGEN): the same context, plus grounding tokens — graph node features ⊕ the object's
  label embedding, with its xyxy box — for diffusers' gated self-attention (``attention_type="gated"``);
  the UNet's ``position_net`` Fourier-embeds the boxes. A layout head regresses boxes from node
  features for objects whose graph has none.
Learned null tokens stand in for the condition in classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch_geometric.utils import scatter, to_dense_batch

from sgmodel.encoder import GraphEncoding, SceneGraphEncoder, mlp
from sgmodel.graph import SceneGraph, to_pyg_batch
from sgmodel.text import TextEmbedder

MODES = ("tokens", "gated")


@dataclass
class Condition:
    """A batch of UNet conditions, one row per graph (or per image after ``repeat``)."""

    context: torch.Tensor
    """Cross-attention context [B, L, C]."""
    mask: torch.Tensor
    """Which context tokens are real [B, L] (bool)."""
    grounding: dict[str, torch.Tensor] | None = None
    """GLIGEN inputs: boxes [B, M, 4], masks [B, M], positive_embeddings [B, M, C]; None in tokens mode."""
    global_: torch.Tensor | None = None
    """Global graph vectors [B, D] (for the alignment losses)."""
    predicted_boxes: torch.Tensor | None = None
    """Layout-head boxes [N, 4] for all objects of the batch (for the layout loss)."""

    def index(self, rows: torch.Tensor) -> Condition:
        """Select / repeat rows (e.g. one row per image when a graph yields several images)."""
        grounding = {k: v[rows] for k, v in self.grounding.items()} if self.grounding else None
        global_ = self.global_[rows] if self.global_ is not None else None
        return replace(self, context=self.context[rows], mask=self.mask[rows], grounding=grounding, global_=global_)

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.context, "encoder_attention_mask": self.mask}
        if self.grounding is not None:
            kwargs["cross_attention_kwargs"] = {"gligen": dict(self.grounding)}
        return kwargs


def _pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, mask
    pad = tokens.new_zeros(tokens.shape[0], extra, tokens.shape[2])
    return torch.cat([tokens, pad], 1), torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)


def concat_conditions(first: Condition, second: Condition) -> Condition:
    """Stack two conditions along the batch (cond + uncond in one UNet forward), padding to one length."""
    length = max(first.context.shape[1], second.context.shape[1])
    a_ctx, a_mask = _pad_tokens(first.context, first.mask, length)
    b_ctx, b_mask = _pad_tokens(second.context, second.mask, length)
    grounding = None
    if first.grounding is not None and second.grounding is not None:
        grounding = {k: torch.cat([first.grounding[k], second.grounding[k]]) for k in first.grounding}
    return Condition(torch.cat([a_ctx, b_ctx]), torch.cat([a_mask, b_mask]), grounding)


class LayoutHead(nn.Module):
    """sg2im-style box regression from node features: [N, D] -> normalised xyxy [N, 4]."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.net = mlp([dim, hidden_dim, 4])

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        cx, cy, w, h = self.net(nodes).sigmoid().unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        return boxes.clamp(0.0, 1.0)


class SceneGraphConditioner(ModelMixin, ConfigMixin):
    """Graph encoding + label embeddings -> cross-attention tokens (and GLIGEN grounding tokens)."""

    @register_to_config
    def __init__(
        self,
        mode: str = "tokens",
        text_dim: int = 768,
        graph_dim: int = 512,
        cross_attention_dim: int = 768,
        hidden_dim: int = 512,
        num_null_tokens: int = 1,
        use_caption: bool = True,
        text_pooling: str = "eos",
        max_grounding_tokens: int = 30,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if text_pooling not in ("eos", "mean"):
            raise ValueError(f"text_pooling must be 'eos' or 'mean', got {text_pooling!r}")
        self.object_tokens = mlp([text_dim + graph_dim, hidden_dim, cross_attention_dim])
        self.triple_tokens = mlp([graph_dim, hidden_dim, cross_attention_dim])
        self.global_token = mlp([graph_dim, hidden_dim, cross_attention_dim])
        self.caption_tokens = nn.Linear(text_dim, cross_attention_dim) if use_caption else None
        # Which kind each token is (global, object, triple, caption): keys carry no position otherwise.
        self.token_type = nn.Parameter(torch.randn(4, cross_attention_dim) * 0.02)
        self.null_tokens = nn.Parameter(torch.randn(num_null_tokens, cross_attention_dim) * 0.02)
        if mode == "gated":
            self.grounding = mlp([graph_dim + text_dim, hidden_dim, cross_attention_dim])
            self.layout_head = LayoutHead(graph_dim, hidden_dim)
        else:
            self.grounding = None
            self.layout_head = None

    def forward(
        self,
        encoding: GraphEncoding,
        label_emb: torch.Tensor,
        boxes: torch.Tensor,
        has_box: torch.Tensor,
        num_graphs: int,
        caption_tokens: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
    ) -> Condition:
        """encoding (N objects, T triples, G graphs), label_emb [N, E], boxes [N, 4], has_box [N] bool,
        caption_tokens [G, Lc, E] with caption_mask [G, Lc] (rows of graphs without caption all False)
        -> Condition with context [G, L, C], L = 1 + max objects + max triples (+ Lc)."""
        g = num_graphs
        types = self.token_type
        glob = (self.global_token(encoding.global_) + types[0]).unsqueeze(1)  # [G, 1, C]
        parts = [glob]
        masks = [torch.ones(g, 1, dtype=torch.bool, device=glob.device)]

        objs = self.object_tokens(torch.cat([label_emb.to(encoding.objects), encoding.objects], -1)) + types[1]
        obj_dense, obj_mask = to_dense_batch(objs, encoding.object_batch, batch_size=g)  # [G, Nmax, C]
        parts.append(obj_dense)
        masks.append(obj_mask)

        # Paths a batch does not need (no relations, no captions) still run on empty inputs and enter
        # the output with weight 0: every parameter then gets a gradient on every rank, which
        # DeepSpeed ZeRO and DDP need (they reduce gradients collectively, parameter by parameter).
        trip = self.triple_tokens(encoding.triples) + types[2]  # [T, C], T may be 0
        if trip.shape[0]:
            trip_dense, trip_mask = to_dense_batch(trip, encoding.triple_batch, batch_size=g)
            parts.append(trip_dense)
            masks.append(trip_mask)
        else:
            parts[0] = parts[0] + 0.0 * trip.sum()

        if self.caption_tokens is not None:
            if caption_tokens is not None and caption_mask is not None:
                parts.append(self.caption_tokens(caption_tokens.to(glob)) + types[3])
                masks.append(caption_mask.bool())
            else:
                unused = self.caption_tokens(glob.new_zeros(0, self.caption_tokens.in_features))
                parts[0] = parts[0] + 0.0 * unused.sum()

        cond = Condition(
            context=torch.cat(parts, 1), mask=torch.cat(masks, 1), global_=encoding.global_, predicted_boxes=None
        )
        if self.config.mode == "gated":
            cond = self._add_grounding(cond, encoding, label_emb, boxes, has_box, g)
        return cond

    def _add_grounding(self, cond, encoding, label_emb, boxes, has_box, g) -> Condition:
        predicted = self.layout_head(encoding.objects)  # [N, 4]
        use_boxes = torch.where(has_box.unsqueeze(-1), boxes.to(predicted), predicted)
        feats = self.grounding(torch.cat([encoding.objects, label_emb.to(encoding.objects)], -1))
        m = self.config.max_grounding_tokens
        feats_dense, ground_mask = to_dense_batch(feats, encoding.object_batch, batch_size=g, max_num_nodes=m)
        boxes_dense, _ = to_dense_batch(use_boxes, encoding.object_batch, batch_size=g, max_num_nodes=m)
        pad = m - feats_dense.shape[1]  # GLIGEN expects a fixed number of grounding slots
        if pad > 0:
            feats_dense = torch.cat([feats_dense, feats_dense.new_zeros(g, pad, feats_dense.shape[-1])], 1)
            boxes_dense = torch.cat([boxes_dense, boxes_dense.new_zeros(g, pad, 4)], 1)
            ground_mask = torch.cat([ground_mask, ground_mask.new_zeros(g, pad)], 1)
        grounding = {
            "boxes": boxes_dense,
            "masks": ground_mask.to(feats_dense.dtype),
            "positive_embeddings": feats_dense,
        }
        return replace(cond, grounding=grounding, predicted_boxes=predicted)

    def null_condition(self, batch_size: int, like: Condition | None = None) -> Condition:
        """The unconditional input: null tokens only (mask hides any padding); grounding all empty."""
        null = self.null_tokens.unsqueeze(0).expand(batch_size, -1, -1)
        mask = torch.ones(batch_size, null.shape[1], dtype=torch.bool, device=null.device)
        grounding = None
        if self.config.mode == "gated":
            m = self.config.max_grounding_tokens
            dim = self.config.cross_attention_dim
            grounding = {
                "boxes": null.new_zeros(batch_size, m, 4),
                "masks": null.new_zeros(batch_size, m),
                "positive_embeddings": null.new_zeros(batch_size, m, dim),
            }
        return Condition(null, mask, grounding)

    def drop(self, cond: Condition, drop_mask: torch.Tensor) -> Condition:
        """Replace the rows where ``drop_mask`` [B] is True by the null condition (CFG training)."""
        if not bool(drop_mask.any()):  # null tokens enter with weight 0 (a gradient on every rank, see forward)
            return replace(cond, context=cond.context + 0.0 * self.null_tokens.sum().to(cond.context.dtype))
        null = self.null_condition(cond.context.shape[0])
        length = max(cond.context.shape[1], null.context.shape[1])
        ctx, mask = _pad_tokens(cond.context, cond.mask, length)
        nctx, nmask = _pad_tokens(null.context.to(ctx.dtype), null.mask, length)
        keep = ~drop_mask
        context = torch.where(keep[:, None, None], ctx, nctx)
        new_mask = torch.where(keep[:, None], mask, nmask)
        grounding = None
        if cond.grounding is not None:
            grounding = {
                k: torch.where(keep.view(-1, *([1] * (v.dim() - 1))), v, null.grounding[k].to(v.dtype))
                for k, v in cond.grounding.items()
            }
        return replace(cond, context=context, mask=new_mask, grounding=grounding)


def encode_graphs(
    graphs: Sequence[SceneGraph],
    text: TextEmbedder,
    encoder: SceneGraphEncoder,
    conditioner: SceneGraphConditioner,
    train_text_encoder: bool = False,
) -> Condition:
    """Scene graphs -> Condition [G, L, C]: text embeddings of the distinct strings, the triple graph
    convolution over a PyG batch (PyG offsets the edge indices), then the conditioner."""
    device = next(encoder.parameters()).device
    dtype = next(encoder.parameters()).dtype
    batch = to_pyg_batch(graphs).to(device)
    labels = [label for per_graph in batch.labels for label in per_graph]
    attributes = [attrs for per_graph in batch.attributes for attrs in per_graph]
    predicates = [p for per_graph in batch.predicates for p in per_graph]
    flat_attrs = [a for attrs in attributes for a in attrs]
    use_cache = not train_text_encoder
    table_strings = list(dict.fromkeys(labels + flat_attrs + predicates))
    table = text.embed(table_strings, use_cache=use_cache).to(device=device, dtype=dtype)  # [S, E]
    index = {s: i for i, s in enumerate(table_strings)}

    def lookup(strings: list[str]) -> torch.Tensor:
        if not strings:
            return table.new_zeros(0, table.shape[1])
        return table[torch.tensor([index[s] for s in strings], device=device)]

    label_emb = lookup(labels)  # [N, E]
    owner = torch.tensor([i for i, attrs in enumerate(attributes) for _ in attrs], device=device, dtype=torch.long)
    attr_emb = scatter(lookup(flat_attrs), owner, dim=0, dim_size=len(labels), reduce="mean")  # [N, E]
    has_attr = torch.tensor([bool(a) for a in attributes], device=device)
    encoding = encoder(
        label_emb, attr_emb, has_attr, lookup(predicates), batch.edge_index, batch.batch, num_graphs=len(graphs)
    )
    caption_tokens = caption_mask = None
    if conditioner.caption_tokens is not None and any(g.caption for g in graphs):
        captions = [g.caption or "" for g in graphs]
        caption_tokens, caption_mask = text.embed_tokens(captions, grad=train_text_encoder)
        present = torch.tensor([bool(g.caption) for g in graphs], device=caption_mask.device)
        caption_mask = caption_mask & present.unsqueeze(1)
        caption_tokens = caption_tokens.to(device=device, dtype=dtype)
        caption_mask = caption_mask.to(device)
    return conditioner(
        encoding,
        label_emb,
        batch.boxes.to(dtype),
        batch.has_box,
        len(graphs),
        caption_tokens=caption_tokens,
        caption_mask=caption_mask,
    )
