"""Recall and relation arithmetic on integer class maps (FG-DM's segmentation-based object recall).

An object is present when its class covers at least a minimum area (one object) or has a
connected region of that area of its own (several objects of one class). Relation compliance
(left of / right of / above / below / inside / surrounding) is read off the found regions with
the rules in :mod:`sgmodel.data.geometry`. Pure arithmetic: ground-truth maps give ground-truth scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from sgmodel.data.geometry import SPATIAL_PREDICATES, relation_holds
from sgmodel.graph import SceneGraph, SGObject
from sgmodel.scoring.config import RecallConfig, normalize_name
from sgmodel.scoring.labels import EmbedFn, LabelMatch, LabelMatcher, object_description

PREDICATE_ALIASES: Mapping[str, str] = MappingProxyType(
    {"to the left of": "left of", "to the right of": "right of"}
)
"""Common spellings of spatial predicates (Visual Genome's) folded onto :data:`SPATIAL_PREDICATES`."""

RECALL_ROW_SCHEMA = pa.schema(
    [
        pa.field("recall", pa.float64()),
        pa.field("found", pa.list_(pa.string())),
        pa.field("missing", pa.list_(pa.string())),
        pa.field("unscorable", pa.list_(pa.string())),
        pa.field("relation_score", pa.float64()),
        pa.field("relations_checked", pa.int32()),
        pa.field("relations_satisfied", pa.int32()),
        pa.field("precision", pa.float64()),
        pa.field("extra_objects", pa.list_(pa.string())),
    ]
)
"""Arrow types of :meth:`RecallResult.to_row` (for metadata Parquet tables)."""



@dataclass(frozen=True)
class Region:
    """One object's pixels, summarised in normalised image coordinates (x right, y down, [0, 1])."""

    area: int
    """Pixels."""
    centroid: tuple[float, float]
    """Mean pixel centre (x, y)."""
    box: tuple[float, float, float, float]
    """Pixel-edge bounding box x0, y0, x1, y1: a full-image region is (0, 0, 1, 1)."""


def _region(ys: np.ndarray, xs: np.ndarray, height: int, width: int) -> Region:
    return Region(
        area=int(len(xs)),
        centroid=((float(xs.mean()) + 0.5) / width, (float(ys.mean()) + 0.5) / height),
        box=(float(xs.min()) / width, float(ys.min()) / height, (float(xs.max()) + 1) / width, (float(ys.max()) + 1) / height),
    )


@dataclass
class RecallResult:
    """Compliance of one image with its scene graph.

    ``recall`` is found / scorable objects, and **1.0 when no object is scorable** (nothing the
    segmenter can see is missing — so SBPC's adaptive stop does not sample in vain); check
    ``num_scorable`` before averaging recall over a data set. ``relation_score`` is satisfied /
    checked spatial relations, None when none could be checked (a relation is checkable when
    its predicate is spatial and both its objects were found). Object lists hold descriptions
    ("large red circle"), one entry per object, in graph order.

    ``precision`` is found / instances seen: the segmented map is cut into instances (connected
    regions of at least the minimum area, per class), and every instance beyond the graph's found
    objects of its class is an extra object (``extra_objects`` names its class, once per instance),
    including classes the graph never names. 1.0 when no instance is seen.
    """

    graph_id: str
    recall: float
    found: list[str]
    missing: list[str]
    unscorable: list[str]
    relation_score: float | None
    relations_checked: int
    relations_satisfied: int
    relation_results: list[bool | None] = field(default_factory=list)
    """Per graph relation: True satisfied, False violated, None not checkable."""
    object_classes: list[str | None] = field(default_factory=list)
    """Per graph object: the matched class name, None when unscorable."""
    precision: float = 1.0
    extra_objects: list[str] = field(default_factory=list)
    """Class name of every instance the graph does not account for."""
    expected_recall: float | None = None
    """A soft recall from the segmenter's class probabilities (:func:`expected_recall`), when it
    scored the image itself (not a bare class map): it still moves when a blurry draft shows an
    object too faintly for the argmax, so SBPC ranks drafts of equal recall by it."""

    @property
    def num_scorable(self) -> int:
        return len(self.found) + len(self.missing)

    def to_row(self) -> dict[str, Any]:
        """Plain-Python columns for metadata tables (types in :data:`RECALL_ROW_SCHEMA`)."""
        return {
            "recall": float(self.recall),
            "found": list(self.found),
            "missing": list(self.missing),
            "unscorable": list(self.unscorable),
            "relation_score": self.relation_score,
            "relations_checked": int(self.relations_checked),
            "relations_satisfied": int(self.relations_satisfied),
            "precision": float(self.precision),
            "extra_objects": list(self.extra_objects),
        }


def normalize_predicate(predicate: str) -> str:
    """``"Left_Of"`` -> ``"left of"``; Visual Genome's "to the left of" -> "left of"."""
    norm = normalize_name(predicate)
    return PREDICATE_ALIASES.get(norm, norm)


def _check_class_maps(class_maps: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    maps = []
    for i, m in enumerate(class_maps):
        arr = m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)
        if arr.ndim != 2 or arr.size == 0 or not (np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"class_maps[{i}] must be a non-empty 2-D integer array [H, W], got {arr.dtype} {arr.shape}")
        maps.append(arr)
    return maps


def _assign_regions(
    class_map: np.ndarray, class_id: int, objects: list[tuple[int, SGObject]], config: RecallConfig
) -> dict[int, Region]:
    """Regions of ``class_id`` given to the graph objects matched to it: {object index: region}.

    One object: found when the class covers >= min area in total (FG-DM); its region is the union
    of the class's components of at least min area (all the class's pixels when only fragments
    add up to it). k > 1 objects: each needs its own connected component of >= min area. When
    every one of them has a box, components go to objects by a minimum-cost matching of box
    centres (object box vs component box, Hungarian, so unmatched objects are the ones far from
    any component); otherwise the largest components go to the objects in graph order.
    """
    height, width = class_map.shape
    threshold = config.min_area(height * width)
    mask = class_map == class_id
    total = int(mask.sum())
    if total < threshold:
        return {}
    structure = ndimage.generate_binary_structure(2, 2 if config.connectivity == 8 else 1)
    labels, count = ndimage.label(mask, structure=structure)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    big = [c for c in range(1, count + 1) if areas[c] >= threshold]
    if len(objects) == 1:
        ys, xs = np.nonzero(np.isin(labels, big) if big else mask)
        return {objects[0][0]: _region(ys, xs, height, width)}
    if not big:
        return {}
    slices = ndimage.find_objects(labels)
    regions = []
    for c in sorted(big, key=lambda c: (-int(areas[c]), c)):  # largest first, raster order on ties
        sl = slices[c - 1]
        ys, xs = np.nonzero(labels[sl] == c)
        regions.append(_region(ys + sl[0].start, xs + sl[1].start, height, width))
    if all(obj.box is not None for _, obj in objects):
        centres = np.array([[(o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2] for _, o in objects])
        region_centres = np.array([[(r.box[0] + r.box[2]) / 2, (r.box[1] + r.box[3]) / 2] for r in regions])
        cost = ((centres[:, None, :] - region_centres[None, :, :]) ** 2).sum(-1)  # [k objects, m regions]
        rows, cols = linear_sum_assignment(cost)
        return {objects[r][0]: regions[c] for r, c in zip(rows, cols)}
    return {idx: region for (idx, _), region in zip(objects, regions)}


def count_instances(class_map: np.ndarray, config: RecallConfig, ignored: frozenset[int] = frozenset()) -> dict[int, int]:
    """Instances per class: connected regions of at least the minimum area ({class id: count}, > 0 only)."""
    threshold = config.min_area(class_map.size)
    structure = ndimage.generate_binary_structure(2, 2 if config.connectivity == 8 else 1)
    ids, pixels = np.unique(class_map, return_counts=True)
    out = {}
    for class_id, total in zip(ids.tolist(), pixels.tolist()):
        if class_id in ignored or total < threshold:
            continue
        labels, count = ndimage.label(class_map == class_id, structure=structure)
        big = int((np.bincount(labels.ravel(), minlength=count + 1)[1:] >= threshold).sum())
        if big:
            out[class_id] = big
    return out


def _extras(class_map: np.ndarray, found_classes: list[int], config: RecallConfig, ignored: frozenset[int],
            names: Mapping[int, str]) -> tuple[float, list[str]]:
    """(precision, extra instances' class names): instances beyond the found objects of each class."""
    seen = count_instances(class_map, config, ignored)
    found = {c: found_classes.count(c) for c in set(found_classes)}
    extra: list[str] = []
    for class_id in sorted(set(seen) | set(found)):
        # a lone object found by total area may be in fragments smaller than the minimum: it is one instance
        surplus = max(seen.get(class_id, 0), found.get(class_id, 0)) - found.get(class_id, 0)
        extra += [names.get(class_id, str(class_id))] * surplus
    instances = len(found_classes) + len(extra)
    return (len(found_classes) / instances if instances else 1.0), extra


def _score_one(class_map: np.ndarray, graph: SceneGraph, matches: list[LabelMatch], config: RecallConfig,
               ignored: frozenset[int] = frozenset(), names: Mapping[int, str] | None = None) -> RecallResult:
    groups: dict[int, list[tuple[int, SGObject]]] = {}
    for i, (obj, match) in enumerate(zip(graph.objects, matches)):
        if match.class_id is not None:
            groups.setdefault(match.class_id, []).append((i, obj))
    regions: dict[int, Region] = {}
    for class_id in sorted(groups):
        regions.update(_assign_regions(class_map, class_id, groups[class_id], config))

    found, missing, unscorable = [], [], []
    for i, (obj, match) in enumerate(zip(graph.objects, matches)):
        target = unscorable if match.class_id is None else found if i in regions else missing
        target.append(object_description(obj))
    scorable = len(found) + len(missing)

    results: list[bool | None] = []
    for rel in graph.relations:
        if not (0 <= rel.subject < len(graph.objects) and 0 <= rel.object < len(graph.objects)):
            raise ValueError(f"graph {graph.id!r}: relation {rel!r} indexes outside its {len(graph.objects)} objects")
        predicate = normalize_predicate(rel.predicate)
        subj, obj = regions.get(rel.subject), regions.get(rel.object)
        if predicate not in SPATIAL_PREDICATES or subj is None or obj is None:
            results.append(None)
            continue
        holds = relation_holds(predicate, subj.box, obj.box, subj.centroid, obj.centroid, config.relation_tolerance)
        results.append(bool(holds))
    checked = sum(r is not None for r in results)
    satisfied = sum(r is True for r in results)
    precision, extra = _extras(class_map, [m.class_id for i, m in enumerate(matches) if i in regions], config,
                               ignored, names or {})
    return RecallResult(
        graph_id=graph.id,
        recall=len(found) / scorable if scorable else 1.0,
        found=found,
        missing=missing,
        unscorable=unscorable,
        relation_score=satisfied / checked if checked else None,
        relations_checked=checked,
        relations_satisfied=satisfied,
        relation_results=results,
        object_classes=[m.class_name for m in matches],
        precision=precision,
        extra_objects=extra,
    )


def score_class_maps(
    class_maps: Sequence[np.ndarray] | np.ndarray,
    graphs: Sequence[SceneGraph],
    labels: Mapping[int, str] | LabelMatcher,
    *,
    config: RecallConfig | None = None,
    embed_fn: EmbedFn | None = None,
) -> list[RecallResult]:
    """Recall and relation compliance of label maps against their graphs, one result per pair.

    class_maps: B integer arrays [H, W] (sizes may differ; values are class ids, ids unknown to
    ``labels`` match nothing), or one array [B, H, W]. ``labels`` is the segmenter's
    ``id2label`` or a ready :class:`LabelMatcher` (reuse one across calls to keep its caches;
    it then brings its own matching options and embedder, and ``config`` only sets areas and
    tolerances). Pure arithmetic on the maps: ground-truth maps give ground-truth recall.
    """
    if isinstance(labels, LabelMatcher):
        if embed_fn is not None:
            raise ValueError(f"embed_fn={embed_fn!r} given with a LabelMatcher, which has its own embedder")
        matcher = labels
        config = config or matcher.config
    else:
        config = config or RecallConfig()
        matcher = LabelMatcher(labels, config=config, embed_fn=embed_fn)
    maps = _check_class_maps(class_maps)
    graphs = list(graphs)
    if len(maps) != len(graphs):
        raise ValueError(f"got {len(maps)} class maps for {len(graphs)} graphs; need one per graph")
    for g in graphs:
        if not isinstance(g, SceneGraph):
            raise ValueError(f"graphs must be SceneGraph objects, got {g!r}")
    matches = matcher.match_many([o for g in graphs for o in g.objects])
    results, start = [], 0
    for class_map, graph in zip(maps, graphs):
        stop = start + len(graph.objects)
        results.append(_score_one(class_map, graph, matches[start:stop], config, matcher.ignored_ids,
                                  matcher.id2label))
        start = stop
    return results


def expected_recall(class_areas: np.ndarray, graph: SceneGraph, matches: list[LabelMatch],
                    config: RecallConfig) -> float:
    """Soft recall of one image: per scorable object, min(1, its class's probability mass as a
    fraction of the image / (objects of that class x ``expected_area_fraction``)), averaged.

    class_areas: [C] mean softmax probability of each class over the image. 1.0 when nothing is
    scorable, like ``recall``.
    """
    ids = [m.class_id for m in matches if m.class_id is not None]
    if not ids:
        return 1.0
    per_object = [min(1.0, float(class_areas[c]) / (ids.count(c) * config.expected_area_fraction)) for c in ids]
    return sum(per_object) / len(per_object)
