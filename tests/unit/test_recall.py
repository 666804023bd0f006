"""Segmentation recall: arithmetic on hand-built label maps, label matching, and the Segformer wrapper."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from sgmodel.graph import SceneGraph, SGObject, SGRelation
from sgmodel.scoring import (
    RECALL_ROW_SCHEMA,
    LabelMatcher,
    RecallConfig,
    RecallResult,
    SegmentationScorer,
    candidate_phrases,
    normalize_name,
    normalize_predicate,
    score_class_maps,
)

ANIMALS = {0: "background", 1: "cat", 2: "dog", 3: "table"}
COMMITTED_SEGMENTER = Path(__file__).resolve().parents[2] / "models" / "shapes-segmenter"
SHAPES_COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES_KINDS = ("circle", "square", "triangle")
SHAPES_ID2LABEL = dict(enumerate(["background"] + [f"{c} {s}" for c in SHAPES_COLOURS for s in SHAPES_KINDS]))
"""The shapes world's segmenter classes (0 background, then colour + shape), written out by hand."""


def canvas(size: int = 50) -> np.ndarray:
    return np.zeros((size, size), dtype=np.uint8)


def paint(class_map: np.ndarray, class_id: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    class_map[y0:y1, x0:x1] = class_id
    return class_map


def graph(*objects: SGObject, relations: tuple[SGRelation, ...] = (), gid: str = "g") -> SceneGraph:
    return SceneGraph(id=gid, objects=tuple(objects), relations=relations)


def score_one(class_map: np.ndarray, g: SceneGraph, id2label=ANIMALS, **config) -> RecallResult:
    return score_class_maps([class_map], [g], id2label, config=RecallConfig(**config))[0]


# ----------------------------------------------------------------------------- recall arithmetic


def test_min_area_threshold_fraction_and_pixels():
    # 50x50 = 2500 px; 1% = 25 px
    assert RecallConfig(min_area_fraction=0.01).min_area(2500) == 25
    assert RecallConfig(min_area_fraction=0.01).min_area(10_000) == 100  # no float round-up to 101
    assert RecallConfig(min_area_fraction=0.01, min_pixels=40).min_area(2500) == 40
    assert RecallConfig(min_area_fraction=0.0, min_pixels=0).min_area(2500) == 1

    g = graph(SGObject("cat"))
    at_threshold = paint(canvas(), 1, 0, 0, 5, 5)  # 25 px
    below = paint(canvas(), 1, 0, 0, 4, 6)  # 24 px
    assert score_one(at_threshold, g).found == ["cat"]
    assert score_one(below, g).missing == ["cat"] and score_one(below, g).recall == 0.0
    # the pixel limit wins when it is the larger one
    assert score_one(at_threshold, g, min_pixels=26).missing == ["cat"]
    assert score_one(below, g, min_area_fraction=0.0, min_pixels=24).found == ["cat"]


def test_single_object_counts_total_coverage_even_when_fragmented():
    """FG-DM's rule for one object: the class's total area, not its largest piece."""
    m = paint(paint(canvas(), 1, 0, 0, 4, 4), 1, 20, 20, 24, 24)  # two 16 px pieces, 32 px total
    assert score_one(m, graph(SGObject("cat"))).found == ["cat"]
    assert score_one(m, graph(SGObject("cat")), min_pixels=33).missing == ["cat"]


def test_duplicates_need_one_region_each():
    two_cats = graph(SGObject("cat"), SGObject("cat"), SGObject("dog"))
    one_blob = paint(paint(canvas(), 1, 0, 0, 20, 20), 2, 30, 30, 40, 40)
    r = score_one(one_blob, two_cats)
    assert r.found == ["cat", "dog"] and r.missing == ["cat"] and r.recall == pytest.approx(2 / 3)

    two_blobs = paint(paint(one_blob.copy(), 0, 0, 0, 20, 20), 1, 0, 0, 8, 8)
    two_blobs = paint(two_blobs, 1, 12, 0, 20, 8)
    r = score_one(two_blobs, two_cats)
    assert r.found == ["cat", "cat", "dog"] and r.missing == [] and r.recall == 1.0

    # a second piece below the minimum area does not count as a second cat
    small_second = paint(paint(canvas(), 1, 0, 0, 10, 10), 1, 20, 0, 24, 4)  # 100 px + 16 px
    r = score_one(small_second, graph(SGObject("cat"), SGObject("cat")))
    assert (len(r.found), len(r.missing)) == (1, 1)

    # three cats need three regions; objects of different labels matched to one class share its regions
    r = score_one(two_blobs, graph(SGObject("cat"), SGObject("cat"), SGObject("cat")))
    assert (len(r.found), len(r.missing)) == (2, 1)
    r = score_one(two_blobs, graph(SGObject("cat"), SGObject("kitten")), mapping={"kitten": "cat"})
    assert r.found == ["cat", "kitten"]


def test_instances_beyond_the_graph_are_extra_objects():
    """Precision = found / instances seen; every instance the graph does not account for is extra."""
    two_cats = graph(SGObject("cat"), SGObject("cat"))
    three_cats_and_a_table = paint(paint(paint(paint(canvas(), 1, 0, 0, 8, 8), 1, 20, 0, 28, 8),
                                         1, 40, 0, 48, 8), 3, 0, 30, 10, 40)
    r = score_one(three_cats_and_a_table, two_cats)
    assert r.recall == 1.0 and sorted(r.extra_objects) == ["cat", "table"]
    assert r.precision == pytest.approx(2 / 4)
    exact = paint(paint(canvas(), 1, 0, 0, 8, 8), 1, 20, 0, 28, 8)
    assert score_one(exact, two_cats).precision == 1.0 and score_one(exact, two_cats).extra_objects == []
    # pieces below the minimum area are not instances; a lone object found by total area is one instance
    crumbs = paint(paint(canvas(), 1, 0, 0, 4, 4), 1, 20, 20, 24, 24)
    lone = score_one(crumbs, graph(SGObject("cat")))
    assert lone.found == ["cat"] and lone.extra_objects == [] and lone.precision == 1.0
    # nothing seen, nothing extra: precision stays 1 (recall reports what is missing)
    empty = score_one(canvas(), two_cats)
    assert empty.recall == 0.0 and empty.precision == 1.0 and empty.extra_objects == []
    # background is never an instance
    assert score_one(paint(canvas(), 0, 0, 0, 50, 50), graph(SGObject("dog"))).extra_objects == []


def test_connectivity_decides_whether_diagonal_touches_merge():
    m = paint(paint(canvas(), 1, 0, 0, 10, 10), 1, 10, 10, 20, 20)  # corners touch diagonally
    g = graph(SGObject("cat"), SGObject("cat"))
    assert score_one(m, g, connectivity=8).recall == 0.5
    assert score_one(m, g, connectivity=4).recall == 1.0


def test_regions_go_to_boxed_objects_by_nearest_centre_else_largest_first_in_graph_order():
    only_right = paint(canvas(), 1, 35, 20, 45, 30)  # one cat region, on the right
    boxed = graph(
        SGObject("cat", ("left",), (0.0, 0.3, 0.3, 0.7)),
        SGObject("cat", ("right",), (0.7, 0.3, 1.0, 0.7)),
    )
    r = score_one(only_right, boxed)
    assert r.found == ["right cat"] and r.missing == ["left cat"]
    boxless = graph(SGObject("cat", ("left",)), SGObject("cat", ("right",)))
    r = score_one(only_right, boxless)
    assert r.found == ["left cat"] and r.missing == ["right cat"]

    # Without boxes the largest region goes to the first object: here the small one is on the left,
    # so "first cat left of second cat" fails; with boxes each object gets the region under its box.
    m = paint(paint(canvas(), 1, 0, 0, 6, 6), 1, 25, 0, 50, 20)
    rel = (SGRelation(0, "left of", 1),)
    assert score_one(m, graph(*boxless.objects, relations=rel)).relation_results == [False]
    assert score_one(m, graph(*boxed.objects, relations=rel)).relation_results == [True]


def test_unscorable_objects_are_reported_and_left_out_of_the_denominator():
    m = paint(canvas(), 1, 0, 0, 10, 10)
    g = graph(
        SGObject("cat"),
        SGObject("unicorn", ("pink",)),
        SGObject("dog"),
        relations=(SGRelation(0, "left of", 1), SGRelation(0, "left of", 2)),
    )
    r = score_one(m, g)
    assert r.found == ["cat"] and r.missing == ["dog"] and r.unscorable == ["pink unicorn"]
    assert r.recall == 0.5 and r.num_scorable == 2
    assert r.object_classes == ["cat", None, "dog"]
    # one end unscorable, the other missing: nothing checkable
    assert r.relation_results == [None, None] and r.relations_checked == 0 and r.relation_score is None

    nothing = score_one(m, graph(SGObject("unicorn"), SGObject("dragon")))
    assert nothing.recall == 1.0 and nothing.num_scorable == 0  # documented: vacuous recall
    assert nothing.unscorable == ["unicorn", "dragon"] and nothing.relation_score is None


def test_background_is_never_matched():
    m = canvas()  # all background
    r = score_one(m, graph(SGObject("background"), SGObject("cat")))
    assert r.unscorable == ["background"] and r.missing == ["cat"]
    with pytest.raises(ValueError, match="'background'"):
        LabelMatcher(ANIMALS, RecallConfig(mapping={"sky": "background"}))
    with pytest.raises(ValueError, match="0"):
        LabelMatcher(ANIMALS, RecallConfig(mapping={"sky": 0}))


REL_CASES = [
    # predicate, cat rect, dog rect, holds  (cat is the subject, dog the object; 50x50 canvas)
    ("left of", (0, 20, 10, 30), (30, 20, 40, 30), True),
    ("left of", (30, 20, 40, 30), (0, 20, 10, 30), False),
    ("right of", (30, 20, 40, 30), (0, 20, 10, 30), True),
    ("right of", (0, 20, 10, 30), (30, 20, 40, 30), False),
    ("above", (20, 0, 30, 10), (20, 30, 30, 40), True),
    ("above", (20, 30, 30, 40), (20, 0, 30, 10), False),
    ("below", (20, 30, 30, 40), (20, 0, 30, 10), True),
    ("below", (20, 0, 30, 10), (20, 30, 30, 40), False),
    ("inside", (20, 20, 30, 30), (10, 10, 40, 40), True),
    ("inside", (0, 0, 8, 8), (10, 10, 40, 40), False),
    ("surrounding", (10, 10, 40, 40), (20, 20, 30, 30), True),
    ("surrounding", (10, 10, 40, 40), (35, 35, 50, 50), False),
]


@pytest.mark.parametrize("predicate, cat, dog, holds", REL_CASES)
def test_each_spatial_predicate_true_and_false(predicate, cat, dog, holds):
    m = canvas()
    # paint the larger one first so the smaller sits on top (a surrounding region keeps a hole)
    for cid, rect in sorted([(1, cat), (2, dog)], key=lambda c: -(c[1][2] - c[1][0]) * (c[1][3] - c[1][1])):
        paint(m, cid, *rect)
    r = score_one(m, graph(SGObject("cat"), SGObject("dog"), relations=(SGRelation(0, predicate, 1),)))
    assert r.recall == 1.0
    assert r.relation_results == [holds]
    assert (r.relations_checked, r.relations_satisfied) == (1, int(holds))
    assert r.relation_score == float(holds)


def test_directions_use_mask_centroids_not_box_centres():
    """A cat whose box centre is left of the dog but whose pixels lie mostly to its right."""
    m = paint(canvas(), 1, 0, 45, 30, 46)  # a 30 px tail on the left
    paint(m, 1, 36, 0, 46, 10)  # a 100 px body on the right; cat box centre x = 0.46
    paint(m, 2, 24, 20, 28, 30)  # dog box centre x = 0.52
    rels = (SGRelation(0, "left of", 1), SGRelation(0, "right of", 1))
    r = score_one(m, graph(SGObject("cat"), SGObject("dog"), relations=rels))
    assert r.relation_results == [False, True]


def test_relation_score_over_checkable_relations_only():
    m = paint(paint(paint(canvas(), 1, 0, 0, 10, 10), 2, 30, 0, 40, 10), 3, 0, 30, 50, 50)
    rels = (
        SGRelation(0, "left of", 1),  # true
        SGRelation(0, "below", 2),  # false
        SGRelation(1, "Above", 2),  # true (case folded)
        SGRelation(0, "to the left of", 1),  # true (alias)
        SGRelation(0, "chasing", 1),  # not spatial
        SGRelation(2, "under", 0),  # not spatial either: not guessed
    )
    r = score_one(m, graph(SGObject("cat"), SGObject("dog"), SGObject("table"), relations=rels))
    assert r.relation_results == [True, False, True, True, None, None]
    assert (r.relations_checked, r.relations_satisfied) == (4, 3)
    assert r.relation_score == 0.75
    assert normalize_predicate("Left_Of") == "left of"


def test_shapes_world_matches_colour_and_shape():
    m = canvas(32)
    paint(m, 1, 2, 2, 10, 10)  # red circle (class 1), left
    paint(m, 3 * 2 + 1, 20, 20, 30, 30)  # blue circle (class 7), right/bottom
    assert SHAPES_ID2LABEL[1] == "red circle" and SHAPES_ID2LABEL[7] == "blue circle"
    g = graph(
        SGObject("circle", ("large", "red")),
        SGObject("circle", ("blue",)),
        SGObject("square", ("red",)),
        SGObject("circle"),
        relations=(SGRelation(0, "above", 1), SGRelation(1, "left of", 0)),
    )
    r = score_one(m, g, SHAPES_ID2LABEL)
    assert r.object_classes == ["red circle", "blue circle", "red square", None]
    assert r.found == ["large red circle", "blue circle"] and r.missing == ["red square"]
    assert r.unscorable == ["circle"]
    assert r.relation_results == [True, False]

    # a blue circle is not found where only a red circle is
    only_red = paint(canvas(32), 1, 2, 2, 10, 10)
    r = score_one(only_red, graph(SGObject("circle", ("blue",))), SHAPES_ID2LABEL)
    assert r.missing == ["blue circle"] and r.recall == 0.0


def test_shapes_world_ground_truth_maps_score_full_recall():
    """The shapes renderer's own class maps are the best a segmenter could do: every object is found."""
    shapes = pytest.importorskip("sgmodel.shapes.world")
    assert dict(enumerate(shapes.CLASS_NAMES)) == SHAPES_ID2LABEL
    samples = [shapes.shapes_sample(7, i, 32) for i in range(40)]
    results = score_class_maps([out.class_map for _, out in samples], [g for g, _ in samples], SHAPES_ID2LABEL)
    assert sum(len(g.objects) for g, _ in samples) > 60
    for (g, _), r in zip(samples, results):
        assert r.recall == 1.0 and not r.unscorable, (g, r)
        assert r.relations_checked == len(g.relations)


def test_to_row_fits_the_schema():
    m = paint(canvas(), 1, 0, 0, 10, 10)
    rows = [
        score_one(m, graph(SGObject("cat"), SGObject("dog"), relations=(SGRelation(0, "left of", 1),))).to_row(),
        score_one(m, graph(SGObject("cat"), SGObject("dog", (), (0.5, 0.5, 0.9, 0.9)))).to_row(),
    ]
    table = pa.Table.from_pylist(rows, schema=RECALL_ROW_SCHEMA)
    assert table.column("recall").to_pylist() == [0.5, 0.5]
    assert table.column("missing").to_pylist() == [["dog"], ["dog"]]
    assert table.column("relation_score").to_pylist() == [None, None]
    assert set(rows[0]) == set(RECALL_ROW_SCHEMA.names)


def test_config_and_results_pickle_for_ray():
    """Configs travel to Ray actors and results come back: both must pickle."""
    config = RecallConfig(mapping={"kitten": "cat"}, min_pixels=3)
    assert pickle.loads(pickle.dumps(config)) == config
    result = score_one(paint(canvas(), 1, 0, 0, 10, 10), graph(SGObject("cat"), SGObject("dog")))
    assert pickle.loads(pickle.dumps(result)) == result
    mapping = {"kitten": "cat"}
    config = RecallConfig(mapping=mapping)
    mapping["puppy"] = "dog"
    assert dict(config.mapping) == {"kitten": "cat"}  # the config keeps its own copy


def test_score_class_maps_accepts_stacked_and_tensor_maps():
    maps = np.stack([paint(canvas(), 1, 0, 0, 10, 10), canvas()])  # [2, H, W]
    graphs = [graph(SGObject("cat"), gid="a"), graph(SGObject("cat"), gid="b")]
    assert [r.recall for r in score_class_maps(maps, graphs, ANIMALS)] == [1.0, 0.0]
    assert [r.graph_id for r in score_class_maps(torch.from_numpy(maps).long(), graphs, ANIMALS)] == ["a", "b"]


def test_bad_arguments_raise_value_errors_quoting_the_value():
    m = canvas()
    with pytest.raises(ValueError, match="1 class maps for 2 graphs"):
        score_class_maps([m], [graph(SGObject("cat")), graph(SGObject("dog"))], ANIMALS)
    with pytest.raises(ValueError, match=r"float32 \(50, 50\)"):
        score_class_maps([m.astype(np.float32)], [graph(SGObject("cat"))], ANIMALS)
    with pytest.raises(ValueError, match=r"\(2, 50, 50\)"):
        score_class_maps([np.stack([m, m])], [graph(SGObject("cat"))], ANIMALS)
    with pytest.raises(ValueError, match="1.5"):
        RecallConfig(min_area_fraction=1.5)
    with pytest.raises(ValueError, match="-3"):
        RecallConfig(min_pixels=-3)
    with pytest.raises(ValueError, match=r"expected_area_fraction must be a number in \(0, 1\], got 0"):
        RecallConfig(expected_area_fraction=0)
    with pytest.raises(ValueError, match="6"):
        RecallConfig(connectivity=6)
    with pytest.raises(ValueError, match="2.0"):
        RecallConfig(embedding_threshold=2.0)
    with pytest.raises(ValueError, match="'giraffe'"):
        LabelMatcher(ANIMALS, RecallConfig(mapping={"cow": "giraffe"}))
    with pytest.raises(ValueError, match="17"):
        LabelMatcher(ANIMALS, RecallConfig(mapping={"cow": 17}))
    with pytest.raises(ValueError, match="relation"):
        score_one(m, graph(SGObject("cat"), relations=(SGRelation(0, "left of", 3),)))


# ----------------------------------------------------------------------------- label matching

CLASSES = {0: "background", 1: "car", 2: "tree", 3: "person, individual", 4: "Traffic_Light", 5: "boxes"}

_BASIS = torch.eye(8)
VECTORS = {
    "car": _BASIS[0],
    "automobile": 0.9 * _BASIS[0] + 0.4359 * _BASIS[1],  # cos 0.9 with car
    "tree": _BASIS[2],
    "sapling": 0.7 * _BASIS[2] + 0.7141 * _BASIS[3],  # cos 0.7 with tree
    "red automobile": _BASIS[2],  # a misleading embedding: the name rules must win before it is used
    "cars": _BASIS[2],
    "background": _BASIS[4],
    "nothing": _BASIS[4],  # identical to "background", which must still never match
}


class FakeEmbedder:
    """Deterministic embed_fn: a fixed table, unknown phrases on their own axis; records every call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([VECTORS.get(t, _BASIS[7]) for t in texts])


def test_normalisation_and_candidate_phrases():
    assert normalize_name("  Traffic_Light!! ") == "traffic light"
    assert normalize_name("bed ") == "bed"
    assert candidate_phrases(SGObject("circle", ("large", "red"))) == [
        "large red circle",
        "red circle",
        "large circle",
        "circle",
    ]
    assert candidate_phrases(SGObject("Circle", ("red", "red"))) == ["red circle", "circle"]
    assert candidate_phrases(SGObject("circle", ("a", "b", "c")), max_attributes=1) == ["a circle", "circle"]


def test_name_match_normalises_plurals_and_synonyms():
    matcher = LabelMatcher(CLASSES)
    assert matcher.match(SGObject("cars")).class_name == "car"
    assert matcher.match(SGObject("box")).class_name == "boxes"
    assert matcher.match(SGObject("Individual")).class_name == "person, individual"
    assert matcher.match(SGObject("light", ("traffic",))).class_name == "Traffic_Light"
    assert matcher.match(SGObject("light")).class_id is None
    m = matcher.match(SGObject("car", ("red", "shiny")))
    assert (m.class_id, m.phrase, m.source) == (1, "car", "name")


def test_matching_order_mapping_then_name_then_embedding():
    embed = FakeEmbedder()
    matcher = LabelMatcher(
        CLASSES,
        RecallConfig(mapping={"automobile": "tree", "red car": 3, "circle": "car"}, embedding_threshold=0.8),
        embed_fn=embed,
    )
    # explicit mapping beats the embedding (automobile ~ car)
    assert (matcher.match(SGObject("automobile")).class_name, matcher.match(SGObject("automobile")).source) == (
        "tree",
        "mapping",
    )
    # a mapped phrase with attributes beats the name match of the bare label
    m = matcher.match(SGObject("car", ("red",)))
    assert (m.class_id, m.phrase, m.source) == (3, "red car", "mapping")
    # name match beats embedding ("cars" embeds onto "tree" in this table)
    assert (matcher.match(SGObject("cars")).class_name, matcher.match(SGObject("cars")).source) == ("car", "name")
    assert embed.calls == []  # nothing so far needed the embedder

    unmapped = LabelMatcher(CLASSES, RecallConfig(embedding_threshold=0.8), embed_fn=embed)
    m = unmapped.match(SGObject("automobile"))
    assert (m.class_name, m.source) == ("car", "embedding") and m.similarity == pytest.approx(0.9, abs=1e-3)
    # ...and the name rule is tried on every phrase before any embedding: "red automobile" embeds onto tree,
    # but neither phrase names a class, so the embedding of the longest phrase decides
    m = unmapped.match(SGObject("automobile", ("red",)))
    assert (m.class_name, m.phrase, m.source) == ("tree", "red automobile", "embedding")


def test_embedding_threshold_is_respected_and_background_excluded():
    strict = LabelMatcher(CLASSES, RecallConfig(embedding_threshold=0.8), embed_fn=FakeEmbedder())
    assert strict.match(SGObject("sapling")).class_id is None  # cos 0.7 < 0.8
    loose = LabelMatcher(CLASSES, RecallConfig(embedding_threshold=0.69), embed_fn=FakeEmbedder())
    m = loose.match(SGObject("sapling"))
    assert m.class_name == "tree" and m.similarity == pytest.approx(0.7, abs=1e-3)
    # "nothing" embeds exactly onto "background", which is not a candidate class
    assert loose.match(SGObject("nothing")).class_id is None
    # without an embedder the third rule is skipped
    assert LabelMatcher(CLASSES).match(SGObject("automobile")).class_id is None


def test_class_embeddings_once_and_phrase_cache():
    embed = FakeEmbedder()
    matcher = LabelMatcher(CLASSES, RecallConfig(embedding_threshold=0.8), embed_fn=embed)
    objects = [SGObject("automobile"), SGObject("sapling"), SGObject("automobile"), SGObject("car")]
    first = matcher.match_many(objects)
    assert [m.class_name for m in first] == ["car", None, "car", "car"]
    # one call for the class names (aliases, background excluded), one batched call for the phrases
    assert embed.calls == [
        ["car", "tree", "person individual", "person", "individual", "traffic light", "boxes"],
        ["automobile", "sapling"],
    ]
    assert matcher.match_many(objects) == first
    assert len(embed.calls) == 2  # cached per object
    matcher.match(SGObject("sapling", ("young",)))
    assert embed.calls[2:] == [["young sapling"]]  # "sapling" already cached: only the new phrase
    assert matcher.embed_calls == 3


def test_embed_fn_with_a_wrong_shape_is_a_value_error():
    matcher = LabelMatcher(CLASSES, embed_fn=lambda texts: torch.zeros(len(texts) + 1, 4))
    with pytest.raises(ValueError, match="embed_fn"):
        matcher.match(SGObject("automobile"))


def test_score_class_maps_uses_the_embedder():
    m = paint(canvas(), 1, 0, 0, 10, 10)
    r = score_class_maps(
        [m], [graph(SGObject("automobile"), SGObject("sapling"))], CLASSES, embed_fn=FakeEmbedder()
    )[0]
    assert r.found == ["automobile"] and r.unscorable == ["sapling"] and r.recall == 1.0


# ----------------------------------------------------------------------------- Segformer wrapper


@pytest.fixture(scope="module")
def segformer_dir(tmp_path_factory):
    """A tiny seeded Segformer with the shapes classes, saved like a hub checkpoint."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    config = SegformerConfig(
        num_labels=len(SHAPES_ID2LABEL),
        id2label=SHAPES_ID2LABEL,
        label2id={v: k for k, v in SHAPES_ID2LABEL.items()},
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        num_attention_heads=[1, 1, 1, 1],
        decoder_hidden_size=16,
    )
    path = tmp_path_factory.mktemp("segformer")
    SegformerForSemanticSegmentation(config).save_pretrained(path)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def images_of_sizes() -> list:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (24, 40, 3), dtype=np.uint8),
        Image.fromarray(rng.integers(0, 256, (33, 17, 3), dtype=np.uint8)),
        rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
    ]


