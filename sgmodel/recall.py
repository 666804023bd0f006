"""Segmentation-based object recall (FG-DM) and spatial-relation compliance for generated images.

SBPC needs a cheap, automatic judge of whether a generated image contains what its scene graph
asks for. FG-DM segments the image with an off-the-shelf semantic segmenter and counts an object
as present when its class covers enough of the picture; recall = found / scorable objects.
Relation compliance (left of / right of / above / below / inside / surrounding) is our addition,
read off the same masks with the rules in :mod:`sgmodel.data.geometry`.

Three layers, so each can be used and tested alone:

- :class:`LabelMatcher` maps a graph object ("large red circle") to a segmentation class
  (explicit mapping, then normalised name, then text-embedding nearest class, else unscorable);
- :func:`score_class_maps` does the recall and relation arithmetic on integer label maps only;
- :class:`SegmentationScorer` wraps any transformers ``AutoModelForSemanticSegmentation`` +
  ``AutoImageProcessor`` to turn images into label maps and scores them.

No Ray here: the Ray scorer actor holds a :class:`SegmentationScorer`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from sgmodel.data.geometry import SPATIAL_PREDICATES, relation_holds
from sgmodel.graph import SceneGraph, SGObject

EmbedFn = Callable[[list[str]], torch.Tensor]
"""Text embedder: N strings -> float tensor [N, D] (any device; compared by cosine similarity)."""

DEFAULT_IGNORE_CLASSES: tuple[str, ...] = ("background", "unlabeled", "unlabelled", "void")
"""Classes that never stand for a graph object (compared after :func:`normalize_name`)."""

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
    ]
)
"""Arrow types of :meth:`RecallResult.to_row` (for metadata Parquet tables)."""

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True, kw_only=True)
class RecallConfig:
    """How objects are matched to classes and when a class region counts as an object."""

    min_area_fraction: float = 0.01
    """A region must cover at least this fraction of the image (FG-DM's minimum area)."""
    min_pixels: int = 0
    """...and at least this many pixels; the larger of the two limits applies (never below 1)."""
    expected_area_fraction: float = 0.04
    """Expected recall (a soft score for ranking SBPC drafts): an object counts as surely present when
    the segmenter's probability mass of its class adds up to this fraction of the image per object."""
    connectivity: Literal[4, 8] = 8
    """Pixel neighbourhood for connected components (8 merges diagonal touches: fewer false duplicates)."""
    relation_tolerance: float = 0.0
    """Normalised slack for ``inside`` / ``surrounding`` box containment (passed to ``relation_holds``)."""
    mapping: Mapping[str, str | int] = field(default_factory=dict)
    """Explicit graph phrase or label -> class name or class id; beats every other match."""
    embedding_threshold: float = 0.8
    """Least cosine similarity for an embedding match; depends on the embedder (CLIP text: ~0.8)."""
    ignore_classes: tuple[str, ...] = DEFAULT_IGNORE_CLASSES
    """Class names never matched by any rule (explicit mappings to them are rejected)."""
    max_attributes: int = 4
    """Only an object's first attributes are combined into phrases (2**n phrases per object)."""
    cache_size: int = 65_536
    """Most cached object matches / phrase embeddings before the caches are cleared."""

    def __post_init__(self) -> None:
        frac = self.min_area_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 1.0:
            raise ValueError(f"min_area_fraction must be a number in [0, 1], got {frac!r}")
        if isinstance(self.min_pixels, bool) or not isinstance(self.min_pixels, int) or self.min_pixels < 0:
            raise ValueError(f"min_pixels must be an integer >= 0, got {self.min_pixels!r}")
        area = self.expected_area_fraction
        if isinstance(area, bool) or not isinstance(area, (int, float)) or not 0.0 < area <= 1.0:
            raise ValueError(f"expected_area_fraction must be a number in (0, 1], got {area!r}")
        if self.connectivity not in (4, 8) or isinstance(self.connectivity, bool):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity!r}")
        tol = self.relation_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 <= tol < math.inf:
            raise ValueError(f"relation_tolerance must be a finite number >= 0, got {tol!r}")
        thr = self.embedding_threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not -1.0 <= thr <= 1.0:
            raise ValueError(f"embedding_threshold must be a cosine similarity in [-1, 1], got {thr!r}")
        if isinstance(self.max_attributes, bool) or not isinstance(self.max_attributes, int) or self.max_attributes < 0:
            raise ValueError(f"max_attributes must be an integer >= 0, got {self.max_attributes!r}")
        if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int) or self.cache_size < 1:
            raise ValueError(f"cache_size must be an integer >= 1, got {self.cache_size!r}")
        if isinstance(self.ignore_classes, str) or not all(isinstance(c, str) for c in self.ignore_classes):
            raise ValueError(f"ignore_classes must be a sequence of class names, got {self.ignore_classes!r}")
        if not isinstance(self.mapping, Mapping):
            raise ValueError(f"mapping must be a mapping phrase -> class name or id, got {self.mapping!r}")
        for key, value in self.mapping.items():
            if not isinstance(key, str) or not normalize_name(key):
                raise ValueError(f"mapping keys must be non-empty phrases, got {key!r}")
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ValueError(f"mapping[{key!r}] must be a class name or id, got {value!r}")
        # A private copy: the caller's dict cannot change a live config (a plain dict, so the
        # config pickles into Ray actors; MappingProxyType does not pickle).
        object.__setattr__(self, "mapping", dict(self.mapping))
        object.__setattr__(self, "ignore_classes", tuple(self.ignore_classes))

    def min_area(self, num_pixels: int) -> int:
        """Pixel threshold for an image of ``num_pixels`` pixels: max(min_pixels, ceil(fraction * n), 1)."""
        # round() first so 0.01 * 10_000 = 100.00000000000001 does not become 101
        return max(1, self.min_pixels, math.ceil(round(self.min_area_fraction * num_pixels, 6)))


