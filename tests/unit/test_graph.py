"""Scene-graph contract: every validation error names id, field and value; Arrow and PyG conversions."""

from __future__ import annotations

import copy
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sgmodel.graph import (
    ERROR_SCHEMA,
    GRAPH_SCHEMA,
    DuplicateIdChecker,
    SceneGraph,
    SceneGraphError,
    SGObject,
    SGRelation,
    ValidationLimits,
    derive_seed,
    graphs_to_table,
    id_key,
    parse_graph,
    safe_key,
    table_to_graphs,
    to_pyg,
    to_pyg_batch,
    validate_graph,
)


def row(**overrides):
    """A valid contract row; overrides replace top-level fields."""
    base = {
        "id": "g1",
        "objects": [
            {"label": "sky", "attributes": ["blue"], "box": [0.0, 0.0, 1.0, 0.4]},
            {"label": "sheep", "attributes": [], "box": None},
        ],
        "relations": [{"subject": 0, "predicate": "above", "object": 1}],
        "caption": "a sheep",
        "image": None,
        "seed": 7,
    }
    base.update(overrides)
    return base


def obj(**overrides):
    base = {"label": "tree", "attributes": [], "box": None}
    base.update(overrides)
    return base


def rel(s=0, p="near", o=1):
    return {"subject": s, "predicate": p, "object": o}


