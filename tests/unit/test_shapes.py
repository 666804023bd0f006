"""The shapes world: graphs are true of their pictures, class maps match boxes, streams are deterministic."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sgmodel.data.geometry import relation_from_boxes, relation_holds
from sgmodel.graph import graph_to_row, parse_graph
from sgmodel.shapes.world import (
    CLASS_NAMES,
    COLOURS,
    PREDICATES,
    SHAPES,
    SIZES,
    class_id,
    decode_class_map,
    encode_class_map,
    iter_shapes_records,
    object_class,
    random_graph,
    render,
    shapes_sample,
)

SAMPLES = [shapes_sample(seed=11, index=i, size=32) for i in range(150)]


def test_class_names_cover_every_colour_shape_pair():
    assert CLASS_NAMES[0] == "background"
    assert len(CLASS_NAMES) == 1 + len(COLOURS) * len(SHAPES) == 16
    ids = {class_id(c, s) for c in COLOURS for s in SHAPES}
    assert ids == set(range(1, 16))
    assert CLASS_NAMES[class_id("purple", "triangle")] == "purple triangle"
    with pytest.raises(ValueError, match="orange"):
        class_id("orange", "circle")


def test_graph_vocabulary_counts_and_relations_structure():
    counts = set()
    sized = total = 0
    for graph, _ in SAMPLES:
        n = len(graph.objects)
        counts.add(n)
        assert 1 <= n <= 4
        for obj in graph.objects:
            total += 1
            assert obj.label in SHAPES
            assert obj.attributes[-1] in COLOURS
            assert len(obj.attributes) in (1, 2)
            if len(obj.attributes) == 2:
                sized += 1
                assert obj.attributes[0] in SIZES
            x0, y0, x1, y1 = obj.box
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
            assert 0.2 <= x1 - x0 <= 0.5, "objects should span roughly 25-45% of the side"
        # each object after the first has exactly one relation, to another object
        assert len(graph.relations) == n - 1
        assert sorted(r.subject for r in graph.relations) == list(range(1, n))
        for r in graph.relations:
            assert r.subject != r.object
            assert r.predicate in PREDICATES
            # the stored predicate is sg2im's rule on the stored (drawn) boxes
            assert r.predicate == relation_from_boxes(graph.objects[r.subject].box, graph.objects[r.object].box)
    assert counts == {1, 2, 3, 4}
    assert 0.15 < sized / total < 0.45


def test_size_attribute_scales_objects():
    small, large = [], []
    for graph, _ in SAMPLES:
        for obj in graph.objects:
            side = obj.box[2] - obj.box[0]
            if "small" in obj.attributes:
                small.append(side)
            if "large" in obj.attributes:
                large.append(side)
    assert small and large
    assert max(small) < min(large)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return (xs.mean() + 0.5) / mask.shape[1], (ys.mean() + 0.5) / mask.shape[0]


def test_relations_hold_in_the_class_map():
    checked = 0
    for graph, out in SAMPLES:
        for r in graph.relations:
            s_mask = out.instance_map == r.subject + 1
            o_mask = out.instance_map == r.object + 1
            # the instance map agrees with the class map
            assert (out.class_map[s_mask] == object_class(graph.objects[r.subject])).all()
            holds = relation_holds(
                r.predicate,
                graph.objects[r.subject].box,
                graph.objects[r.object].box,
                subject_center=_centroid(s_mask),
                obj_center=_centroid(o_mask),
            )
            assert holds, (graph.id, r)
            checked += 1
    assert checked > 100


def test_class_maps_match_boxes():
    for graph, out in SAMPLES:
        size = out.class_map.shape[0]
        assert out.class_map.shape == (size, size) and out.class_map.dtype == np.uint8
        assert ((out.class_map > 0) == (out.instance_map > 0)).all()
        for idx, obj in enumerate(graph.objects):
            mask = out.instance_map == idx + 1
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = (v * size for v in obj.box)
            # every labelled pixel (its centre) lies inside the box, give or take one pixel
            assert xs.min() + 0.5 >= x0 - 1 and xs.max() + 0.5 <= x1 + 1, (graph.id, idx)
            assert ys.min() + 0.5 >= y0 - 1 and ys.max() + 0.5 <= y1 + 1, (graph.id, idx)
            # and the shape fills a sensible fraction of its box (triangle 1/2, circle pi/4, square ~1)
            fill = mask.sum() / ((x1 - x0) * (y1 - y0))
            low, high = {"triangle": (0.35, 0.65), "circle": (0.65, 0.95), "square": (0.8, 1.15)}[obj.label]
            assert low <= fill <= high, (graph.id, obj.label, fill)
        # nothing outside the objects is labelled
        assert set(np.unique(out.class_map)) <= {0} | {object_class(o) for o in graph.objects}


def test_image_shows_the_object_colours():
    graph, out = SAMPLES[0]
    image = np.asarray(out.image).astype(float)
    for idx, obj in enumerate(graph.objects):
        from sgmodel.shapes.world import COLOUR_RGB

        core = out.instance_map == idx + 1
        mean = image[core].mean(axis=0)
        assert np.abs(mean - np.array(COLOUR_RGB[obj.attributes[-1]])).max() < 40
    background = image[out.class_map == 0].mean(axis=0)
    assert background.min() > 160, "backgrounds are light"


def test_render_is_deterministic_per_seed_and_varies_across_seeds():
    g1, o1 = shapes_sample(5, 3, 32)
    g2, o2 = shapes_sample(5, 3, 32)
    assert g1 == g2
    assert np.array_equal(np.asarray(o1.image), np.asarray(o2.image))
    assert np.array_equal(o1.class_map, o2.class_map)
    g3, o3 = shapes_sample(6, 3, 32)
    assert g3.objects != g1.objects
    graph = random_graph(np.random.default_rng(0), "g")
    a = render(graph, 48, np.random.default_rng(1))
    b = render(graph, 48, np.random.default_rng(1))
    c = render(graph, 48, np.random.default_rng(2))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image)), "jitter and background vary"
    assert a.class_map.shape == (48, 48)


def test_render_rejects_graphs_without_boxes():
    graph = random_graph(np.random.default_rng(0), "g")
    from dataclasses import replace

    unboxed = replace(graph, objects=tuple(replace(o, box=None) for o in graph.objects))
    with pytest.raises(ValueError, match="box"):
        render(unboxed, 32, np.random.default_rng(0))


def test_iter_shapes_records_rows_parse_and_pngs_decode():
    records = list(iter_shapes_records(count=12, seed=3, size=32))
    assert [g.id for g, _ in records] == [f"shapes-3-{i:06d}" for i in range(12)]
    for graph, extra in records:
        parsed = parse_graph(graph_to_row(graph))
        assert parsed == graph
        assert parsed.has_boxes
        with Image.open(io.BytesIO(graph.image)) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
        class_map = decode_class_map(extra["class_map"])
        assert class_map.shape == (32, 32) and class_map.dtype == np.uint8
        assert set(np.unique(class_map)) == {0} | {object_class(o) for o in graph.objects}
    # a stream's prefix does not depend on the count, and reruns are identical
    again = list(iter_shapes_records(count=5, seed=3, size=32))
    assert [(g, e) for g, e in again] == records[:5]
    other = list(iter_shapes_records(count=5, seed=4, size=32))
    assert [g.image for g, _ in other] != [g.image for g, _ in records[:5]]


def test_class_map_png_round_trip_and_errors():
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) % 16
    assert np.array_equal(decode_class_map(encode_class_map(arr)), arr)
    with pytest.raises(ValueError, match="uint8"):
        encode_class_map(arr.astype(np.int32))
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="mode"):
        decode_class_map(buf.getvalue())
    with pytest.raises(ValueError, match="count"):
        list(iter_shapes_records(count=-1, seed=0))