_CONFIG_FIELDS = frozenset(f.name for f in fields(RecallConfig))


def _config_with(config: RecallConfig | None, options: Mapping[str, Any]) -> RecallConfig:
    """``config`` (or the defaults) with flat keyword overrides; unknown names are a ValueError."""
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown recall option(s) {unknown!r}; known: {sorted(_CONFIG_FIELDS)}")
    if config is not None and not isinstance(config, RecallConfig):
        raise ValueError(f"config must be a RecallConfig, got {config!r}")
    return replace(config or RecallConfig(), **options)


# ----------------------------------------------------------------------------- label matching

_NON_WORD = re.compile(r"[^\w\s]|_")
_ALIAS_SPLIT = re.compile(r"[,;|/]")


def normalize_name(text: str) -> str:
    """Lowercase, punctuation and underscores to spaces, whitespace collapsed ("Traffic_Light " -> "traffic light")."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def _name_keys(text: str) -> list[str]:
    """Lookup keys of a name: its normalised form, then singulars of its last word ("cars" -> "car").

    Simple plural rules only: drop a final "s" (not "ss"; words longer than 3 letters) and, for
    "-ses/-xes/-zes/-ches/-shes", also a final "es" ("boxes" -> "box"). Both sides of a match get
    the same keys, so "horse" finds a class named "horses" and vice versa.
    """
    norm = normalize_name(text)
    if not norm:
        return []
    head, _, last = norm.rpartition(" ")
    keys = [norm]
    if len(last) > 3 and last.endswith("s") and not last.endswith("ss"):
        keys.append(f"{head} {last[:-1]}".strip())
    if len(last) > 4 and last.endswith(("ses", "xes", "zes", "ches", "shes")):
        keys.append(f"{head} {last[:-2]}".strip())
    return keys


def object_description(obj: SGObject) -> str:
    """How an object is reported in found / missing / unscorable: attributes then label ("large red circle")."""
    return " ".join((*obj.attributes, obj.label))


def candidate_phrases(obj: SGObject, max_attributes: int = 4) -> list[str]:
    """Normalised phrases to match, longest first, ending with the bare label.

    "large red circle" -> "large red circle", "red circle", "large circle", "circle": among
    phrases of one length, attributes nearer the noun are kept longer. Only the first
    ``max_attributes`` distinct attributes are combined.
    """
    attrs = list(dict.fromkeys(a for a in obj.attributes if normalize_name(a)))[:max_attributes]
    out: list[str] = []
    for size in range(len(attrs), -1, -1):
        for combo in reversed(list(itertools.combinations(attrs, size))):
            phrase = normalize_name(" ".join((*combo, obj.label)))
            if phrase and phrase not in out:
                out.append(phrase)
    return out


@dataclass(frozen=True)
class LabelMatch:
    """The class an object was matched to, and why; ``class_id`` None means unscorable."""

    class_id: int | None
    class_name: str | None = None
    phrase: str | None = None
    """The candidate phrase that matched."""
    source: Literal["mapping", "name", "embedding"] | None = None
    similarity: float | None = None
    """Cosine similarity for embedding matches."""

    @property
    def scorable(self) -> bool:
        return self.class_id is not None


UNSCORABLE = LabelMatch(class_id=None)


class LabelMatcher:
    """Maps graph objects to a segmenter's classes: explicit mapping, then name, then embedding.

    The rules are tried in that order over *all* of an object's candidate phrases (see
    :func:`candidate_phrases`), so an explicit mapping of the bare label beats a name match of
    "red circle", and a name match of any phrase beats every embedding. Within a rule the
    longest phrase wins. Class names may list synonyms separated by ``, ; | /`` (each is a name
    of the class). Ignored classes (``config.ignore_classes``) are never matched.

    Matches are cached per (label, attributes), phrase embeddings per phrase; class-name
    embeddings are computed once, on first need.
    """

    def __init__(
        self,
        id2label: Mapping[int, str],
        config: RecallConfig | None = None,
        embed_fn: EmbedFn | None = None,
    ) -> None:
        if not isinstance(id2label, Mapping) or not id2label:
            raise ValueError(f"id2label must be a non-empty mapping class id -> name, got {id2label!r}")
        if embed_fn is not None and not callable(embed_fn):
            raise ValueError(f"embed_fn must be callable or None, got {embed_fn!r}")
        self.config = config or RecallConfig()
        self.embed_fn = embed_fn
        labels: dict[int, str] = {}
        for key, name in id2label.items():
            try:
                labels[int(key)] = str(name)
            except (TypeError, ValueError):
                raise ValueError(f"id2label keys must be class ids, got {key!r}") from None
        self.id2label: dict[int, str] = dict(sorted(labels.items()))
        ignored = {normalize_name(c) for c in self.config.ignore_classes}
        self.ignored_ids = frozenset(i for i, n in self.id2label.items() if normalize_name(n) in ignored)

        # name -> class id. Exact names first, so a derived singular never shadows a real class name.
        self._aliases: list[tuple[int, str]] = []
        for cid, name in self.id2label.items():
            if cid in self.ignored_ids:
                continue
            parts = [normalize_name(p) for p in _ALIAS_SPLIT.split(name)]
            for alias in dict.fromkeys([normalize_name(name), *parts]):
                if alias:
                    self._aliases.append((cid, alias))
        self._index: dict[str, int] = {}
        for cid, alias in self._aliases:
            self._index.setdefault(alias, cid)
        for cid, alias in self._aliases:
            for key in _name_keys(alias)[1:]:
                self._index.setdefault(key, cid)

        self._mapping: dict[str, int] = {}
        for key, target in self.config.mapping.items():
            self._mapping[normalize_name(key)] = self._resolve_target(key, target)

        self._object_cache: dict[tuple[str, tuple[str, ...]], LabelMatch] = {}
        self._phrase_cache: dict[str, tuple[int, float]] = {}
        self._class_emb: torch.Tensor | None = None  # [A, D] unit rows, one per alias
        self._class_emb_ids: list[int] = []
        self.embed_calls = 0
        """How many times ``embed_fn`` was called (class names count once)."""

    def _resolve_target(self, key: str, target: str | int) -> int:
        if isinstance(target, int):
            if target not in self.id2label:
                raise ValueError(f"mapping[{key!r}] = {target!r} is not a class id of this segmenter")
            cid: int | None = target
        else:
            cid = next((self._index[k] for k in _name_keys(target) if k in self._index), None)
            if cid is None:  # maybe an ignored class, which the index leaves out
                cid = next((i for i, n in self.id2label.items() if normalize_name(n) == normalize_name(target)), None)
            if cid is None:
                raise ValueError(f"mapping[{key!r}] = {target!r} names no class of this segmenter")
        if cid in self.ignored_ids:
            raise ValueError(f"mapping[{key!r}] = {target!r} is an ignored class ({self.id2label[cid]!r})")
        return cid

    def match(self, obj: SGObject) -> LabelMatch:
        """The class of one object (see :meth:`match_many`)."""
        return self.match_many([obj])[0]

    def match_many(self, objects: Sequence[SGObject]) -> list[LabelMatch]:
        """Classes of many objects; the phrases that need embedding go to ``embed_fn`` in one call."""
        out: list[LabelMatch | None] = [None] * len(objects)
        pending: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        where: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for i, obj in enumerate(objects):
            key = (obj.label, tuple(obj.attributes))
            if key in self._object_cache:
                out[i] = self._object_cache[key]
                continue
            if key in where:
                where[key].append(i)
                continue
            phrases = candidate_phrases(obj, self.config.max_attributes)
            found = self._match_by_mapping(phrases) or self._match_by_name(phrases)
            if found is None and self.embed_fn is None:
                found = UNSCORABLE
            if found is not None:
                self._remember(key, found)
                out[i] = found
            else:
                pending[key] = phrases
                where[key] = [i]
        if pending:
            self._embed_phrases(sorted({p for phrases in pending.values() for p in phrases}))
            for key, phrases in pending.items():
                found = self._match_by_embedding(phrases)
                self._remember(key, found)
                for i in where[key]:
                    out[i] = found
        return [m if m is not None else UNSCORABLE for m in out]

    def _remember(self, key: tuple[str, tuple[str, ...]], match: LabelMatch) -> None:
        if len(self._object_cache) >= self.config.cache_size:
            self._object_cache.clear()
        self._object_cache[key] = match

    def _match_by_mapping(self, phrases: list[str]) -> LabelMatch | None:
        for phrase in phrases:
            for key in _name_keys(phrase):
                if key in self._mapping:
                    cid = self._mapping[key]
                    return LabelMatch(cid, self.id2label[cid], phrase, "mapping")
        return None

    def _match_by_name(self, phrases: list[str]) -> LabelMatch | None:
        for phrase in phrases:
            for key in _name_keys(phrase):
                if key in self._index:
                    cid = self._index[key]
                    return LabelMatch(cid, self.id2label[cid], phrase, "name")
        return None

    def _embed(self, texts: list[str]) -> torch.Tensor:
        assert self.embed_fn is not None
        self.embed_calls += 1
        emb = self.embed_fn(texts)
        if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(texts):
            shape = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
            raise ValueError(f"embed_fn must return a tensor [{len(texts)}, D] for {len(texts)} texts, got {shape}")
        return F.normalize(emb.detach().to("cpu", torch.float32), dim=-1)

    def _embed_phrases(self, phrases: list[str]) -> None:
        """Fill the phrase cache with each phrase's nearest class and its similarity."""
        if not self._aliases:
            return
        if self._class_emb is None:
            self._class_emb = self._embed([alias for _, alias in self._aliases])
            self._class_emb_ids = [cid for cid, _ in self._aliases]
        todo = [p for p in phrases if p not in self._phrase_cache]
        if not todo:
            return
        sims = self._embed(todo) @ self._class_emb.T  # [P, A]
        if len(self._phrase_cache) + len(todo) > self.config.cache_size:
            self._phrase_cache.clear()
        best = sims.max(dim=1)  # first maximum: lowest alias index on ties, deterministic
        for phrase, value, idx in zip(todo, best.values.tolist(), best.indices.tolist()):
            self._phrase_cache[phrase] = (self._class_emb_ids[idx], float(value))

    def _match_by_embedding(self, phrases: list[str]) -> LabelMatch:
        for phrase in phrases:
            hit = self._phrase_cache.get(phrase)
            if hit is not None and hit[1] >= self.config.embedding_threshold:
                cid, sim = hit
                return LabelMatch(cid, self.id2label[cid], phrase, "embedding", sim)
        return UNSCORABLE