def load(path, **kwargs) -> SegmentationScorer:
    return SegmentationScorer.from_pretrained(path, load_kwargs={"local_files_only": True}, **kwargs)


def test_segment_returns_maps_at_each_image_size(segformer_dir):
    scorer = load(segformer_dir, batch_size=2)
    assert scorer.id2label == SHAPES_ID2LABEL and not scorer.model.training
    images = images_of_sizes()
    maps = scorer.segment(images)
    assert [m.shape for m in maps] == [(24, 40), (33, 17), (32, 32)]
    assert all(m.dtype == np.uint8 and m.max() < len(SHAPES_ID2LABEL) for m in maps)

    # the same as doing it by hand: processor -> logits -> bilinear upsample -> argmax
    arr = np.asarray(images[1])
    with torch.no_grad():
        logits = scorer.model(**scorer.processor(images=[arr], return_tensors="pt")).logits
    expected = torch.nn.functional.interpolate(logits, size=(33, 17), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(maps[1], expected[0].argmax(0).numpy())

    # batch composition does not change the answer
    one_by_one = load(segformer_dir, batch_size=1).segment(images)
    for a, b in zip(maps, one_by_one):
        np.testing.assert_array_equal(a, b)
    assert scorer.segment([]) == []


def test_segment_without_resizing_groups_images_by_size(segformer_dir):
    scorer = load(segformer_dir, batch_size=4)
    scorer.processor.do_resize = False
    images = [np.full((32, 48, 3), 10, np.uint8), np.full((40, 40, 3), 200, np.uint8), np.full((32, 48, 3), 90, np.uint8)]
    assert [m.shape for m in scorer.segment(images)] == [(32, 48), (40, 40), (32, 48)]
    assert scorer._batches([np.asarray(i) for i in images]) == [[0, 2], [1]]


def test_score_end_to_end_with_a_segmenter_forced_to_one_class(segformer_dir):
    """Bias the classifier so every pixel is "red circle": the answers are then known exactly."""
    scorer = load(segformer_dir, min_area_fraction=0.05)
    assert scorer.config.min_area_fraction == 0.05
    with torch.no_grad():
        scorer.model.decode_head.classifier.weight.zero_()
        scorer.model.decode_head.classifier.bias.zero_()
        scorer.model.decode_head.classifier.bias[1] = 5.0
    graphs = [
        graph(SGObject("circle", ("red",)), SGObject("square", ("green",)), gid="a"),
        graph(SGObject("circle", ("blue",)), SGObject("hexagon"), gid="b"),
    ]
    images = images_of_sizes()[:2]
    results = scorer.score(images, graphs)
    assert [r.graph_id for r in results] == ["a", "b"]
    assert results[0].found == ["red circle"] and results[0].missing == ["green square"] and results[0].recall == 0.5
    assert results[1].missing == ["blue circle"] and results[1].unscorable == ["hexagon"] and results[1].recall == 0.0
    assert all(isinstance(r.to_row()["recall"], float) for r in results)
    # Expected recall: every pixel has p(red circle) = e^5 / (e^5 + 15) and p(other) = 1 / (e^5 + 15), so
    # the red circle's mass is surely enough and a green square's is 1/(e^5+15) / 0.04 of enough.
    other = 1 / (np.exp(5.0) + 15)
    assert results[0].expected_recall == pytest.approx((1.0 + other / 0.04) / 2, rel=1e-4)
    assert results[1].expected_recall == pytest.approx(other / 0.04, rel=1e-4)  # the hexagon is left out
    two = scorer.score(images[:1], [graph(SGObject("square", ("green",)), SGObject("square", ("green",)))])[0]
    assert two.expected_recall == pytest.approx(other / 0.08, rel=1e-4)  # two objects share their class's mass
    nothing = scorer.score(images[:1], [graph(SGObject("hexagon"))])[0]
    assert nothing.recall == nothing.expected_recall == 1.0
    assert score_one(canvas(), graph(SGObject("cat"))).expected_recall is None  # a bare class map has no probabilities


def test_bf16_reads_images_as_fp32_does():
    """The reduced-precision path (GPU scorers) agrees with fp32 on the committed segmenter's renders."""
    from sgmodel.shapes.world import shapes_sample

    samples = [shapes_sample(7, i, 32) for i in range(12)]
    images, graphs = [np.asarray(out.image) for _, out in samples], [g for g, _ in samples]
    fp32 = SegmentationScorer.from_pretrained(COMMITTED_SEGMENTER)
    bf16 = SegmentationScorer.from_pretrained(COMMITTED_SEGMENTER, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    agree = np.mean([np.mean(a == b) for a, b in zip(fp32.segment(images), bf16.segment(images))])
    assert agree > 0.98
    assert [r.recall for r in bf16.score(images, graphs)] == [r.recall for r in fp32.score(images, graphs)]


def test_scorer_rejects_bad_arguments(segformer_dir):
    scorer = load(segformer_dir)
    with pytest.raises(ValueError, match=r"images\[0\].*float64"):
        scorer.segment([np.zeros((8, 8, 3))])
    with pytest.raises(ValueError, match=r"images\[1\].*\(8, 8\)"):
        scorer.segment([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="2 images for 1 graphs"):
        scorer.score(images_of_sizes()[:2], [graph(SGObject("circle"))])
    with pytest.raises(ValueError, match="'int8'"):
        load(segformer_dir, dtype="int8")
    with pytest.raises(ValueError, match="'gpu!'"):
        load(segformer_dir, device="gpu!")
    with pytest.raises(ValueError, match="0"):
        SegmentationScorer(scorer.model, scorer.processor, batch_size=0)
    with pytest.raises(ValueError, match="min_area"):
        SegmentationScorer(scorer.model, scorer.processor, min_area=3)
