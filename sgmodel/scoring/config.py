"""How graph objects are matched to segmentation classes and when a region counts as an object."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

DEFAULT_IGNORE_CLASSES: tuple[str, ...] = ("background", "unlabeled", "unlabelled", "void")
"""Classes that never stand for a graph object (compared after :func:`normalize_name`)."""

_NON_WORD = re.compile(r"[^\w\s]|_")


def normalize_name(text: str) -> str:
    """Lowercase, punctuation and underscores to spaces, whitespace collapsed ("Traffic_Light " -> "traffic light")."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


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


def config_with(config: RecallConfig | None, options: Mapping[str, Any]) -> RecallConfig:
    """``config`` (or the defaults) with flat keyword overrides; unknown names are a ValueError."""
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown recall option(s) {unknown!r}; known: {sorted(_CONFIG_FIELDS)}")
    if config is not None and not isinstance(config, RecallConfig):
        raise ValueError(f"config must be a RecallConfig, got {config!r}")
    return replace(config or RecallConfig(), **options)


def read_label_map(text: str) -> dict[str, str | int]:
    """A label-map file's text (YAML or JSON) as :attr:`RecallConfig.mapping`: graph label or phrase -> the
    segmenter's class name or id. Raises ValueError naming the problem (with line and column for bad YAML)::

        # ADE20K (150 classes): graph labels -> ADE20K class names
        man: person
        woman: person
        sofa: sofa
        tv: crt screen
    """
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"{where}{' '.join(str(err.problem or 'invalid YAML').split())}") from None
    except yaml.YAMLError as err:
        raise ValueError(" ".join(str(err).split())) from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"expected a mapping of graph label: segmenter class, got {type(data).__name__}")
    mapping = {str(k) if isinstance(k, (int, float)) and not isinstance(k, bool) else k: v for k, v in data.items()}
    return dict(RecallConfig(mapping=mapping).mapping)  # its checks: non-empty phrases, class names or ids