# ----------------------------------------------------------------------------- recall arithmetic


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


def _score_one(class_map: np.ndarray, graph: SceneGraph, matches: list[LabelMatch], config: RecallConfig) -> RecallResult:
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
        results.append(_score_one(class_map, graph, matches[start:stop], config))
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


# ----------------------------------------------------------------------------- segmentation


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be float32, float16 or bfloat16 (or None to keep the model's), got {dtype!r}")


def _resolve_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None


def _as_rgb(image: Any, index: int) -> np.ndarray:
    """uint8 [H, W, 3] from a PIL image (any mode) or a uint8 array [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"images[{index}] is empty: shape {image.shape}")
        return image
    desc = f"{image.dtype} array {image.shape}" if isinstance(image, np.ndarray) else repr(type(image).__name__)
    raise ValueError(f"images[{index}] must be a PIL image or a uint8 array [H, W, 3], got {desc}")


class SegmentationScorer:
    """A semantic segmenter plus the recall arithmetic: images + graphs in, :class:`RecallResult` out.

    Works with any transformers ``AutoModelForSemanticSegmentation`` whose output has ``logits``
    [B, C, h, w] (Segformer, UperNet, DPT, BEiT, MobileViT, ...) and its image processor. The
    model is put in eval mode on ``device`` / ``dtype`` (fp16/bf16 for GPUs); label matching
    uses ``model.config.id2label``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        config: RecallConfig | None = None,
        embed_fn: EmbedFn | None = None,
        batch_size: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        **options: Any,
    ) -> None:
        """``options`` are :class:`RecallConfig` fields overriding ``config`` (e.g. ``min_area_fraction=0.02``)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch module (a transformers segmentation model), got {model!r}")
        if not callable(processor):
            raise ValueError(f"processor must be a callable image processor, got {processor!r}")
        id2label = getattr(getattr(model, "config", None), "id2label", None)
        if not id2label:
            raise ValueError("model.config.id2label is missing: cannot name the segmentation classes")
        self.config = _config_with(config, options)
        self.device = _resolve_device(device) or next(model.parameters()).device
        self.dtype = _resolve_dtype(dtype) or next(model.parameters()).dtype
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.processor = processor
        self.batch_size = batch_size
        self.matcher = LabelMatcher(id2label, config=self.config, embed_fn=embed_fn)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        *,
        load_kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> SegmentationScorer:
        """Load model + processor from a folder or hub id; ``options`` go to the constructor.

        ``load_kwargs`` go to both ``from_pretrained`` calls (e.g. ``local_files_only=True``,
        ``revision``). Weights load in their stored dtype and are then cast to ``dtype``.
        """
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        kwargs = dict(load_kwargs or {})
        model = AutoModelForSemanticSegmentation.from_pretrained(str(path_or_id), **kwargs)
        processor = AutoImageProcessor.from_pretrained(str(path_or_id), **kwargs)
        return cls(model, processor, device=device, dtype=dtype, **options)

    @property
    def id2label(self) -> dict[int, str]:
        return self.matcher.id2label

    def _batches(self, arrays: list[np.ndarray]) -> list[list[int]]:
        """Index batches; a processor that does not resize cannot stack different sizes, so group by size."""
        order = list(range(len(arrays)))
        if not getattr(self.processor, "do_resize", True):
            order.sort(key=lambda i: arrays[i].shape[:2])
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < self.batch_size and (
                getattr(self.processor, "do_resize", True) or arrays[batches[-1][0]].shape == arrays[i].shape
            ):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    @torch.inference_mode()
    def segment(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Class maps, one per image at that image's own resolution.

        images: PIL images or uint8 arrays [H, W, 3], sizes may differ. Returns integer arrays
        [H, W] (uint8 when the model has <= 256 classes, else int32): the argmax of the logits
        [C, h, w] after bilinear upsampling to [C, H, W] (in float32, one image at a time).
        """
        return self._segment(images)[0]

    @torch.inference_mode()
    def _segment(self, images: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Class maps, and per image each class's mean softmax probability [C] (for expected recall)."""
        arrays = [_as_rgb(im, i) for i, im in enumerate(images)]
        out: list[np.ndarray | None] = [None] * len(arrays)
        areas: list[np.ndarray | None] = [None] * len(arrays)
        num_classes = max(self.id2label) + 1
        map_dtype = np.uint8 if num_classes <= 256 else np.int32
        for batch in self._batches(arrays):
            inputs = self.processor(images=[arrays[i] for i in batch], return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device, dtype=self.dtype)  # [b, 3, S, S']
            logits = self.model(pixel_values=pixel_values).logits  # [b, C, h, w]
            for j, i in enumerate(batch):
                height, width = arrays[i].shape[:2]
                up = F.interpolate(logits[j : j + 1].float(), size=(height, width), mode="bilinear", align_corners=False)
                out[i] = up[0].argmax(dim=0).to("cpu").numpy().astype(map_dtype)  # [H, W]
                areas[i] = up[0].softmax(dim=0).mean(dim=(1, 2)).to("cpu").numpy()  # [C]
        return [m for m in out if m is not None], [a for a in areas if a is not None]

    def score_class_maps(self, class_maps: Sequence[np.ndarray] | np.ndarray, graphs: Sequence[SceneGraph]) -> list[RecallResult]:
        """:func:`score_class_maps` with this scorer's classes, options and caches."""
        return score_class_maps(class_maps, graphs, self.matcher, config=self.config)

    def score(self, images: Sequence[Any], graphs: Sequence[SceneGraph]) -> list[RecallResult]:
        """Segment ``images`` and score each against the graph at the same position."""
        images, graphs = list(images), list(graphs)
        if len(images) != len(graphs):
            raise ValueError(f"got {len(images)} images for {len(graphs)} graphs; need one per graph")
        maps, areas = self._segment(images)
        results = self.score_class_maps(maps, graphs)
        for result, class_areas, graph in zip(results, areas, graphs):
            result.expected_recall = expected_recall(class_areas, graph, self.matcher.match_many(graph.objects),
                                                     self.config)
        return results


__all__ = [
    "DEFAULT_IGNORE_CLASSES",
    "EmbedFn",
    "LabelMatch",
    "LabelMatcher",
    "RECALL_ROW_SCHEMA",
    "RecallConfig",
    "RecallResult",
    "Region",
    "SegmentationScorer",
    "candidate_phrases",
    "expected_recall",
    "normalize_name",
    "normalize_predicate",
    "object_description",
    "score_class_maps",
]