LONG = "x" * 129
# (case name, row, code, field, text the message must quote for the value)
ERROR_CASES = [
    ("not a mapping", ["g1"], "bad_type", "row", "['g1']"),
    ("missing id", row(id=None), "bad_id", "id", "None"),
    ("empty id", row(id="  "), "bad_id", "id", "'  '"),
    ("id of wrong type", row(id=[1]), "bad_id", "id", "[1]"),
    ("float id", row(id=7.0), "bad_id", "id", "7.0"),
    ("bool id", row(id=True), "bad_id", "id", "True"),
    ("over-long id", row(id="i" * 300), "bad_id", "id", "iiii"),
    ("surrogate id", row(id="a\ud800"), "bad_id", "id", "\\ud800"),
    ("no objects", row(objects=[]), "no_objects", "objects", "[]"),
    ("objects missing", row(objects=None), "no_objects", "objects", "None"),
    ("objects not a list", row(objects="sky"), "bad_type", "objects", "'sky'"),
    ("too many objects", row(objects=[obj()] * 65, relations=[]), "too_many_objects", "objects", "65 objects"),
    ("object not a struct", row(objects=["sky"], relations=[]), "bad_type", "objects[0]", "'sky'"),
    ("label missing", row(objects=[obj(label=None), obj()]), "bad_type", "objects[0].label", "None"),
    ("label not a string", row(objects=[obj(), obj(label=3)]), "bad_type", "objects[1].label", "3"),
    ("empty label", row(objects=[obj(label=""), obj()]), "empty_text", "objects[0].label", "''"),
    ("blank label", row(objects=[obj(label=" \t"), obj()]), "empty_text", "objects[0].label", "' \\t'"),
    ("zero-width label", row(objects=[obj(label="\u200b\u200d"), obj()]), "empty_text", "objects[0].label", "\\u200b"),
    ("control-character label", row(objects=[obj(label="\x00\x07 "), obj()]), "empty_text", "objects[0].label", "\\x00"),
    ("byte-order-mark attribute", row(objects=[obj(attributes=["\ufeff"]), obj()]), "empty_text",
     "objects[0].attributes[0]", "\\ufeff"),
    ("invisible predicate", row(relations=[rel(p="\u2060\u200e")]), "empty_text", "relations[0].predicate", "\\u2060"),
    ("over-long label", row(objects=[obj(label=LONG), obj()]), "text_too_long", "objects[0].label", "xxxx"),
    ("surrogate label", row(objects=[obj(label="\udc80"), obj()]), "bad_text", "objects[0].label", "\\udc80"),
    ("attributes not a list", row(objects=[obj(attributes="red"), obj()]), "bad_type", "objects[0].attributes", "'red'"),
    ("empty attribute", row(objects=[obj(attributes=["red", ""]), obj()]), "empty_text", "objects[0].attributes[1]", "''"),
    ("over-long attribute", row(objects=[obj(attributes=[LONG]), obj()]), "text_too_long", "objects[0].attributes[0]", "xxx"),
    ("box wrong length", row(objects=[obj(box=[0, 0, 1]), obj()]), "bad_box", "objects[0].box", "[0, 0, 1]"),
    ("box not numbers", row(objects=[obj(box=["0", 0, 1, 1]), obj()]), "bad_box", "objects[0].box", "['0', 0, 1, 1]"),
    ("box of bools", row(objects=[obj(box=[True, 0, 1, 1]), obj()]), "bad_box", "objects[0].box", "[True, 0, 1, 1]"),
    ("box a string", row(objects=[obj(box="0,0,1,1"), obj()]), "bad_box", "objects[0].box", "'0,0,1,1'"),
    ("box NaN", row(objects=[obj(), obj(box=[0, 0, math.nan, 1])]), "box_not_finite", "objects[1].box", "nan"),
    ("box inf", row(objects=[obj(box=[0, 0, math.inf, 1]), obj()]), "box_not_finite", "objects[0].box", "inf"),
    ("box huge int", row(objects=[obj(box=[0, 0, 10**400, 1]), obj()]), "box_not_finite", "objects[0].box", "1000"),
    ("box above 1", row(objects=[obj(box=[0, 0, 1.5, 1]), obj()]), "box_out_of_range", "objects[0].box", "1.5"),
    ("box negative", row(objects=[obj(box=[-0.1, 0, 1, 1]), obj()]), "box_out_of_range", "objects[0].box", "-0.1"),
    ("box x1 < x0", row(objects=[obj(box=[0.6, 0, 0.4, 1]), obj()]), "box_inverted", "objects[0].box", "0.6, 0, 0.4"),
    ("box y1 < y0", row(objects=[obj(box=[0, 0.9, 1, 0.2]), obj()]), "box_inverted", "objects[0].box", "0.9, 1, 0.2"),
    ("relations not a list", row(relations={"subject": 0}), "bad_type", "relations", "{'subject': 0}"),
    ("too many relations", row(relations=[rel()] * 257), "too_many_relations", "relations", "257 relations"),
    ("relation not a struct", row(relations=[[0, "above", 1]]), "bad_type", "relations[0]", "[0, 'above', 1]"),
    ("subject not int", row(relations=[rel(s="0")]), "bad_type", "relations[0].subject", "'0'"),
    ("object a bool", row(relations=[rel(o=True)]), "bad_type", "relations[0].object", "True"),
    ("object index too large", row(relations=[rel(), rel(0, "on", 2)]), "relation_index_out_of_range", "relations[1].object", "2"),
    ("subject index negative", row(relations=[rel(-1, "on", 1)]), "relation_index_out_of_range", "relations[0].subject", "-1"),
    ("self relation", row(relations=[rel(1, "near", 1)]), "self_relation", "relations[0]", "'subject': 1"),
    ("empty predicate", row(relations=[rel(p="")]), "empty_text", "relations[0].predicate", "''"),
    ("predicate not a string", row(relations=[rel(p=None)]), "bad_type", "relations[0].predicate", "None"),
    ("over-long predicate", row(relations=[rel(p=LONG)]), "text_too_long", "relations[0].predicate", "xxx"),
    ("caption not a string", row(caption=5), "bad_type", "caption", "5"),
    ("surrogate caption", row(caption="\ud83d"), "bad_text", "caption", "\\ud83d"),
    ("image not bytes", row(image="abc"), "bad_type", "image", "abc"),
    ("seed not int", row(seed=1.5), "bad_type", "seed", "1.5"),
    ("seed negative", row(seed=-1), "bad_seed", "seed", "-1"),
    ("seed too large", row(seed=2**63), "bad_seed", "seed", str(2**63)),
]


