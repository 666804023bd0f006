"""From encoded scene graphs to what the UNet consumes.

Two modes (config ``mode``):
- ``tokens`` (SGDiff / CLIP-guided SG diffusion): per-object tokens = MLP(label embedding ⊕ graph
  feature), per-triple tokens and the global token, padded with a mask, as cross-attention context;
  an optional caption's token embeddings are appended.
- ``gated`` (GLIGEN): the same context, plus grounding tokens — graph node features ⊕ the object's
  label embedding, with its xyxy box — for diffusers' gated self-attention (``attention_type="gated"``);
  the UNet's ``position_net`` Fourier-embeds the boxes. With ``layout_channels`` K > 0, each object's
  K layout features are also painted into its box on a canvas the UNet takes as K extra input
  channels (GLIGEN's route for spatially aligned conditions). A layout head predicts a box
  distribution from node features (:mod:`sgmodel.layout`) for objects whose graph has no boxes;
  each image draws its layout from it with its own seed.
- ``caption``: the caption's token embeddings alone (a text-prompted baseline on the same text
  encoder: the graph is encoded but not shown to the UNet).
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
from sgmodel.layout import LayoutHead, layouts_for, mean_boxes, paint_canvas
from sgmodel.text import TextEmbedder

MODES = ("tokens", "gated", "caption")


@dataclass
class LayoutInputs:
    """What an image's layout is drawn from, per row, padded to the most objects of a row (Nmax)."""

    params: torch.Tensor
    """Layout head output [B, Nmax, 8] (see :func:`sgmodel.layout.box_distribution`)."""
    given: torch.Tensor
    """Which objects carry their own box [B, Nmax] (bool); padding slots count as given."""
    given_boxes: torch.Tensor
    """Those boxes, xyxy [B, Nmax, 4]."""

    def index(self, rows: torch.Tensor) -> LayoutInputs:
        return LayoutInputs(self.params[rows], self.given[rows], self.given_boxes[rows])


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
    layout_head_output: torch.Tensor | None = None
    """Layout head output [N, 8] for all objects of the batch (for the layout loss)."""
    layout_features: torch.Tensor | None = None
    """Per grounding slot, the features painted on the layout canvas [B, M, K] (gated with K > 0)."""
    layout: LayoutInputs | None = None
    """Gated mode: what the images' layouts are drawn from."""

    def index(self, rows: torch.Tensor) -> Condition:
        """Select / repeat rows (e.g. one row per image when a graph yields several images)."""
        grounding = {k: v[rows] for k, v in self.grounding.items()} if self.grounding else None
        global_ = self.global_[rows] if self.global_ is not None else None
        features = self.layout_features[rows] if self.layout_features is not None else None
        layout = self.layout.index(rows) if self.layout is not None else None
        return replace(self, context=self.context[rows], mask=self.mask[rows], grounding=grounding, global_=global_,
                       layout_features=features, layout=layout)

    def with_boxes(self, boxes: torch.Tensor) -> Condition:
        """The grounding boxes replaced by ``boxes`` [B, >= M, 4] xyxy (e.g. each image's drawn layout)."""
        m = self.grounding["boxes"].shape[1]
        fitted = boxes[:, :m].to(self.grounding["boxes"])
        if fitted.shape[1] < m:
            fitted = torch.cat([fitted, fitted.new_zeros(fitted.shape[0], m - fitted.shape[1], 4)], 1)
        return replace(self, grounding={**self.grounding, "boxes": fitted})

    def canvas(self, height: int, width: int) -> torch.Tensor | None:
        """The layout canvas [B, K, height, width], or None without layout channels."""
        if self.layout_features is None:
            return None
        return paint_canvas(self.grounding["boxes"].to(self.layout_features), self.grounding["masks"],
                            self.layout_features, height, width)

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
    features = None
    if first.layout_features is not None and second.layout_features is not None:
        features = torch.cat([first.layout_features, second.layout_features])
    return Condition(torch.cat([a_ctx, b_ctx]), torch.cat([a_mask, b_mask]), grounding, layout_features=features)


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
        layout_channels: int = 0,
        layout_max_overlap: float = 0.2,
    ) -> None:
        """``layout_channels``: K canvas channels the UNet takes after its latent channels (gated mode);
        ``layout_max_overlap``: the largest IoU a drawn layout may give two objects that no
        inside/surrounding relation nests (see :func:`sgmodel.layout.sample_layout`)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if text_pooling not in ("eos", "mean"):
            raise ValueError(f"text_pooling must be 'eos' or 'mean', got {text_pooling!r}")
        if layout_channels < 0 or (layout_channels and mode != "gated"):
            raise ValueError(f"layout_channels must be >= 0 and needs mode 'gated', got {layout_channels!r} ({mode!r})")
        self.object_tokens = mlp([text_dim + graph_dim, hidden_dim, cross_attention_dim])
        self.triple_tokens = mlp([graph_dim, hidden_dim, cross_attention_dim])
        self.global_token = mlp([graph_dim, hidden_dim, cross_attention_dim])
        self.caption_tokens = nn.Linear(text_dim, cross_attention_dim) if use_caption else None
        # Which kind each token is (global, object, triple, caption): keys carry no position otherwise.
        self.token_type = nn.Parameter(torch.randn(4, cross_attention_dim) * 0.02)
        self.null_tokens = nn.Parameter(torch.randn(num_null_tokens, cross_attention_dim) * 0.02)
        self.grounding = self.layout_head = self.layout_features = None
        if mode == "gated":
            # Grounding tokens and canvas features read the object's label and attribute embeddings
            # directly, beside the graph encoder's output: what to draw in a box must not depend on
            # the encoder keeping attributes (colours) separable after message passing.
            self.grounding = mlp([graph_dim + 2 * text_dim, hidden_dim, cross_attention_dim])
            self.layout_head = LayoutHead(graph_dim, hidden_dim)
            if layout_channels:
                self.layout_features = mlp([graph_dim + 2 * text_dim, hidden_dim, layout_channels])

    def forward(
        self,
        encoding: GraphEncoding,
        label_emb: torch.Tensor,
        boxes: torch.Tensor,
        has_box: torch.Tensor,
        num_graphs: int,
        caption_tokens: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
        attribute_emb: torch.Tensor | None = None,
    ) -> Condition:
        """encoding (N objects, T triples, G graphs), label_emb [N, E], boxes [N, 4], has_box [N] bool,
        attribute_emb [N, E] (mean attribute embedding per object, zeros without; gated mode reads it),
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

        if self.config.mode == "caption":
            return self._caption_only(parts, masks, caption_mask is not None, encoding.global_, g)
        cond = Condition(context=torch.cat(parts, 1), mask=torch.cat(masks, 1), global_=encoding.global_)
        if self.config.mode == "gated":
            if attribute_emb is None:
                attribute_emb = torch.zeros_like(label_emb)
            cond = self._add_grounding(cond, encoding, label_emb, attribute_emb, boxes, has_box, g)
        return cond

    def _caption_only(self, parts: list[torch.Tensor], masks: list[torch.Tensor], has_caption: bool,
                      global_: torch.Tensor, g: int) -> Condition:
        """The caption tokens as the whole context (null tokens where a batch has no caption); the graph
        tokens enter with weight 0 (a gradient for every parameter, see forward)."""
        unused = 0.0 * sum(p.sum() for p in (parts[:-1] if has_caption else parts))
        if has_caption:
            context, mask = parts[-1], masks[-1]
        else:
            context = self.null_tokens.unsqueeze(0).expand(g, -1, -1)
            mask = torch.ones(g, context.shape[1], dtype=torch.bool, device=context.device)
        return Condition(context=context + unused, mask=mask, global_=global_)

    def _add_grounding(self, cond, encoding, label_emb, attribute_emb, boxes, has_box, g) -> Condition:
        # The layout head reads the encoder's output without sending gradients back: its likelihood
        # keeps falling as the spread shrinks, and through a shared encoder it would trade what the
        # object tokens say (colours, shapes) for where objects go.
        params = self.layout_head(encoding.objects.detach())  # [N, 8]
        boxes = boxes.to(params)
        use_boxes = torch.where(has_box.unsqueeze(-1), boxes, mean_boxes(params))  # the mean layout until drawn
        inputs = torch.cat([encoding.objects, label_emb.to(encoding.objects), attribute_emb.to(encoding.objects)], -1)
        m = self.config.max_grounding_tokens
        batch = encoding.object_batch

        def slots(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """[N, F] -> [G, M, F] and mask [G, M]: GLIGEN expects a fixed number of grounding slots."""
            dense, mask = to_dense_batch(values, batch, batch_size=g, max_num_nodes=m)
            pad = m - dense.shape[1]
            if pad > 0:
                dense = torch.cat([dense, dense.new_zeros(g, pad, dense.shape[-1])], 1)
                mask = torch.cat([mask, mask.new_zeros(g, pad)], 1)
            return dense, mask

        feats_dense, ground_mask = slots(self.grounding(inputs))
        grounding = {
            "boxes": slots(use_boxes)[0],
            "masks": ground_mask.to(feats_dense.dtype),
            "positive_embeddings": feats_dense,
        }
        features = slots(self.layout_features(inputs))[0] if self.layout_features is not None else None
        params_dense, real = to_dense_batch(params, batch, batch_size=g)  # [G, Nmax, 8]
        given = to_dense_batch(has_box, batch, batch_size=g)[0] | ~real
        layout = LayoutInputs(params_dense, given, to_dense_batch(boxes, batch, batch_size=g)[0])
        return replace(cond, grounding=grounding, layout_head_output=params, layout_features=features, layout=layout)

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
        features = None
        if self.layout_features is not None:
            features = null.new_zeros(batch_size, self.config.max_grounding_tokens, self.config.layout_channels)
        return Condition(null, mask, grounding, layout_features=features)

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
        def keep_rows(value: torch.Tensor, instead: torch.Tensor) -> torch.Tensor:
            return torch.where(keep.view(-1, *([1] * (value.dim() - 1))), value, instead.to(value.dtype))

        grounding = None
        if cond.grounding is not None:
            grounding = {k: keep_rows(v, null.grounding[k]) for k, v in cond.grounding.items()}
        features = None
        if cond.layout_features is not None:
            features = keep_rows(cond.layout_features, null.layout_features)
        return replace(cond, context=context, mask=new_mask, grounding=grounding, layout_features=features)

    def draw_layouts(self, cond: Condition, graphs: Sequence[SceneGraph], rows: Sequence[int], seeds: Sequence[int],
                     mode: str = "sample") -> Condition:
        """Each image's grounding boxes drawn from the layout distribution with its seed (image b shows
        ``graphs[rows[b]]``); boxes the graphs carry are kept. ``cond`` has one row per image."""
        if cond.layout is None or bool(cond.layout.given.all()):
            return cond
        per_graph = {}
        for b, g in enumerate(rows):
            per_graph.setdefault(g, b)
        first = torch.tensor([per_graph[g] for g in range(len(graphs))])
        lay = cond.layout.index(first.to(cond.layout.params.device))
        boxes = layouts_for(graphs, rows, seeds, lay.params, lay.given, lay.given_boxes, mode=mode,
                            max_overlap=self.config.layout_max_overlap)
        return cond.with_boxes(boxes)


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
        attribute_emb=attr_emb,
    )
