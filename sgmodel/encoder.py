"""SceneGraphEncoder: sg2im's triple graph convolution, written as a torch-geometric MessagePassing.

Each triple (subject, predicate, object) goes through one MLP that yields a new predicate vector
and one message for each end; nodes average their incoming messages and update with their own
state (so isolated objects — graphs with no relations — keep their identity instead of
collapsing to a constant, as they would in sg2im's original pooling).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch_geometric.nn import MessagePassing, global_mean_pool


def mlp(dims: list[int], final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or final_activation:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def _remove_generated_source(cls: type) -> None:
    """torch-geometric writes the ``propagate`` it generates for a MessagePassing class to a temporary
    .py file, imports it and leaves the file behind: one per class and process, so every worker would
    add files to the temp dir. Once imported the module runs from memory; the file is not needed."""
    module = sys.modules.get(f"{cls.__module__}_{cls.__name__}_propagate")
    path = getattr(module, "__file__", None)
    if path and os.path.dirname(os.path.abspath(path)) == os.path.abspath(tempfile.gettempdir()):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class TripleConv(MessagePassing):
    """One round of triple convolution over a PyG batch."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__(aggr="mean", flow="source_to_target")
        _remove_generated_source(type(self))
        self.dim = dim
        self.triple_net = mlp([3 * dim, hidden_dim, 2 * hidden_dim + dim])
        self.node_net = mlp([hidden_dim + dim, hidden_dim, dim])
        self.hidden_dim = hidden_dim
        self.norm_nodes = nn.LayerNorm(dim)
        self.norm_triples = nn.LayerNorm(dim)

    def forward(
        self, nodes: torch.Tensor, triples: torch.Tensor, edge_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """nodes [N, D], triples [T, D], edge_index [2, T] (subject -> object) -> ([N, D], [T, D])."""
        subj, obj = edge_index
        h = self.triple_net(torch.cat([nodes[subj], triples, nodes[obj]], dim=-1))  # [T, 2H + D]
        to_subject, new_triples, to_object = h.split([self.hidden_dim, self.dim, self.hidden_dim], dim=-1)
        # Messages travel both ways: s -> o carries the object's message, o -> s the subject's.
        both_ways = torch.cat([edge_index, edge_index.flip(0)], dim=1)  # [2, 2T]
        messages = torch.cat([to_object, to_subject], dim=0)  # [2T, H]
        pooled = self.propagate(both_ways, message_values=messages, size=(nodes.shape[0], nodes.shape[0]))  # [N, H]
        new_nodes = self.node_net(torch.cat([pooled, nodes], dim=-1))
        return self.norm_nodes(nodes + new_nodes), self.norm_triples(triples + new_triples)

    def message(self, message_values: torch.Tensor) -> torch.Tensor:  # [E, H] -> [E, H]
        return message_values


@dataclass
class GraphEncoding:
    objects: torch.Tensor
    """Per-object features [N, D] (all graphs of the batch, concatenated)."""
    triples: torch.Tensor
    """Per-triple features [T, D]."""
    global_: torch.Tensor
    """One vector per graph [G, D]."""
    object_batch: torch.Tensor
    """Graph index of each object [N]."""
    triple_batch: torch.Tensor
    """Graph index of each triple [T]."""


class SceneGraphEncoder(ModelMixin, ConfigMixin):
    """Text-embedded scene graph -> object, triple and global features."""

    @register_to_config
    def __init__(
        self,
        text_dim: int = 768,
        graph_dim: int = 512,
        hidden_dim: int = 512,
        num_layers: int = 5,
        projection_dim: int | None = None,
    ) -> None:
        super().__init__()
        # Object = label embedding fused with the mean attribute embedding (+ a flag: has attributes).
        self.object_in = mlp([2 * text_dim + 1, hidden_dim, graph_dim])
        self.predicate_in = mlp([text_dim, hidden_dim, graph_dim])
        self.layers = nn.ModuleList(TripleConv(graph_dim, hidden_dim) for _ in range(num_layers))
        self.global_out = mlp([graph_dim, hidden_dim, graph_dim])
        # Projection of the global vector into an image-embedding space (CLIP alignment loss).
        self.projection = nn.Linear(graph_dim, projection_dim) if projection_dim else None

    def forward(
        self,
        label_emb: torch.Tensor,
        attribute_emb: torch.Tensor,
        has_attributes: torch.Tensor,
        predicate_emb: torch.Tensor,
        edge_index: torch.Tensor,
        object_batch: torch.Tensor,
        num_graphs: int,
    ) -> GraphEncoding:
        """Shapes: label_emb [N, E], attribute_emb [N, E] (mean over an object's attributes, zeros if none),
        has_attributes [N] bool, predicate_emb [T, E], edge_index [2, T] with batch-global node indices,
        object_batch [N] graph index per object; returns GraphEncoding with D = graph_dim."""
        nodes = self.object_in(torch.cat([label_emb, attribute_emb, has_attributes.unsqueeze(-1).to(label_emb)], -1))
        triples = self.predicate_in(predicate_emb)
        for layer in self.layers:
            nodes, triples = layer(nodes, triples, edge_index)
        global_ = self.global_out(global_mean_pool(nodes, object_batch, size=num_graphs))  # [G, D]
        triple_batch = object_batch[edge_index[0]] if edge_index.numel() else object_batch.new_zeros(0)
        return GraphEncoding(nodes, triples, global_, object_batch, triple_batch)

    def project(self, global_: torch.Tensor) -> torch.Tensor:
        """[G, D] -> [G, projection_dim]: the global graph vector in the image-embedding space."""
        if self.projection is None:
            raise ValueError("SceneGraphEncoder was built with projection_dim=None; set it to use CLIP alignment")
        return self.projection(global_)
