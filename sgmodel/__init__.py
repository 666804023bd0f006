"""sgbatch's model library: scene graphs, graph encoder, conditioning, pipeline, losses, recall.

Imports no Ray, so the model can be used and tested on its own.
"""

from sgmodel.graph import (
    SceneGraph,
    SceneGraphError,
    SGObject,
    SGRelation,
    ValidationLimits,
    parse_graph,
    validate_graph,
)

__all__ = [
    "SceneGraph",
    "SceneGraphError",
    "SGObject",
    "SGRelation",
    "ValidationLimits",
    "parse_graph",
    "validate_graph",
]