@pytest.mark.parametrize(("case", "bad", "code", "field", "value"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_every_validation_error_names_id_field_and_value(case, bad, code, field, value):
    with pytest.raises(SceneGraphError) as info:
        parse_graph(bad)
    err = info.value
    assert err.code == code
    assert err.field == field
    message = str(err)
    assert f"{field} = " in message
    assert value in message, f"{value!r} not quoted in {message!r}"
    if isinstance(bad, dict) and isinstance(bad.get("id"), str) and bad["id"].strip() and len(bad["id"]) < 100:
        assert repr(bad["id"]) in message and err.row_id == bad["id"]
    assert err.reason == message


def test_error_codes_cover_the_issue_list():
    codes = {case[2] for case in ERROR_CASES}
    for required in (
        "no_objects", "relation_index_out_of_range", "self_relation", "empty_text", "text_too_long",
        "box_not_finite", "box_out_of_range", "box_inverted", "too_many_objects", "too_many_relations",
    ):
        assert required in codes


def test_labels_with_visible_text_among_invisible_characters_are_kept():
    graph = parse_graph(row(objects=[obj(label="\u200bsky"), obj(label="cafe\u0301")]))
    assert [o.label for o in graph.objects] == ["\u200bsky", "cafe\u0301"]


def test_integer_ids_become_their_decimal_text():
    assert parse_graph(row(id=7)).id == "7"
    assert parse_graph(row(id=-3)).id == "-3"
    assert (id_key(7), id_key("7"), id_key("a"), id_key(True), id_key(7.0), id_key(None)) == (
        "7", "7", "a", None, None, None)


def test_limits_are_configurable():
    limits = ValidationLimits(max_text_chars=5, max_objects=2, max_relations=1)
    with pytest.raises(SceneGraphError, match="longer than 5 characters") as info:
        parse_graph(row(objects=[obj(label="sixchr"), obj()]), limits)
    assert info.value.code == "text_too_long"
    with pytest.raises(SceneGraphError) as info:
        parse_graph(row(objects=[obj(), obj(), obj()], relations=[]), limits)
    assert info.value.code == "too_many_objects"
    with pytest.raises(SceneGraphError) as info:
        parse_graph(row(relations=[rel(), rel(1, "by", 0)]), limits)
    assert info.value.code == "too_many_relations"
    assert parse_graph(row(objects=[obj(label="five5"), obj()], relations=[rel()]), limits).objects[0].label == "five5"
    with pytest.raises(ValueError, match="max_objects"):
        ValidationLimits(max_objects=0)


def test_duplicate_ids_within_one_input_are_rejected():
    checker = DuplicateIdChecker()
    checker.check("a")
    checker.check("b")
    with pytest.raises(SceneGraphError) as info:
        checker.check("a")
    assert info.value.code == "duplicate_id"
    assert "'a'" in str(info.value) and "id = 'a'" in str(info.value)


def test_parse_never_mutates_the_callers_row():
    original = row(objects=[obj(label="sky", attributes=["blue"], box=[0, 0, 1, 0.5]), obj()])
    snapshot = copy.deepcopy(original)
    graph = parse_graph(original)
    assert original == snapshot
    # and the graph does not share mutable state with the row
    original["objects"][0]["attributes"].append("cloudy")
    original["objects"][0]["box"][0] = 0.9
    assert graph.objects[0].attributes == ("blue",)
    assert graph.objects[0].box == (0.0, 0.0, 1.0, 0.5)
    failing = row(relations=[rel(0, "on", 5)])
    snapshot = copy.deepcopy(failing)
    with pytest.raises(SceneGraphError):
        parse_graph(failing)
    assert failing == snapshot


def test_valid_row_parses_to_frozen_dataclasses():
    graph = parse_graph(row(id=42))
    assert graph.id == "42"  # integer ids become strings
    assert graph.objects[0] == SGObject("sky", ("blue",), (0.0, 0.0, 1.0, 0.4))
    assert graph.objects[1] == SGObject("sheep", (), None)
    assert graph.relations == (SGRelation(0, "above", 1),)
    assert (graph.caption, graph.image, graph.seed) == ("a sheep", None, 7)
    assert not graph.has_boxes
    assert graph.phrases() == ["above", "blue", "sheep", "sky"]
    with pytest.raises(AttributeError):
        graph.id = "other"  # type: ignore[misc]


def test_arrow_and_parquet_roundtrip(tmp_path):
    graphs = [
        parse_graph(row()),
        parse_graph(row(id="g2", caption=None, seed=None, image=b"\x89PNG", objects=[obj(), obj()], relations=[])),
        parse_graph(row(id="g3", objects=[obj(box=[0.1, 0.2, 0.3, 0.4]), obj(box=[0, 0, 1, 1])])),
    ]
    table = graphs_to_table(graphs)
    assert table.schema == GRAPH_SCHEMA
    path = tmp_path / "g.parquet"
    pq.write_table(table, path)
    back = table_to_graphs(pq.read_table(path))
    assert [g.id for g in back] == ["g1", "g2", "g3"]
    assert back[1].image == b"\x89PNG" and back[1].relations == ()
    assert back[1] == graphs[1]  # no boxes: exactly equal
    for got, want in zip(back, graphs):
        assert (got.id, got.relations, got.caption, got.image, got.seed) == (
            want.id, want.relations, want.caption, want.image, want.seed
        )
        assert [(o.label, o.attributes) for o in got.objects] == [(o.label, o.attributes) for o in want.objects]
        for a, b in zip(got.objects, want.objects):
            # boxes are float32 in Parquet: equal to float32 precision, None stays None
            assert (a.box is None) == (b.box is None)
            if a.box is not None:
                assert a.box == pytest.approx(b.box, abs=1e-7)


def test_graphs_to_table_extra_columns():
    graphs = [parse_graph(row(id="a")), parse_graph(row(id="b"))]
    table = graphs_to_table(graphs, extra={"class_map": pa.array([b"1", None], pa.binary())})
    assert table.column_names == GRAPH_SCHEMA.names + ["class_map"]
    assert table.column("class_map").to_pylist() == [b"1", None]
    assert ERROR_SCHEMA.names == ["id", "reason"]


def test_validate_graph_checks_graphs_built_in_code():
    good = SceneGraph(id="ok", objects=(SGObject("a"), SGObject("b")), relations=(SGRelation(0, "on", 1),))
    assert validate_graph(good) == good
    bad = SceneGraph(id="bad", objects=(SGObject("a"),), relations=(SGRelation(0, "on", 3),))
    with pytest.raises(SceneGraphError) as info:
        validate_graph(bad)
    assert info.value.code == "relation_index_out_of_range"


def test_safe_key_and_derive_seed():
    assert safe_key("plain-id_1.x") == "plain-id_1.x"
    a, b = safe_key("a/b"), safe_key("a:b")
    assert a != b and "/" not in a and ":" not in b  # sanitised ids never collide
    assert derive_seed(0, "g", 1) == derive_seed(0, "g", 1)
    assert len({derive_seed(0, "g", 1), derive_seed(1, "g", 1), derive_seed(0, "h", 1), derive_seed(0, "g", 2)}) == 4
    assert 0 <= derive_seed(5, "x", 0) < 2**63


def test_to_pyg_fields():
    graph = parse_graph(row(objects=[obj(label="a", box=[0, 0, 0.5, 0.5]), obj(label="b"), obj(label="c")],
                            relations=[rel(0, "on", 1), rel(2, "by", 0)]))
    data = to_pyg(graph)
    assert data.num_nodes == 3
    assert data.edge_index.tolist() == [[0, 2], [1, 0]]
    assert data.has_box.tolist() == [True, False, False]
    assert data.boxes.tolist()[0] == [0.0, 0.0, 0.5, 0.5]
    assert data.labels == ["a", "b", "c"] and data.predicates == ["on", "by"]


def test_pyg_batch_offsets_edges_per_graph():
    g1 = parse_graph(row(id="one", objects=[obj(label="a"), obj(label="b"), obj(label="c")],
                         relations=[rel(0, "on", 1), rel(2, "by", 1)]))
    g2 = parse_graph(row(id="two", objects=[obj(label="d"), obj(label="e")], relations=[rel(1, "under", 0)]))
    g3 = parse_graph(row(id="three", objects=[obj(label="f")], relations=[]))
    batch = to_pyg_batch([g1, g2, g3])
    assert batch.num_graphs == 3
    assert batch.num_nodes == 6
    # g2's edge 1 -> 0 becomes 4 -> 3 after g1's three nodes
    assert batch.edge_index.tolist() == [[0, 2, 4], [1, 1, 3]]
    assert batch.batch.tolist() == [0, 0, 0, 1, 1, 2]
    assert batch.ptr.tolist() == [0, 3, 5, 6]
    assert batch.boxes.shape == (6, 4)
    assert batch.labels == [["a", "b", "c"], ["d", "e"], ["f"]]
    assert batch.predicates == [["on", "by"], ["under"], []]
