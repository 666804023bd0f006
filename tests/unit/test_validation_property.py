"""Property: whatever malformed row reaches validation, the only exception is SceneGraphError.

And what validation accepts is writable to Arrow and reads back to the same graph (boxes to
float32 precision); the input is never modified. The sg2im importer's row conversion obeys the same rule for any JSON value.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgmodel.data.sg2im import iter_sg2im, sg2im_to_row
from sgmodel.graph import (
    SceneGraph,
    SceneGraphError,
    ValidationLimits,
    graphs_to_table,
    parse_graph,
    table_to_graphs,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = ValidationLimits(max_text_chars=12, max_objects=5, max_relations=6)

# Hypothesis' text() leaves out surrogates; JSON "\ud800" escapes produce them, so add them back.
text = st.text(st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "\x00", " "])), max_size=16)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
    st.binary(max_size=8),
)
anything = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
    ),
    max_leaves=20,
)
# Valid rows, then one to three values anywhere inside replaced by garbage: examples get past the
# first checks and reach every deep one (a purely random row almost always fails at the id).
valid_label = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Zs")), min_size=1, max_size=12)
valid_box = st.lists(st.floats(min_value=0, max_value=1), min_size=2, max_size=2).flatmap(
    lambda xs: st.lists(st.floats(min_value=0, max_value=1), min_size=2, max_size=2).map(
        lambda ys: [min(xs), min(ys), max(xs), max(ys)]
    )
)
valid_object = st.fixed_dictionaries(
    {"label": valid_label, "attributes": st.lists(valid_label, max_size=2), "box": st.one_of(st.none(), valid_box)}
)


@st.composite
def valid_row(draw) -> dict:
    objects = draw(st.lists(valid_object, min_size=1, max_size=LIMITS.max_objects))
    n = len(objects)
    pairs = [(s, o) for s in range(n) for o in range(n) if s != o]
    chosen = draw(st.lists(st.sampled_from(pairs), max_size=LIMITS.max_relations)) if pairs else []
    return {
        "id": draw(st.one_of(valid_label, st.integers(0, 10**20))),
        "objects": objects,
        "relations": [{"subject": s, "predicate": draw(valid_label), "object": o} for s, o in chosen],
        "caption": draw(st.one_of(st.none(), valid_label)),
        "image": draw(st.one_of(st.none(), st.binary(max_size=8))),
        "seed": draw(st.one_of(st.none(), st.integers(0, 2**63 - 1))),
    }


def _paths(value, prefix=()):
    """Every location inside a row (dict keys and list positions), the row's own fields included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from _paths(child, (*prefix, i))


garbage = st.one_of(
    st.sampled_from(["", " ", "\ud800", "x" * 13, -1, 5, 99, True, None, float("nan"), 1.5, 10**400, 2**63]),
    anything, text, st.just(10**400), st.floats(), st.integers(-3, 70), st.just([]), st.just({}),
    st.lists(valid_object, min_size=LIMITS.max_objects + 1, max_size=LIMITS.max_objects + 2),
)


@st.composite
def near_row(draw) -> dict:
    row = draw(valid_row())
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(row) if p]
        path = draw(st.sampled_from(paths))
        parent = row
        for step in path[:-1]:
            parent = parent[step]
        if draw(st.booleans()) and isinstance(parent, dict) and len(path) > 0:
            parent.pop(path[-1])  # a missing field
        else:
            parent[path[-1]] = draw(garbage)
    return row


def _snapshot(value) -> str:
    return repr(value)  # NaN-safe structural snapshot


