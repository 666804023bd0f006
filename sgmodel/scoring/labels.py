"""Label-to-class matching: which segmentation class stands for a graph object ("large red circle").

Explicit mapping, then normalised name, then text-embedding nearest class, else unscorable.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sgmodel.graph import SGObject
from sgmodel.scoring.config import RecallConfig, normalize_name

EmbedFn = Callable[[list[str]], torch.Tensor]
"""Text embedder: N strings -> float tensor [N, D] (any device; compared by cosine similarity)."""

_ALIAS_SPLIT = re.compile(r"[,;|/]")


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