@SETTINGS
@given(st.one_of(near_row(), valid_row()))
def test_validation_raises_only_scene_graph_error(candidate):
    before = _snapshot(candidate)
    try:
        graph = parse_graph(candidate, LIMITS)
    except SceneGraphError as err:
        assert err.code and err.field and str(err).startswith("graph ")
        str(err).encode("utf-8")  # the reason is always writable to the error table
    else:
        assert isinstance(graph, SceneGraph)
        (back,) = table_to_graphs(graphs_to_table([graph]), LIMITS)  # accepted graphs are Arrow-writable
        assert (back.id, back.relations, back.caption, back.image, back.seed) == (
            graph.id, graph.relations, graph.caption, graph.image, graph.seed
        )
        assert [(o.label, o.attributes) for o in back.objects] == [(o.label, o.attributes) for o in graph.objects]
    assert _snapshot(candidate) == before


@SETTINGS
@given(anything)
def test_arbitrary_values_raise_only_scene_graph_error(candidate):
    try:
        parse_graph(candidate, LIMITS)
    except SceneGraphError:
        pass


json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10), st.floats(allow_nan=False), text),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=25,
)
sg2im_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_like,
        "objects": st.one_of(st.lists(st.one_of(st.text(max_size=8), valid_object), max_size=5), json_like),
        "relationships": st.one_of(st.lists(st.one_of(st.lists(json_like, max_size=4), json_like), max_size=5), json_like),
        "caption": json_like,
    },
)


@SETTINGS
@given(st.one_of(json_like, sg2im_like))
def test_sg2im_conversion_raises_only_scene_graph_error(element):
    try:
        parse_graph(sg2im_to_row(element, 0), LIMITS)
    except SceneGraphError:
        pass


@SETTINGS
@given(st.lists(st.one_of(sg2im_like, json_like), max_size=6))
def test_sg2im_importer_yields_one_item_per_element(elements):
    doc = json.dumps(elements)  # surrogates become "\\udXXX" escapes, as in real files
    items = list(iter_sg2im(io.BytesIO(doc.encode()), name="fuzz.json", limits=LIMITS))
    assert len(items) == len(elements)
    assert all(isinstance(item, (SceneGraph, SceneGraphError)) for item in items)
    good = [item for item in items if isinstance(item, SceneGraph)]
    assert isinstance(graphs_to_table(good), pa.Table)


vg_value = st.one_of(st.integers(-5, 400), st.floats(allow_nan=False, allow_infinity=False), json_like)
vg_object = st.one_of(
    st.fixed_dictionaries(
        {"object_id": st.one_of(st.integers(0, 4), json_like)},
        optional={"x": vg_value, "y": vg_value, "w": vg_value, "h": vg_value,
                  "names": st.one_of(st.lists(text, max_size=2), json_like), "attributes": json_like},
    ),
    json_like,
)
vg_relationship = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={"predicate": st.one_of(text, json_like), "subject_id": st.one_of(st.integers(0, 4), json_like),
                  "object_id": st.one_of(st.integers(0, 4), json_like),
                  "subject": st.fixed_dictionaries({"object_id": st.integers(0, 4)})},
    ),
    json_like,
)
vg_image = st.one_of(
    st.fixed_dictionaries(
        {"image_id": st.one_of(st.integers(0, 10**6), json_like)},
        optional={"objects": st.one_of(st.lists(vg_object, max_size=6), json_like),
                  "relationships": st.one_of(st.lists(vg_relationship, max_size=6), json_like),
                  "width": vg_value, "height": vg_value},
    ),
    json_like,
)


@SETTINGS
@given(st.lists(vg_image, max_size=5))
def test_visual_genome_importer_yields_one_item_per_image(images):
    from sgmodel.data.visual_genome import VGOptions, iter_visual_genome

    options = VGOptions(min_object_size=0, min_objects_per_image=1, min_relations_per_image=0, min_image_size=0)
    doc = json.dumps(images).encode()
    items = list(iter_visual_genome(io.BytesIO(doc), options=options, limits=LIMITS))
    assert len(items) == len(images)
    assert all(isinstance(item, (SceneGraph, SceneGraphError)) for item in items)
    graphs_to_table([item for item in items if isinstance(item, SceneGraph)])
